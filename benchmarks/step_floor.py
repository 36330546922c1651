"""The floor that arithmetic sets on a VI step on this CPU, as a ratio to torch.optim.Adam's step.

A step cannot cost less than the work its equations require. For each model this script
times, on the same batch and in one process (medians of repeats):

- the closure (forward + backward of the batch-mean loss) and ``torch.randn`` of P numbers
  (the one weight sample; ``torch.Generator`` on CPU draws them serially);
- one in-place elementwise pass over P numbers, counted ``PASSES[optimizer]`` times: the
  noise scaling, adding and removing it, gathering the gradient, the statistic's update and
  the mean's update (IVON: ĥ = ĝε/σ and its three-term update; VOGN/noisy Adam: the EMA);
- the statistic (captured shapes of every layer's input a and output gradient g, n examples):
  diagonal GGN/empirical Fisher: the per-example squared gradients Σ_n (g_nᵀ a_n)², as
  (g²)ᵀ(a²) for Linear layers (for convolutions no product this simple exists; a batched
  matmul over examples is slower than the engine, so models with convolutions get no VOGN or
  noisy Adam floor, "—"); K-FAC: A = aᵀa, G = gᵀg;
- K-FAC's linear algebra per step: sampling with the symmetric root Q_G [(Q_Gᵀ E Q_A) / √e] Q_Aᵀ
  (4 matmuls per layer), the natural-gradient solve in the eigenbasis (4 more) and the two eigh every
  ``inv_interval`` (10) steps, amortised.

floor = closure + randn + statistic + linear algebra + passes; the ratio is floor / Adam's
step. The passes are timed on a buffer that stays in cache, which a step's vectors do not: the
second-last column, a whole IVON step written by hand on flat vectors without the library (the same
operations, timed like Adam's step), shows how far above the sum of the parts a real step is; the last,
the same step with its two elementwise parts fused by ``torch.compile``, what compiling the update buys.
A target below the floor cannot be met on this model, batch and machine; the README's
step-time table prints the floor beside the measured ratio. The models and batches are those of
benchmarks/step_time.py. Run: python benchmarks/step_floor.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from models import STEP_TIME_MODELS
from step_time import RESNET_DEFAULTS, batch

PASSES = {"ivon": 10, "vogn": 9, "noisy_adam": 10, "noisy_kfac": 7}
INV_INTERVAL = 10
NO_KFAC = {"resnet18"}  # as in step_time.py: one refresh of its 4,609-wide factors takes minutes on 2 cores


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _layer_shapes(module: nn.Module, x: Tensor, y: Tensor) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """(layer, its input a, its output gradient g) for every Linear and Conv2d, from one forward and backward."""
    inputs, grads, hooks = {}, {}, []
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def record(layer, args, out):
        inputs[layer] = args[0].detach()
        out.register_hook(lambda grad: grads.__setitem__(layer, grad.detach()))

    for layer in layers:
        hooks.append(layer.register_forward_hook(record))
    nn.functional.cross_entropy(module(x), y).backward()
    for hook in hooks:
        hook.remove()
    return [(layer, inputs[layer], grads[layer]) for layer in layers]


def _unfolded(layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """a as (n, positions, in + 1) and g as (n, positions, out), bias column included."""
    if isinstance(layer, nn.Conv2d):
        patches = nn.functional.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        a, g = patches.transpose(1, 2), g.flatten(2).transpose(1, 2)
    else:
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    return torch.cat([a, torch.ones_like(a[..., :1])], -1), g


def _diagonal_statistic(layers) -> None:
    for layer, a, g in layers:
        a, g = _unfolded(layer, a, g)
        if a.shape[1] == 1:  # Linear: Σ_n (g_n a_nᵀ)² = (g²)ᵀ (a²)
            g[:, 0].square().T @ a[:, 0].square()
        else:  # per-example gradients, squared and summed
            torch.bmm(g.transpose(1, 2), a).square_().sum(0)


def _kfac_statistic(layers) -> None:
    for layer, a, g in layers:
        a, g = _unfolded(layer, a, g)
        a, g = a.flatten(0, 1), g.flatten(0, 1)
        a.T @ a, g.T @ g


def _kfac_algebra(factors: list[tuple[Tensor, Tensor]], eigh: bool) -> None:
    for qa, qg in factors:
        z = torch.randn(qg.shape[0], qa.shape[0])
        qg @ ((qg.T @ z @ qa) / 2.0) @ qa.T  # sampling with the symmetric root Σ^½ ε
        qg @ ((qg.T @ z @ qa) / 2.0) @ qa.T  # the solve in the eigenbasis
        if eigh:
            torch.linalg.eigh(qa), torch.linalg.eigh(qg)


def _ivon_noise(h: Tensor, damping: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """IVON's precision h + δ̃, the standard deviation σ = (N/τ (h + δ̃))^-½ and the noise σε."""
    precision = h + damping
    std = precision.mul(1437 / 0.01).rsqrt()
    return precision, std, eps * std


def _ivon_update(h, momentum, damping, precision, mean, grad, eps, std) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ĥ = ĝε/σ, IVON's three-term h update, the momentum, the new mean and the sum that is checked for NaN."""
    estimate = grad * eps / std
    difference = h - estimate
    new_h = estimate + 0.999 * difference + 5e-7 * difference.square() / precision
    new_momentum = torch.lerp(grad, momentum, 0.9)
    new = mean - 0.2 * (new_momentum + mean * damping) / (new_h + damping)
    return new_h, new_momentum, new, grad.sum() + estimate.sum() + new.sum()


def _hand_written_ivon(module: nn.Module, closure, generator: torch.Generator, compiled: bool = False):
    """One IVON step with no library code: flat state, the noise, the closure, ĥ = ĝε/σ, h and μ updates.

    ``compiled``: the two elementwise parts go through ``torch.compile`` (fused loops; the first call compiles).
    """
    params = list(module.parameters())
    size, sizes = sum(p.numel() for p in params), [p.numel() for p in params]
    h, momentum, damping = torch.full((size,), 0.5), torch.zeros(size), torch.full((size,), 1e-3)
    noise_of, update = _ivon_noise, _ivon_update
    if compiled:
        noise_of, update = torch.compile(_ivon_noise, dynamic=False), torch.compile(_ivon_update, dynamic=False)

    def step():
        eps = torch.randn(size, generator=generator)
        precision, std, noise = noise_of(h, damping, eps)
        mean = torch.cat([p.detach().reshape(-1) for p in params])
        with torch.no_grad():
            torch._foreach_add_(params, [t.view_as(p) for t, p in zip(noise.split(sizes), params)])
        closure()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        new_h, new_momentum, new, check = update(h, momentum, damping, precision, mean, grad, eps, std)
        bool(torch.isfinite(check))
        h.copy_(new_h)
        momentum.copy_(new_momentum)
        with torch.no_grad():
            torch._foreach_copy_(params, [t.view_as(p) for t, p in zip(new.split(sizes), params)])

    return step


def floors(model_name: str, batch_size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    module = STEP_TIME_MODELS[model_name]()
    x, y = batch(model_name, RESNET_DEFAULTS["batch_size"] if model_name == "resnet18" else batch_size)
    params = list(module.parameters())
    size = sum(p.numel() for p in params)
    adam = torch.optim.Adam(params, lr=0.0)

    def closure():
        module.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()

    def adam_step():
        closure()
        adam.step()

    layers = _layer_shapes(module, x, y)
    factors = []
    for layer, a, g in layers if model_name not in NO_KFAC else []:
        a, g = _unfolded(layer, a, g)
        qa = torch.linalg.qr(torch.randn(a.shape[-1], a.shape[-1]))[0]
        qg = torch.linalg.qr(torch.randn(g.shape[-1], g.shape[-1]))[0]
        factors.append((qa, qg))
    buffer = torch.randn(size)
    measured = {
        "adam": _median_ms(adam_step, repeats),
        "closure": _median_ms(closure, repeats),
        "randn": _median_ms(lambda: torch.randn(size), repeats),
        "pass": _median_ms(lambda: buffer.mul_(1.0), repeats),
    }
    for label, compiled in (("hand-written IVON", False), ("compiled IVON", True)):
        hand_written = _hand_written_ivon(module, closure, torch.Generator().manual_seed(0), compiled)
        measured[label] = _median_ms(hand_written, repeats) / _median_ms(adam_step, repeats)
    if all(isinstance(layer, nn.Linear) for layer, _, _ in layers):
        measured["diag"] = _median_ms(lambda: _diagonal_statistic(layers), repeats)
    if model_name not in NO_KFAC:
        measured["kfac"] = _median_ms(lambda: _kfac_statistic(layers), repeats)
        measured["algebra"] = _median_ms(lambda: _kfac_algebra(factors, eigh=False), repeats)
        measured["eigh"] = _median_ms(lambda: [(torch.linalg.eigh(a), torch.linalg.eigh(g)) for a, g in factors], 3)
    base = measured["closure"] + measured["randn"]
    ms = {"ivon": base + PASSES["ivon"] * measured["pass"]}
    if "diag" in measured:
        for name in ("vogn", "noisy_adam"):
            ms[name] = base + measured["diag"] + PASSES[name] * measured["pass"]
    if model_name not in NO_KFAC:
        kfac = measured["kfac"] + measured["algebra"] + measured["eigh"] / INV_INTERVAL
        ms["noisy_kfac"] = base + kfac + PASSES["noisy_kfac"] * measured["pass"]
    return {"parameters": size, **measured, **{name: value / measured["adam"] for name, value in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(STEP_TIME_MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} (ResNet-18: 8)\n")
    print("| model | P | Adam (ms) | closure | randn(P) | pass | diag stat. | K-FAC stat. | K-FAC algebra | eigh "
          "| floor IVON | floor VOGN | floor noisy Adam | floor noisy K-FAC | hand-written IVON step "
          "| the same, compiled |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        f = floors(name, args.batch_size, args.repeats)
        parts = ("adam", "closure", "randn", "pass", "diag", "kfac", "algebra", "eigh")
        times = " | ".join(f"{f[k]:.2f}" if k in f else "—" for k in parts)
        ratios = " | ".join(f"{f[k]:.2f}" if k in f else "—" for k in ("ivon", "vogn", "noisy_adam", "noisy_kfac"))
        hand = f"{f['hand-written IVON']:.2f} | {f['compiled IVON']:.2f}"
        print(f"| {name} | {f['parameters']:,} | {times} | {ratios} | {hand} |")


if __name__ == "__main__":
    main()
