"""Natural-gradient variational inference: ``VIOptimizer`` (the presets are in ``presets.py`` and ``ivon.py``).

One step (docs/vi.md §1), with δ̃ = τδ/N per block and λ = δ̃ + γ:

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

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bayesso.curvature import CurvatureEngine
from bayesso.distributed import ProcessGrid
from bayesso.optim.accumulation import (
    MicroBatchSums,
    check_non_negative,
    check_positive,
    closure_loss,
    flat_gradient,
    recorded_batch_sizes,
    refuse_grad_scaler,
)
from bayesso.optim.atomic import atomic_step, check_candidate
from bayesso.optim.dropin import ParameterModel, require_bayesian_model
from bayesso.optim.empirical_bayes import PRIOR_GRANULARITIES, initialisation_prior, prior_precision_update
from bayesso.placement import converted, converted_sums, moved_generator
from bayesso.saved_state import check_count, check_keys, check_tensor

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["VIOptimizer"]

MOMENTUM_TYPES = ("raw", "adam")
CURVATURE_KINDS = ("fisher_emp", "fisher_mc", "ggn")


class VIOptimizer(torch.optim.Optimizer):
    """Natural-gradient VI for the posterior of a ``BayesianModel`` (a ``torch.optim.Optimizer``).

    Args:
        model: the ``BayesianModel``; its posterior's structure sets the statistic's.
        lr: α.
        curvature: the engine kind giving ĥ ("fisher_emp", "fisher_mc", "ggn").
        mc_samples: K weight samples per step.
        betas: (β1 momentum, β2 statistic), weights on the old value.
        momentum: "raw" (heavy ball on the gradient) or "adam" (EMA with bias correction).
        damping: external γ.
        prior_precision: δ, set on the posterior ("initialisation": P_m / ‖μ_m‖² per block).
        dataset_size: N, set on the posterior.
        temperature: τ, set on the posterior.
        augmentation_factor: ρ, N -> ρN under data augmentation.
        temperature_warmup: (τ0, steps): τ rises linearly from τ0 to ``temperature``.
        deterministic_batchnorm: batch-norm parameters are not sampled and have no prior.
        init_precision: initial statistic s0 (K-FAC: A = G = sqrt(s0) I); without it the first
            step is taken at the mean and the statistic starts at the first estimate. A posterior
            that already has a statistic (after ``fit_laplace`` or an earlier fit) keeps it.
        curv_interval: refresh the statistic every so many steps.
        inv_interval: refresh the statistic's decomposition every so many steps (stale in between, as
            K-FAC's inverses); None takes the posterior's ``default_inv_interval`` (full blocks: 10, else 1).
        accumulation_steps: micro-batches (equal sizes) per update; each draws fresh samples.
        skip_nonfinite: skip steps with a non-finite loss, gradient or statistic (counted in
            ``skipped_steps``) instead of raising ``FloatingPointError``.
        seed: seed of the generator for weight sampling, the same on every rank; MC labels use
            seed + 1 + rank (both saved in ``state_dict``).
        grid: a ``bayesso.distributed.ProcessGrid``: each step draws ``mc_samples`` x ``mc_groups``
            weight samples from the shared generator, this rank evaluates its MC slot's share, and
            gradients and curvature are reduced over all ranks (identical posteriors everywhere).
        kfac_approx: "expand" or "reduce" for K-FAC under weight sharing.
        kl_clip: κ, scales the mean's step by min(1, sqrt(κ / (α² vᵀ(S + λ)⁻¹v))) (none by default).
        learn_prior: "module" or "scalar": after every step δ is set to the ELBO's maximiser
            P / (‖μ‖² + tr Σ) per block or pooled (``bayesso.optim.empirical_bayes``); None keeps it.
    """

    prior_in_momentum = True  # the prior gradient δ̃μ enters the momentum (VOGN, Vadam) or is added after (IVON)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler.step calls step() directly, which refuses it

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
        inv_interval: int | None = None,
        accumulation_steps: int = 1,
        skip_nonfinite: bool = False,
        seed: int = 0,
        kfac_approx: str = "expand",
        grid: ProcessGrid | None = None,
        learn_prior: str | None = None,
        kl_clip: float | None = None,
    ) -> None:
        require_bayesian_model(model, type(self).__name__)
        if inv_interval is None:
            inv_interval = model.posterior.default_inv_interval
        check_non_negative("lr", lr)
        check_positive("mc_samples", mc_samples, integer=True)
        for name, value in (("curv_interval", curv_interval), ("inv_interval", inv_interval)):
            check_positive(name, value, integer=True)
        check_positive("accumulation_steps", accumulation_steps, integer=True)
        check_positive("augmentation_factor", augmentation_factor)
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
        ):
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
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        if learn_prior is not None and learn_prior not in PRIOR_GRANULARITIES:
            raise ValueError(f"learn_prior must be 'module', 'scalar' or None, got {learn_prior!r}")
        posterior = model.posterior
        with posterior.atomic():  # the posterior takes the options only if all of them are valid
            self._configure(posterior, temperature, damping, prior_precision, dataset_size, augmentation_factor)
            if deterministic_batchnorm:
                posterior.deterministic |= {
                    p.name for p in posterior.plans if isinstance(p.module, nn.modules.batchnorm._BatchNorm)
                }
            engine = None
            if curvature is not None:
                engine = CurvatureEngine(
                    model.module,
                    model.likelihood,
                    curvature,
                    posterior.curvature_structure,
                    modules=[plan.name for plan in posterior.plans],
                    kfac_approx=kfac_approx,
                )
            if init_precision is not None and not posterior.initialized:
                posterior.update_statistic(posterior.statistic.isotropic(init_precision))
        params = posterior.parameters
        groups = model.param_groups if isinstance(model, ParameterModel) else params  # one group per block there
        super().__init__(groups, {"lr": lr, "betas": tuple(betas)})
        self.model, self.posterior, self.engine = model, posterior, engine
        self.mc_samples, self.momentum_type = mc_samples, momentum
        self.curv_interval, self.inv_interval, self.accumulation_steps = curv_interval, inv_interval, accumulation_steps
        self.temperature_target, self.temperature_warmup = posterior.temperature, temperature_warmup
        self.skip_nonfinite, self.learn_prior, self.kl_clip = skip_nonfinite, learn_prior, kl_clip
        self.grid = grid or ProcessGrid()
        self.generator = torch.Generator(device=params[0].device).manual_seed(seed)
        self.label_generator = torch.Generator(device=params[0].device).manual_seed(seed + 1 + self.grid.rank)
        self._step, self.skipped_steps = 0, 0
        self._momentum: Tensor | None = None
        self._sums = MicroBatchSums()

    @staticmethod
    def _configure(posterior, temperature, damping, prior_precision, dataset_size, augmentation_factor) -> None:
        if temperature is not None:
            posterior.temperature = temperature
        if damping is not None:
            posterior.damping = damping
        if isinstance(prior_precision, str) and prior_precision == "initialisation":
            posterior.prior_precision = initialisation_prior(posterior)
        elif prior_precision is not None:
            posterior.prior_precision = prior_precision
        if dataset_size is not None:
            posterior.dataset_size = dataset_size * augmentation_factor
        elif posterior.dataset_size is None:
            raise ValueError("dataset_size is unknown: pass dataset_size=N here or to the BayesianModel")
        elif augmentation_factor != 1.0:
            posterior.dataset_size = posterior.dataset_size * augmentation_factor

    # ---- one step ------------------------------------------------------------------------------
    def step(self, closure=None) -> Tensor:
        """One natural-gradient VI step; returns the mean loss over the MC samples.

        All or nothing: if anything fails (the closure, a non-finite candidate, a decomposition,
        another rank), the posterior, the optimizer's state and its generators are as before.
        """
        return self._atomic_step(closure)

    def _atomic_step(self, closure) -> Tensor:
        """``step``'s work, for a subclass's ``step`` to build on (torch wraps each class's ``step`` with hooks)."""
        self.follow_module()
        return atomic_step(
            self,
            self.posterior,
            [self.generator, self.label_generator],
            lambda: self._evaluate(closure),
            "the posterior mean, statistic and step count",
            "If it recurs, the sampled weights are too noisy or the steps too long: raise prior_precision, lower "
            "the temperature, raise damping or lower lr (for K-FAC also inv_interval)",
        )

    def _apply_temperature(self) -> None:
        if self.temperature_warmup is None:
            return
        start, steps = self.temperature_warmup
        fraction = min(1.0, self._step / steps)
        self.posterior.temperature = start + (self.temperature_target - start) * fraction

    def _evaluate(self, closure):
        """Loss, mean gradient, summed curvature, sample statistic over the MC samples, and the batch size."""
        refuse_grad_scaler(self)
        if closure is None:
            raise ValueError(
                "VI optimizers evaluate the loss at sampled weights: step() needs a closure that zeroes the "
                "gradients, computes the batch-mean loss, calls backward() and returns the loss"
            )
        for group in self.param_groups:
            check_non_negative("lr", group["lr"])
        self._apply_temperature()
        posterior = self.posterior
        curvature_step = self.engine is not None and self._step % self.curv_interval == 0
        at_mean = not posterior.initialized
        scale = self._sampling_scale()
        losses, grads, curvature, estimates = [], [], None, []
        if at_mean:  # the first step without an initial precision is taken at the mean
            draws = [None]
        else:  # every rank draws the step's samples from the shared stream and evaluates its own
            total = self.mc_samples * self.grid.mc_groups
            draws = [posterior.sample_noise(1, self.generator) for _ in range(total)][self.grid.sample_slice(total)]
        with recorded_batch_sizes(self.model.module, self.accumulation_steps > 1) as sizes:
            for draw in draws:
                if draw is None:
                    eps, weights = None, nullcontext()
                else:
                    noise, eps = (t[0] for t in draw)
                    weights = posterior.perturbed(noise)
                with weights:
                    capture = self.engine.capture(self.label_generator) if curvature_step else nullcontext()
                    with torch.enable_grad(), capture:
                        loss = closure_loss(closure())
                    grad = flat_gradient([p for group in self.param_groups for p in group["params"]])
                    if curvature_step and torch.isfinite(loss):  # else the step is rejected
                        part = capture.curvature()
                        curvature = part if curvature is None else curvature + part
                losses.append(loss)
                grads.append(grad.to(posterior.dtype))
                estimates.append(self._sample_statistic(grads[-1], eps, scale))
        estimate = None if estimates[0] is None else _average(estimates)
        return _average(losses), _average(grads), curvature, estimate, sizes[0] if sizes else None

    def _sampling_scale(self) -> Tensor | None:
        """A quantity of the posterior, computed once per step before sampling, for ``_sample_statistic``."""
        return None

    def _sample_statistic(self, grad: Tensor, eps: Tensor | None, scale: Tensor | None) -> Tensor | None:
        """A statistic from the sampled gradient and its noise ε (None at the mean); None uses the engine."""
        return None

    def _prior_gradient(self, mean: Tensor) -> Tensor:
        """δ̃ μ per block (no prior for deterministic blocks)."""
        return mean * self.posterior.flat_damping()[1]

    def _update(self, grad: Tensor, curvature, estimate) -> None:
        """The statistic, then the mean; the new mean is checked before it is written.

        Every temporary is made once and then updated in place (docs/vi.md, "What a step costs").
        """
        posterior, group = self.posterior, self.param_groups[0]
        beta1, beta2 = group["betas"]
        if curvature is not None:
            posterior.update_statistic(curvature, beta2, refresh=self._step % self.inv_interval == 0, grid=self.grid)
        mean = posterior.mean()
        prior = self._prior_gradient(mean)  # a new tensor, free to be reused below
        direction = prior.add_(grad) if self.prior_in_momentum else grad
        previous, correction = self._momentum, 1.0
        if self.momentum_type == "raw":  # β1 m + d
            momentum = direction if previous is None else torch.add(direction, previous, alpha=beta1)
        else:  # β1 m + (1 - β1) d, bias-corrected
            momentum = direction * (1 - beta1) if previous is None else torch.lerp(direction, previous, beta1)
            correction = 1 / (1 - beta1 ** (self._step + 1))
        if not self.prior_in_momentum:  # v = corrected m + δ̃μ
            velocity = prior.add_(momentum, alpha=correction)
        elif correction != 1.0:  # direction (this step's tensor) is free again
            velocity = torch.mul(momentum, correction, out=direction)
        else:
            velocity = momentum
        new = self._moved_mean(mean, velocity, self._learning_rates())
        check_candidate(new, "update of the mean")
        posterior.set_mean(new)
        self._momentum = momentum
        if self.learn_prior is not None:
            posterior.prior_precision = prior_precision_update(posterior, self.learn_prior)

    def _moved_mean(self, mean: Tensor, velocity: Tensor, rates: float | Tensor) -> Tensor:
        """μ - α (S + λ)⁻¹ v, with the KL clip; ``mean`` is this step's copy and is overwritten."""
        if self.kl_clip is None and isinstance(rates, (int, float)) and self._plain_direction:
            flat = self.posterior._flat_diagonal()
            if flat is not None:  # one fused pass
                return mean.addcdiv_(velocity, flat[0], value=-rates)
        direction = self._direction(velocity)  # a new tensor
        step = direction.mul_(rates)
        if self.kl_clip is not None:  # α² vᵀ(S + λ)⁻¹v <= κ: the K-FAC trust region, in mean-loss units
            quadratic = velocity @ (step * rates) if isinstance(rates, Tensor) else (velocity @ step) * rates
            step.mul_((self.kl_clip / quadratic).sqrt_().clamp_(max=1.0))  # no host read
        return mean.sub_(step)

    _plain_direction = True  # _direction is the posterior's preconditioning alone

    def _learning_rates(self) -> float | Tensor:
        """α, the param group's lr (the drop-in IVON's groups give one per block)."""
        return self.param_groups[0]["lr"]

    def _direction(self, velocity: Tensor) -> Tensor:
        return self.posterior.precondition(velocity)

    def rescale(self, ratio: float) -> None:
        """The loss was multiplied by ``ratio`` (e.g. a Gaussian likelihood's σ² by 1/ratio): the curvature
        statistic and the momentum follow, exactly for Gauss-Newton and Fisher statistics."""
        posterior = self.posterior
        posterior.update_statistic(posterior.statistic * ratio, refresh=posterior.structure == "diag")
        if self._momentum is not None:
            self._momentum = self._momentum * ratio

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
        """Load ``state_dict`` output; everything is checked against this optimizer first, so a state
        from another architecture or optimizer is refused whole and changes nothing."""
        self.follow_module()
        if not isinstance(state_dict, dict) or "vi" not in state_dict:
            raise ValueError("the optimizer state has no 'vi' entry: it was not saved by a VIOptimizer")
        vi = state_dict["vi"]
        check_keys(vi, ("step", "skipped_steps", "momentum", "generator", "label_generator", "posterior"), "vi")
        check_count(vi["step"], "vi['step']")
        check_count(vi["skipped_steps"], "vi['skipped_steps']")
        if vi["momentum"] is not None:
            like = torch.empty(self.posterior.numel, dtype=self.posterior.dtype)
            check_tensor(vi["momentum"], like, "vi['momentum']")
        for name in ("generator", "label_generator"):
            check_tensor(vi[name], getattr(self, name).get_state(), f"vi[{name!r}]")
        self.posterior.check_state(vi["posterior"], "vi['posterior']")
        with self.posterior.atomic():  # torch checks the param groups before it changes them
            self.posterior.load_state_dict(vi["posterior"])
            super().load_state_dict({k: v for k, v in state_dict.items() if k != "vi"})
        self._step, self.skipped_steps = vi["step"], vi["skipped_steps"]
        device = self.posterior.parameters[0].device
        self._momentum = None if vi["momentum"] is None else vi["momentum"].to(device, copy=True)
        self.generator.set_state(vi["generator"])
        self.label_generator.set_state(vi["label_generator"])
        self._sums = MicroBatchSums()

    @property
    def accumulating(self) -> bool:
        """Whether micro-batches are waiting for the rest of their update (no ``state_dict`` then)."""
        return self._sums.count > 0

    def follow_module(self) -> None:
        """Move the momentum, micro-batch sums and generators, with the posterior, to where its parameters now are
        (``bayesso.placement``); ``step``, ``load_state_dict`` and ``BayesianModel.to`` call it. All or nothing.
        A generator that changes device is a new one there, seeded from a hash of its state."""
        device, dtype = self.posterior.placement()
        generators = [moved_generator(g, device) for g in (self.generator, self.label_generator)]
        momentum, sums = converted(self._momentum, device, dtype), converted_sums(self._sums, device, dtype)
        self.posterior.follow_module()
        self.generator, self.label_generator = generators
        self._momentum, self._sums = momentum, sums
        if self.engine is not None:
            self.engine.dtype = dtype


def _average(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(0)
