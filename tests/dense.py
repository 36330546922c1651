"""Dense float64 references built with torch.func, independent of bayesso's engine.

Everything is over the model's trainable parameters in ``named_parameters()`` order,
each flattened row-major, for the SUMMED NLL. Per-example losses are written with
torch.nn.functional directly, not with bayesso's likelihoods. The heteroscedastic
Gaussian's GGN goes through its natural parameters, where its loss is convex.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from bayesso.likelihoods import Binary, Classification, Heteroscedastic, Likelihood


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def offsets(model: nn.Module) -> dict[str, slice]:
    out, start = {}, 0
    for name, p in trainable(model).items():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def _unflatten(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    params, start = {}, 0
    for name, p in trainable(model).items():
        params[name] = theta[start : start + p.numel()].view_as(p)
        start += p.numel()
    return params


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in trainable(model).values()])


def example_loss(likelihood: Likelihood, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log p(y | f) for ONE example (f without batch dimension)."""
    if isinstance(likelihood, Classification):
        return F.cross_entropy(f.unsqueeze(0), y.unsqueeze(0), reduction="sum")
    if isinstance(likelihood, Binary):
        return F.binary_cross_entropy_with_logits(f.reshape(()), y.reshape(()).to(f.dtype))
    if isinstance(likelihood, Heteroscedastic):  # f = (μ_1..μ_D, s_1..s_D), s = log σ²
        mean, log_variance = f.reshape(2, -1)
        return 0.5 * ((y - mean) ** 2 / log_variance.exp() + log_variance + math.log(2 * math.pi)).sum()
    sigma = float(likelihood.sigma)
    return 0.5 * ((y - f) ** 2).sum() / sigma**2 + 0.5 * f.numel() * math.log(2 * math.pi * sigma**2)


def to_natural(f: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic outputs (μ, s) of one example to the natural parameters η = (μ/σ², -1/(2σ²))."""
    mean, log_variance = f.reshape(2, -1)
    return torch.cat([mean / log_variance.exp(), -0.5 / log_variance.exp()])


def natural_loss(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log N(y | ·) of one example in its natural parameters: -η1 y - η2 y² + A(η) + ½ log 2π."""
    eta1, eta2 = eta.reshape(2, -1)
    log_partition = -(eta1**2) / (4 * eta2) - 0.5 * torch.log(-2 * eta2)
    return (-eta1 * y - eta2 * y**2 + log_partition + 0.5 * math.log(2 * math.pi)).sum()


def natural_ggn(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D^T (d²l/dη²) D at one example's heteroscedastic outputs f, with D = dη/df."""
    eta_jacobian = jacrev(to_natural)(f)
    return eta_jacobian.T @ hessian(natural_loss)(to_natural(f), y) @ eta_jacobian


def _example_output(model: nn.Module):
    def output(theta, x):
        return functional_call(model, _unflatten(model, theta), (x.unsqueeze(0),)).squeeze(0)

    return output


def jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians (B, O, P) of the outputs w.r.t. the flat parameters."""
    output, theta = _example_output(model), flat_parameters(model)
    return torch.stack([jacrev(output)(theta, xi).reshape(-1, theta.numel()) for xi in x])


def loss_hessians(model: nn.Module, likelihood: Likelihood, x, y) -> torch.Tensor:
    """Lambda_i (B, O, O): Hessian of the per-example loss w.r.t. the outputs (heteroscedastic: ``natural_ggn``)."""
    output, theta = _example_output(model), flat_parameters(model)
    hessians = []
    for xi, yi in zip(x, y):
        fi = output(theta, xi).reshape(-1)
        if isinstance(likelihood, Heteroscedastic):
            hessians.append(natural_ggn(fi, yi))
        else:
            hessians.append(hessian(lambda f, yi=yi: example_loss(likelihood, f, yi))(fi))
    return torch.stack(hessians)


def ggn(model: nn.Module, likelihood: Likelihood, x, y) -> torch.Tensor:
    jac = jacobians(model, x)
    return torch.einsum("bop,boq,bqr->pr", jac, loss_hessians(model, likelihood, x, y), jac)


def per_example_gradients(model: nn.Module, likelihood: Likelihood, x, y) -> torch.Tensor:
    """(B, P) gradients of each example's loss."""
    output, theta = _example_output(model), flat_parameters(model)

    def loss(theta, xi, yi):
        return example_loss(likelihood, output(theta, xi), yi)

    return torch.stack([grad(loss)(theta, xi, yi) for xi, yi in zip(x, y)])


def empirical_fisher(model: nn.Module, likelihood: Likelihood, x, y) -> torch.Tensor:
    g = per_example_gradients(model, likelihood, x, y)
    return g.T @ g


def loss_hessian(model: nn.Module, likelihood: Likelihood, x, y) -> torch.Tensor:
    """Hessian of the summed loss w.r.t. the flat parameters (P, P), reverse-over-reverse.

    (Forward-mode AD ignores Embedding's ``padding_idx``, so ``torch.func.hessian``
    would treat the padding row as trainable in one direction only.)
    """
    outputs = _example_output(model)

    def total(theta):
        return sum(example_loss(likelihood, outputs(theta, x[i]), y[i]) for i in range(len(x)))

    return jacrev(jacrev(total))(flat_parameters(model))


def reference(kind: str, model: nn.Module, likelihood: Likelihood, x, y) -> torch.Tensor:
    if kind == "ggn":
        return ggn(model, likelihood, x, y)
    if kind == "fisher_emp":
        return empirical_fisher(model, likelihood, x, y)
    if kind == "hessian":
        return loss_hessian(model, likelihood, x, y)
    raise ValueError(kind)


def block_diagonal(dense: torch.Tensor, model: nn.Module, blocks: list[list[str]]) -> torch.Tensor:
    """``dense`` with zeros outside the blocks (each a list of parameter names)."""
    where = offsets(model)
    out = torch.zeros_like(dense)
    for names in blocks:
        index = torch.cat([torch.arange(where[n].start, where[n].stop) for n in names])
        out[index.unsqueeze(1), index.unsqueeze(0)] = dense[index.unsqueeze(1), index.unsqueeze(0)]
    return out


def module_blocks(model: nn.Module) -> list[list[str]]:
    """Trainable parameter names grouped by the module that registers them first."""
    seen, groups = set(), []
    for prefix, module in model.named_modules():
        names = []
        for local, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.append(f"{prefix}.{local}" if prefix else local)
        if names:
            groups.append(names)
    return groups


def posterior_index(posterior) -> torch.Tensor:
    """Positions in the dense (named_parameters) order of a posterior's flat parameters, in its order."""
    names = {id(p): name for name, p in posterior.module.named_parameters()}
    where = offsets(posterior.module)
    return torch.cat([torch.arange(where[names[id(p)]].start, where[names[id(p)]].stop) for p in posterior.parameters])
