"""``SecondOrderOptimizer``: natural-gradient / K-FAC training from the curvature engine (docs/second_order.md §1).

One step, with F the curvature of the batch-MEAN loss (the engine's summed curvature / B):

    F_ema <- β F_ema + (1 - β) F                  every ``curv_interval`` steps (β weighs the OLD value)
    decompositions of F_ema + damping             every ``inv_interval`` steps (stale in between)
    p = (F_ema + (γ + λ) I)⁻¹ (∇L + λ θ)          γ = ``damping``, λ = ``weight_decay`` (L2 in the curvature)
    p <- ν p,  ν = min(1, sqrt(κ / (α² pᵀ(∇L + λθ))))   KL-clipping, with κ = ``kl_clip``
    v <- μ v + p;   θ <- θ - α v - α ω θ          μ = ``momentum``, ω = ``decoupled_weight_decay``

Per module block: K-FAC where the engine has a rule ("kron"), with noisy K-FAC's factored
Tikhonov damping (G + √γ/π I) ⊗ (A + π√γ I), π² = (tr A/dim A)/(tr G/dim G), or exact
eigenbasis damping G ⊗ A + γ I; the diagonal elsewhere; or "diag" / "full" blocks for all.
The preconditioner is a Gaussian "posterior" whose precision is the damped curvature, so it
shares the posteriors' eigenbases, stale decompositions and state_dict. PyTorch-SSO's and
ASDL's ``ema_decay`` is the weight on the NEW value: β = 1 - ema_decay.

The closure follows torch's convention: zero the gradients, run the model once on the
batch, compute the batch MEAN of the NLL, ``backward()``, return the loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from bayesso.curvature import CurvatureEngine
from bayesso.curvature.structures import Structure, check_structure
from bayesso.distributed import ProcessGrid
from bayesso.likelihoods import Likelihood, get_likelihood
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
from bayesso.placement import converted, converted_sums, moved_generator
from bayesso.posteriors import build_posterior
from bayesso.saved_state import check_count, check_keys, check_tensor

__all__ = ["SecondOrderOptimizer"]

KINDS = ("fisher_mc", "fisher_emp", "ggn")


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Deterministic second-order training of any ``nn.Module`` the engine supports.

    Args:
        module: the model.
        likelihood: its likelihood ("classification", "binary", "regression", ...).
        kind: curvature "fisher_mc" (K-FAC's usual 1-sample MC Fisher), "fisher_emp" or "ggn".
        structure: "kron" (K-FAC, diagonal for modules without a rule), "diag" or "full", or a mapping from module
            types and names to these (``MixedGaussian``), e.g. ``{nn.Conv2d: "kron", nn.BatchNorm2d: "diag"}``.
        lr: α. It and the next five live in the param group, so schedulers may change them
            (the step is in docs/second_order.md §1).
        damping: γ, added to the curvature.
        momentum: μ, heavy-ball momentum on the preconditioned step.
        weight_decay: L2 weight decay λ, inside the preconditioned gradient and the damping.
        decoupled_weight_decay: ω, θ <- θ - α ω θ outside the preconditioner.
        kl_clip: κ, bounds α² pᵀ(∇L + λθ) of the step p (None: no clipping).
        curv_interval: steps between curvature updates.
        inv_interval: steps between decompositions.
        beta: weight of the old curvature in its EMA.
        kfac_damping: "factored" or "exact".
        kfac_approx: "expand" or "reduce", K-FAC under weight sharing (docs/curvature.md §3).
        modules: optimise only these modules (names, objects, "last_layer"); others are left alone.
        mc_samples: label samples per example for "fisher_mc".
        accumulation_steps: micro-batches per update.
        skip_nonfinite: skip (and count) steps with NaN/inf instead of raising.
        seed: the generator for MC labels, seed + rank (saved in ``state_dict``).
        grid: a ``bayesso.distributed.ProcessGrid``: each rank steps on its own data shard; gradients
            are averaged on every step and curvature summed on curvature steps, over all ranks.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler.step calls step() directly, which refuses it

    def __init__(
        self,
        module: nn.Module,
        likelihood: str | Likelihood,
        kind: str = "fisher_mc",
        structure: Structure = "kron",
        lr: float = 1e-2,
        damping: float = 1e-3,
        curv_interval: int = 1,
        inv_interval: int = 1,
        beta: float = 0.95,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decoupled_weight_decay: float = 0.0,
        kl_clip: float | None = 1e-3,
        kfac_damping: str = "factored",
        modules: Iterable[str | nn.Module] | str | None = None,
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        accumulation_steps: int = 1,
        skip_nonfinite: bool = False,
        seed: int = 0,
        grid: ProcessGrid | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"SecondOrderOptimizer needs the nn.Module, got {type(module).__name__}: its curvature comes from "
                "hooks on the module's layers while step(closure) runs; pass SecondOrderOptimizer(net, likelihood)"
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        check_structure(structure)
        for name, value in [("curv_interval", curv_interval), ("inv_interval", inv_interval),
                            ("mc_samples", mc_samples), ("accumulation_steps", accumulation_steps)]:  # fmt: skip
            check_positive(name, value, integer=True)
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1) (the weight of the old curvature), got {beta!r}")
        defaults = {"lr": lr, "damping": damping, "momentum": momentum, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "kl_clip": kl_clip}  # fmt: skip
        _check_group(defaults)
        options = {"kfac_damping": kfac_damping} if structure == "kron" or not isinstance(structure, str) else {}
        self.preconditioner = build_posterior(module, structure, dataset_size=1, modules=modules, **options)
        self.preconditioner.deterministic = {plan.name for plan in self.preconditioner.plans}  # no prior term
        super().__init__(self.preconditioner.parameters, defaults)
        self.module, self.likelihood = module, get_likelihood(likelihood)
        names = [plan.name for plan in self.preconditioner.plans]
        self.engine = CurvatureEngine(
            module,
            self.likelihood,
            kind,
            self.preconditioner.curvature_structure,
            modules=names,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
        )
        self.curv_interval, self.inv_interval, self.beta = curv_interval, inv_interval, beta
        self.accumulation_steps, self.skip_nonfinite = accumulation_steps, skip_nonfinite
        self.grid = grid or ProcessGrid()
        device = self.preconditioner.parameters[0].device
        self.generator = torch.Generator(device=device).manual_seed(seed + self.grid.rank)
        self._step, self.skipped_steps, self._stale = 0, 0, False
        self._momentum: Tensor | None = None
        self._sums = MicroBatchSums()

    def step(self, closure=None) -> Tensor:
        """One micro-batch through ``closure``; every ``accumulation_steps``-th call updates the weights.

        All or nothing: if anything fails (the closure, a non-finite candidate, a decomposition,
        another rank), the weights and the optimizer's state are as before.
        """
        self.follow_module()
        return atomic_step(
            self,
            self.preconditioner,
            [self.generator],
            lambda: self._evaluate(closure),
            "weights, curvature and step count",
            "If it recurs, raise damping or lower lr",
        )

    def _evaluate(self, closure):
        refuse_grad_scaler(self)
        if closure is None:
            raise ValueError(
                "SecondOrderOptimizer records the curvature of the closure's forward: step() needs a closure that "
                "zeroes the gradients, computes the batch-mean loss, calls backward() and returns the loss"
            )
        _check_group(self.param_groups[0])
        curvature_step = self._step % self.curv_interval == 0
        capture = self.engine.capture(self.generator) if curvature_step else nullcontext()
        with recorded_batch_sizes(self.module, self.accumulation_steps > 1) as sizes, torch.enable_grad(), capture:
            loss = closure_loss(closure())
        grad = flat_gradient(self.preconditioner.parameters).to(self.preconditioner.dtype)
        curvature = capture.curvature() if curvature_step and torch.isfinite(loss) else None
        return loss, grad, curvature, None, sizes[0] if sizes else None

    def _update(self, grad: Tensor, curvature, _estimate=None) -> None:
        """The curvature EMA and decompositions, then the weights, which are checked before they are written."""
        group, preconditioner = self.param_groups[0], self.preconditioner
        refresh = self._step % self.inv_interval == 0
        if curvature is not None:
            beta = self.beta if preconditioner.initialized else 0.0
            preconditioner.update_statistic(curvature, beta, refresh=refresh, grid=self.grid)
            self._stale = not refresh
        elif refresh and self._stale:
            preconditioner.refresh(self.grid)
            self._stale = False
        theta = preconditioner.mean()
        decay = group["weight_decay"]
        direction = grad + decay * theta if decay else grad
        preconditioner.damping = group["damping"] + decay
        step = preconditioner.precondition(direction)
        if group["kl_clip"] is not None:
            step = step * self.kl_scale(step, direction)
        momentum = self._momentum
        if group["momentum"]:
            momentum = step if momentum is None else momentum * group["momentum"] + step
            step = momentum
        new = theta - group["lr"] * step
        if group["decoupled_weight_decay"]:
            new = new - group["lr"] * group["decoupled_weight_decay"] * theta
        check_candidate(new, "update of the weights")
        preconditioner.set_mean(new)
        self._momentum = momentum

    def kl_scale(self, step: Tensor, direction: Tensor) -> float:
        """ν = min(1, sqrt(κ / (α² stepᵀ direction))): caps the step's approximate KL change at κ."""
        group = self.param_groups[0]
        quadratic = float(step @ direction) * group["lr"] ** 2
        return 1.0 if quadratic <= group["kl_clip"] else math.sqrt(group["kl_clip"] / quadratic)

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Param groups plus the curvature EMA, its decompositions, momentum, step and generator."""
        self._sums.ensure_empty()
        state = super().state_dict()
        state["second_order"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "stale": self._stale,
            "momentum": None if self._momentum is None else self._momentum.clone(),
            "generator": self.generator.get_state(),
            "preconditioner": self.preconditioner.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load ``state_dict`` output; everything is checked against this optimizer first, so a state
        from another architecture or optimizer is refused whole and changes nothing."""
        self.follow_module()
        if not isinstance(state_dict, dict) or "second_order" not in state_dict:
            raise ValueError("the optimizer state has no 'second_order' entry: not saved by a SecondOrderOptimizer")
        saved = state_dict["second_order"]
        keys = ("step", "skipped_steps", "stale", "momentum", "generator", "preconditioner")
        check_keys(saved, keys, "second_order")
        check_count(saved["step"], "second_order['step']")
        check_count(saved["skipped_steps"], "second_order['skipped_steps']")
        if not isinstance(saved["stale"], bool):
            raise ValueError(f"second_order['stale'] must be True or False, got {saved['stale']!r}")
        numel, dtype = self.preconditioner.numel, self.preconditioner.dtype
        if saved["momentum"] is not None:
            check_tensor(saved["momentum"], torch.empty(numel, dtype=dtype), "second_order['momentum']")
        check_tensor(saved["generator"], self.generator.get_state(), "second_order['generator']")
        self.preconditioner.check_state(saved["preconditioner"], "second_order['preconditioner']")
        with self.preconditioner.atomic():  # torch checks the param groups before it changes them
            self.preconditioner.load_state_dict(saved["preconditioner"])
            super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self._step, self.skipped_steps, self._stale = saved["step"], saved["skipped_steps"], saved["stale"]
        device = self.preconditioner.parameters[0].device
        self._momentum = None if saved["momentum"] is None else saved["momentum"].to(device, copy=True)
        self.generator.set_state(saved["generator"])
        self._sums = MicroBatchSums()

    def follow_module(self) -> None:
        """Move the momentum, micro-batch sums and generator, with the preconditioner, to where the parameters now
        are (``bayesso.placement``); ``step`` and ``load_state_dict`` call it. All or nothing. A generator that
        changes device is a new one there, seeded from a hash of its state."""
        device, dtype = self.preconditioner.placement()
        generator = moved_generator(self.generator, device)
        momentum, sums = converted(self._momentum, device, dtype), converted_sums(self._sums, device, dtype)
        self.preconditioner.follow_module()
        self.generator, self._momentum, self._sums = generator, momentum, sums
        self.engine.dtype = dtype


def _check_group(group: dict) -> None:
    """ValueError naming the hyperparameter (checked at construction and before every step)."""
    check_non_negative("lr", group["lr"])
    for name in ("damping", "weight_decay", "decoupled_weight_decay"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be non-negative and finite, got {value!r}")
    momentum = group["momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if group["kl_clip"] is not None:
        check_positive("kl_clip", group["kl_clip"])
