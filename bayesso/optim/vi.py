"""Natural-gradient variational inference: ``VIOptimizer`` and the presets VOGN, NoisyAdam, NoisyKFAC.

One step (ALGORITHMS.md section 2), with δ̃ = τδ/N per block and λ = δ̃ + γ:

    for k in 1..K:  w_k = μ + (noise from q);  ĝ_k = ∇ (batch-mean NLL)(w_k),  ĥ_k = statistic at w_k
    S <- β2 S + (1 - β2) mean_k ĥ_k                     (posterior.update_statistic)
    m <- β1 m + (ĝ + δ̃ μ)   ("raw")   or   m <- β1 m + (1 - β1)(ĝ + δ̃ μ), m̂ = m / (1 - β1^t)   ("adam")
    μ <- μ - α (S + λ)⁻¹ m̂                              (posterior.precondition)

Every β is the weight on the OLD value, as in ``torch.optim.Adam``. PyTorch-SSO's
``ema_decay`` and ``grad_ema_decay`` are weights on the NEW value: β = 1 - ema_decay
(its VOGN configs' ``ema_decay=0.999`` is β2 = 0.001 here).

The closure follows torch's convention: zero the gradients, run the model once on
the batch, compute the batch MEAN of the NLL, call ``backward()`` and return the
loss. The optimizer calls it once per MC sample with sampled weights in the module
and restores the mean afterwards.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from bayesso.curvature import CurvatureEngine, DenseBlock, DiagBlock, KronBlock
from bayesso.distributed import ProcessGrid, reduce_step
from bayesso.optim.accumulation import MicroBatchSums, check_positive, flat_gradient, nonfinite_part
from bayesso.posteriors import KroneckerGaussian

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["VOGN", "NoisyAdam", "NoisyKFAC", "VIOptimizer"]

MOMENTUM_TYPES = ("raw", "adam")
CURVATURE_KINDS = ("fisher_emp", "fisher_mc", "ggn")


class VIOptimizer(torch.optim.Optimizer):
    """Natural-gradient VI for the posterior of a ``BayesianModel`` (a ``torch.optim.Optimizer``).

    Args:
        model: the ``BayesianModel``; its posterior's structure sets the statistic's.
        lr: α. curvature: the engine kind giving ĥ ("fisher_emp", "fisher_mc", "ggn").
        mc_samples: K weight samples per step. betas: (β1 momentum, β2 statistic), weights on old.
        momentum: "raw" (heavy ball on the gradient) or "adam" (EMA with bias correction).
        damping: external γ. prior_precision, dataset_size, temperature: set on the posterior.
        augmentation_factor: ρ, N -> ρN under data augmentation.
        temperature_warmup: (τ0, steps): τ rises linearly from τ0 to ``temperature``.
        deterministic_batchnorm: batch-norm parameters are not sampled and have no prior.
        init_precision: initial statistic s0 (K-FAC: A = G = sqrt(s0) I); without it the first
            step is taken at the mean and the statistic starts at the first estimate.
        curv_interval, inv_interval: refresh the statistic / its decomposition every so many steps.
        accumulation_steps: micro-batches (equal sizes) per update; each draws fresh samples.
        skip_nonfinite: skip steps with a non-finite loss, gradient or statistic (counted in
            ``skipped_steps``) instead of raising ``FloatingPointError``.
        seed: seed of the generator for weight sampling, the same on every rank; MC labels use
            seed + 1 + rank (both saved in ``state_dict``).
        grid: a ``bayesso.distributed.ProcessGrid``: each step draws ``mc_samples`` x ``mc_groups``
            weight samples from the shared generator, this rank evaluates its MC slot's share, and
            gradients and curvature are reduced over all ranks (identical posteriors everywhere).
        kfac_approx: "expand" or "reduce" for K-FAC under weight sharing.
    """

    prior_in_momentum = True  # the prior gradient δ̃μ enters the momentum (VOGN, Vadam) or is added after (IVON)

    def __init__(
        self,
        model: BayesianModel,
        lr: float = 1e-3,
        *,
        curvature: str | None = "fisher_emp",
        mc_samples: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: str = "raw",
        damping: float | None = None,
        prior_precision: float | dict[str, float] | None = None,
        dataset_size: int | None = None,
        augmentation_factor: float = 1.0,
        temperature: float | None = None,
        temperature_warmup: tuple[float, int] | None = None,
        deterministic_batchnorm: bool = True,
        init_precision: float | None = None,
        curv_interval: int = 1,
        inv_interval: int = 1,
        accumulation_steps: int = 1,
        skip_nonfinite: bool = False,
        seed: int = 0,
        kfac_approx: str = "expand",
        grid: ProcessGrid | None = None,
    ) -> None:
        check_positive("lr", lr)
        check_positive("mc_samples", mc_samples, integer=True)
        for name, value in (("curv_interval", curv_interval), ("inv_interval", inv_interval)):
            check_positive(name, value, integer=True)
        check_positive("accumulation_steps", accumulation_steps, integer=True)
        check_positive("augmentation_factor", augmentation_factor)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if momentum not in MOMENTUM_TYPES:
            raise ValueError(f"momentum must be 'raw' or 'adam', got {momentum!r}")
        if curvature is not None and curvature not in CURVATURE_KINDS:
            raise ValueError(f"curvature must be one of {CURVATURE_KINDS}, got {curvature!r}")
        if init_precision is not None:
            check_positive("init_precision", init_precision)
        if temperature_warmup is not None:
            check_positive("temperature_warmup[0]", temperature_warmup[0])
            check_positive("temperature_warmup[1]", temperature_warmup[1], integer=True)
        posterior = model.posterior
        if temperature is not None:
            posterior.temperature = temperature
        if damping is not None:
            posterior.damping = damping
        if prior_precision is not None:
            posterior.prior_precision = prior_precision
        if dataset_size is not None:
            posterior.dataset_size = dataset_size * augmentation_factor
        elif posterior.dataset_size is None:
            raise ValueError("dataset_size is unknown: pass dataset_size=N here or to the BayesianModel")
        elif augmentation_factor != 1.0:
            posterior.dataset_size = posterior.dataset_size * augmentation_factor
        if deterministic_batchnorm:
            posterior.deterministic |= {
                p.name for p in posterior.plans if isinstance(p.module, nn.modules.batchnorm._BatchNorm)
            }
        params = posterior.parameters
        super().__init__(params, {"lr": lr, "betas": tuple(betas)})
        self.model, self.posterior = model, posterior
        self.mc_samples, self.momentum_type = mc_samples, momentum
        self.curv_interval, self.inv_interval, self.accumulation_steps = curv_interval, inv_interval, accumulation_steps
        self.temperature_target, self.temperature_warmup = posterior.temperature, temperature_warmup
        self.skip_nonfinite = skip_nonfinite
        self.engine = None
        if curvature is not None:
            self.engine = CurvatureEngine(
                model.module,
                model.likelihood,
                curvature,
                posterior.structure,
                modules=[plan.name for plan in posterior.plans],
                kfac_approx=kfac_approx,
            )
        self.grid = grid or ProcessGrid()
        self.generator = torch.Generator(device=params[0].device).manual_seed(seed)
        self.label_generator = torch.Generator(device=params[0].device).manual_seed(seed + 1 + self.grid.rank)
        if init_precision is not None:
            _set_isotropic(posterior, init_precision)
        self._step, self.skipped_steps = 0, 0
        self._momentum: Tensor | None = None
        self._sums = MicroBatchSums()

    # ---- one step ------------------------------------------------------------------------------
    def step(self, closure=None) -> Tensor:
        """One natural-gradient VI step; returns the mean loss over the MC samples."""
        if closure is None:
            raise ValueError("VI optimizers evaluate the loss at sampled weights: step() needs a closure")
        check_positive("lr", self.param_groups[0]["lr"])
        self._apply_temperature()
        curvature_step = self.engine is not None and self._step % self.curv_interval == 0
        loss, grad, curvature, estimate = reduce_step(self.grid, *self._evaluate(closure, curvature_step))
        bad = nonfinite_part(loss, grad, curvature, estimate)
        if bad:
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            raise FloatingPointError(
                f"non-finite {bad} at step {self._step}: the posterior mean, statistic and step count are "
                "unchanged; pass skip_nonfinite=True to skip such steps. If it recurs, the sampled weights are "
                "too noisy or the steps too long: raise prior_precision, lower the temperature, raise damping "
                "or lower lr (for K-FAC also inv_interval)"
            )
        self._sums.add(grad, curvature, estimate)
        if self._sums.count == self.accumulation_steps:
            self._update(*self._sums.mean())
            self._step += 1
        return loss

    def _apply_temperature(self) -> None:
        if self.temperature_warmup is None:
            return
        start, steps = self.temperature_warmup
        fraction = min(1.0, self._step / steps)
        self.posterior.temperature = start + (self.temperature_target - start) * fraction

    def _evaluate(self, closure, curvature_step: bool):
        """Loss, mean gradient, summed curvature and sample statistic over the MC samples."""
        posterior = self.posterior
        at_mean = not posterior.initialized
        self._before_sampling()
        losses, grads, curvature, estimates = [], [], None, []
        if at_mean:  # the first step without an initial precision is taken at the mean
            draws = [None]
        else:  # every rank draws the step's samples from the shared stream and evaluates its own
            total = self.mc_samples * self.grid.mc_groups
            draws = [posterior.sample_noise(1, self.generator) for _ in range(total)][self.grid.sample_slice(total)]
        for draw in draws:
            if draw is None:
                eps, weights = None, nullcontext()
            else:
                noise, eps = (t[0] for t in draw)
                weights = posterior.perturbed(noise)
            with weights:
                capture = self.engine.capture(self.label_generator) if curvature_step else nullcontext()
                with torch.enable_grad(), capture:
                    loss = closure()
                grad = flat_gradient([p for group in self.param_groups for p in group["params"]])
                if curvature_step and torch.isfinite(torch.as_tensor(loss)).all():  # else the step is rejected
                    part = capture.curvature()
                    curvature = part if curvature is None else curvature + part
            losses.append(torch.as_tensor(loss).detach())
            grads.append(grad.to(posterior.dtype))
            estimates.append(self._sample_statistic(grads[-1], eps))
        estimate = None if estimates[0] is None else _average(estimates)
        return _average(losses), _average(grads), curvature, estimate

    def _before_sampling(self) -> None:
        """Hook run once per step before the weights are sampled."""

    def _sample_statistic(self, grad: Tensor, eps: Tensor | None) -> Tensor | None:
        """A statistic from the sampled gradient and its noise ε (None at the mean); None uses the engine."""
        return None

    def _prior_gradient(self, mean: Tensor) -> Tensor:
        """δ̃ μ per block (no prior for deterministic blocks)."""
        posterior = self.posterior
        per_block = posterior.block_damping() - posterior.damping
        return torch.cat([(mean[where] * value) for value, where in zip(per_block, posterior.block_slices())])

    def _update(self, grad: Tensor, curvature, estimate) -> None:
        posterior, group = self.posterior, self.param_groups[0]
        beta1, beta2 = group["betas"]
        if curvature is not None:
            posterior.update_statistic(curvature, beta2, refresh=self._step % self.inv_interval == 0)
        mean = posterior.mean()
        prior = self._prior_gradient(mean)
        direction = grad + prior if self.prior_in_momentum else grad
        if self._momentum is None:
            self._momentum = torch.zeros_like(direction)
        if self.momentum_type == "raw":
            self._momentum.mul_(beta1).add_(direction)
            velocity = self._momentum
        else:
            self._momentum.mul_(beta1).add_(direction, alpha=1 - beta1)
            velocity = self._momentum / (1 - beta1 ** (self._step + 1))
        if not self.prior_in_momentum:
            velocity = velocity + prior
        posterior.set_mean(mean - group["lr"] * self._direction(velocity))

    def _direction(self, velocity: Tensor) -> Tensor:
        return self.posterior.precondition(velocity)

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Param groups plus every tensor of VI state, the posterior and the generator's state."""
        self._sums.ensure_empty()
        state = super().state_dict()
        state["vi"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "momentum": None if self._momentum is None else self._momentum.clone(),
            "generator": self.generator.get_state(),
            "label_generator": self.label_generator.get_state(),
            "posterior": self.posterior.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "vi"})
        vi = state_dict["vi"]
        self._step, self.skipped_steps = vi["step"], vi["skipped_steps"]
        self._momentum = None if vi["momentum"] is None else vi["momentum"].clone()
        self.generator.set_state(vi["generator"])
        self.label_generator.set_state(vi["label_generator"])
        self.posterior.load_state_dict(vi["posterior"])
        self._sums = MicroBatchSums()


def _average(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(0)


def _set_isotropic(posterior, value: float) -> None:
    """Statistic s0 I in every block (K-FAC: A = G = sqrt(s0) I)."""
    for block in posterior.statistic.blocks.values():
        if isinstance(block, DiagBlock):
            block.values.fill_(value)
        elif isinstance(block, KronBlock):
            eye_a = torch.eye(block.A.shape[-1], dtype=block.A.dtype, device=block.A.device)
            eye_g = torch.eye(block.G.shape[-1], dtype=block.G.dtype, device=block.G.device)
            block.A.copy_(eye_a.expand_as(block.A) * math.sqrt(value))
            block.G.copy_(eye_g.expand_as(block.G) * math.sqrt(value))
            block.n.fill_(1.0)
        elif isinstance(block, DenseBlock):
            eye = torch.eye(block.matrix.shape[0], dtype=block.matrix.dtype, device=block.matrix.device)
            block.matrix.copy_(eye * value)
    posterior.initialized = True
    posterior.refresh()


class _Preset(VIOptimizer):
    """A ``VIOptimizer`` whose defaults are the class's ``preset`` (options given override them)."""

    preset: ClassVar[dict] = {}

    def __init__(self, model: BayesianModel, lr: float | None = None, **options) -> None:
        options = {**self.preset, **options}
        if lr is not None:
            options["lr"] = lr
        super().__init__(model, **options)


class VOGN(_Preset):
    """Variational Online Gauss-Newton (Khan et al. 2018; Osawa et al. 2019).

    ĥ = per-example squared gradients at the sampled weights with the true labels
    (empirical Fisher, exact through the engine's rules), heavy-ball momentum on the
    raw gradient. Sampling std sqrt(τ / (N (s + δ̃ + γ))). Works with any posterior
    structure (a Kronecker posterior gives the K-FAC variant). Defaults (lr 1e-3,
    γ = 0.01) are tuned for small data with ``prior_precision=50, temperature=0.01``
    on digits (benchmarks/calibration_digits.py); the paper's ImageNet run used
    lr 1e-3 with γ = 1e-4 and τ = 1.
    """

    preset: ClassVar[dict] = {
        "lr": 1e-3,
        "damping": 1e-2,
        "curvature": "fisher_emp",
        "momentum": "raw",
        "betas": (0.9, 0.999),
    }


class NoisyAdam(_Preset):
    """Noisy Adam (Zhang et al. 2018): MC-Fisher diagonal, Adam-style bias-corrected momentum.

    μ <- μ - α m̂ / (f + γ_in + γ_ex) with f the EMA of squared sampled-label gradients
    (no square root) and γ_in = τδ/N. Defaults (lr 1e-2, γ_ex = 0.03) tuned on digits with
    ``prior_precision=50, temperature=0.01``.
    """

    preset: ClassVar[dict] = {
        "lr": 1e-2,
        "damping": 3e-2,
        "curvature": "fisher_mc",
        "momentum": "adam",
        "betas": (0.9, 0.999),
    }


class NoisyKFAC(_Preset):
    """Noisy K-FAC (Zhang et al. 2018): matrix-normal posterior from MC-Fisher K-FAC factors.

    Needs ``posterior="kron"``; the paper's damping is the posterior's ``kfac_damping="factored"``.
    Factors refresh every ``curv_interval`` steps, their eigendecompositions every ``inv_interval``
    (default 10). Defaults (lr 2e-3, γ_ex = 0.01, β = (0.9, 0.99)) tuned on digits with
    ``prior_precision=50, temperature=0.01``; with inverses 10 steps stale, lr 3e-3 diverged
    on one of three seeds, so raise ``lr`` together with lowering ``inv_interval``.
    """

    preset: ClassVar[dict] = {
        "lr": 2e-3,
        "damping": 1e-2,
        "curvature": "fisher_mc",
        "momentum": "raw",
        "betas": (0.9, 0.99),
        "inv_interval": 10,
    }

    def __init__(self, model: BayesianModel, lr: float | None = None, **options) -> None:
        if not isinstance(model.posterior, KroneckerGaussian):
            raise ValueError(f"NoisyKFAC needs a KroneckerGaussian posterior, got {type(model.posterior).__name__}")
        super().__init__(model, lr, **options)
