"""IVON (Shen et al. 2024), implemented from its equations on top of ``VIOptimizer``; also a drop-in optimizer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from bayesso.optim.accumulation import check_non_negative, check_positive, flat_gradient
from bayesso.optim.dropin import ParameterModel, parameter_model
from bayesso.optim.presets import _Preset
from bayesso.optim.vi import _average
from bayesso.posteriors import DiagonalGaussian, Posterior

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["IVON", "ivon_hessian_update"]

# Options of the BayesianModel form that ess and weight_decay replace, or that do not apply, in the drop-in form.
DROPIN_REFUSED = ("dataset_size", "prior_precision", "augmentation_factor", "learn_prior", "grid")


def ivon_hessian_update(h: Tensor, estimate: Tensor, beta2: float, damping: Tensor) -> Tensor:
    """h <- β2 h + (1-β2) ĥ + ½(1-β2)²(h - ĥ)²/(h + λ), IVON's update for any estimate ĥ.

    With x = (1-β2)(h - ĥ)/(h + λ), h' + λ = (h + λ)(½ + ½(1 - x)²) >= (h + λ)/2: the precision
    h + λ stays positive, and so does h itself when λ = 0.
    """
    difference = h - estimate
    updated = torch.add(estimate, difference, alpha=beta2)  # β2 h + (1-β2) ĥ
    return updated.add_(difference.square_().div_(h + damping), alpha=0.5 * (1 - beta2) ** 2)


class IVON(_Preset):
    """Improved Variational Online Newton (Shen et al. 2024), implemented from its equations.

    ĥ = ĝ ∘ ε / σ (reparameterisation), h <- β2 h + (1-β2) ĥ + ½(1-β2)²(h - ĥ)²/(h + λ), which
    keeps h + λ > 0; μ <- μ - α clip((ḡ/(1-β1^t) + δ̃μ)/(h + λ), ±ξ). The effective sample size
    is the posterior's N and the weight decay δ̃ = τδ/N. Needs ``posterior="diag"``. Defaults
    lr 0.2, h0 0.5, β2 = 0.999, with the cosine decay of lr that ``fit`` applies (as in the paper):
    at a constant lr 0.2, h decays to the data's small curvature over a few thousand steps and the
    steps lr/h grow until the run diverges (7,000 examples, 60 epochs); the decay prevents it.
    The paper's large-data runs use β2 = 0.99999.
    Extra options: ``hess_init`` h0 (default 0.5), ``clip_radius`` ξ (default no clipping) and
    ``beta1``, ``beta2`` (the two ``betas``).

    Two forms, one update. ``IVON(model)`` on a ``BayesianModel``; or the drop-in form of ivon-opt,
    ``IVON(net.parameters(), lr, ess=N, weight_decay=...)`` or param groups that may set their own
    ``lr`` and ``weight_decay`` (``bayesso.optim.dropin``): ``ess`` is N, ``weight_decay`` is δ/N
    (default 1/N: δ = 1), read from the groups at every step. Both forms step with ``step(closure)``,
    or with ``sampled_params(train=True)`` around each of ``mc_samples`` forward-backward passes and
    a closure-free ``step()``. ivon-opt's lr ℓ is α = ℓ (h0 + weight_decay) here (its ``rescale_lr``);
    its other defaults are h0 = 1, β2 = 0.99999, weight_decay 1e-4 and no ``kl_clip``.
    """

    preset: ClassVar[dict] = {"lr": 0.2, "betas": (0.9, 0.999), "deterministic_batchnorm": False, "momentum": "adam"}
    prior_in_momentum = False
    _step_supports_amp_scaling = True  # torch.amp.GradScaler.step leaves the unscaling to ``step``

    def __init__(
        self,
        params: BayesianModel | Iterable[nn.Parameter] | Iterable[dict],
        lr: float | None = None,
        *,
        ess: float | None = None,
        weight_decay: float | None = None,
        hess_init: float = 0.5,
        clip_radius: float = float("inf"),
        beta1: float | None = None,
        beta2: float | None = None,
        **options,
    ) -> None:
        check_positive("hess_init", hess_init)
        if not clip_radius > 0:
            raise ValueError(f"clip_radius must be positive, got {clip_radius!r}")
        if beta1 is not None or beta2 is not None:
            if "betas" in options:
                raise ValueError("pass either betas or beta1/beta2, not both")
            default = self.preset["betas"]
            options["betas"] = (default[0] if beta1 is None else beta1, default[1] if beta2 is None else beta2)
        if isinstance(params, nn.Module):
            raise ValueError(
                f"IVON got an nn.Module ({type(params).__name__}): pass its parameters, "
                "IVON(net.parameters(), lr=..., ess=N), or a BayesianModel"
            )
        if isinstance(getattr(params, "posterior", None), Posterior):
            for name, value in (("ess", ess), ("weight_decay", weight_decay)):
                if value is not None:
                    raise ValueError(
                        f"{name} is for the drop-in form IVON(net.parameters(), ...); a BayesianModel's N and δ "
                        "are its dataset_size and prior_precision"
                    )
            model = params
        else:
            refused = [name for name in DROPIN_REFUSED if name in options]
            if refused:
                raise ValueError(
                    f"{refused[0]} does not apply to the drop-in form IVON(params, ...): ess sets N and "
                    "weight_decay sets δ = weight_decay · ess (use a BayesianModel for the other options)"
                )
            if ess is None:
                raise ValueError("the drop-in form IVON(params, ...) needs ess=N, the number of training examples")
            model = parameter_model(params, ess, weight_decay)
        if not isinstance(model.posterior, DiagonalGaussian):
            raise ValueError(f"IVON needs a DiagonalGaussian posterior, got {type(model.posterior).__name__}")
        super().__init__(model, lr, curvature=None, init_precision=hess_init, **options)
        self.clip_radius = clip_radius
        self.dropin = isinstance(model, ParameterModel)
        self._recorded: list[tuple[Tensor, Tensor]] = []  # (gradient, ĥ) of each sampled_params(train=True)
        self._sampling = False

    # ---- the drop-in loop --------------------------------------------------------------------
    @contextmanager
    def sampled_params(self, train: bool = False, generator: torch.Generator | None = None) -> Iterator[None]:
        """One posterior sample in the parameters; the mean is restored bit-exactly on exit, also if the body raises.

        ``train=True``: the sample comes from the optimizer's generator and, when the body ends, the
        gradient its backward left in ``.grad`` is recorded with the sample's noise for the next
        closure-free ``step()`` (a body that raises records nothing and leaves the generator as it was).
        ``train=False``: a sample for prediction from ``generator`` (default: torch's global one).
        """
        if self._sampling:
            raise ValueError("sampled_params blocks cannot be nested: the parameters already hold a sample")
        if train and self.grid.active:
            raise ValueError("with a process grid, step with step(closure): it draws each rank's share of the samples")
        self.follow_module()
        self._read_weight_decay()
        self._apply_temperature()
        posterior, state = self.posterior, self.generator.get_state()
        scale = self._sampling_scale() if train else None
        noise, eps = posterior.sample_noise(1, self.generator if train else generator)
        self._sampling = True
        try:
            with posterior.perturbed(noise[0]):
                yield
            sample = self._sample(eps[0], scale) if train else None
        except BaseException:
            self.generator.set_state(state)
            raise
        finally:
            self._sampling = False
        if train:
            self._recorded = [*self._recorded, sample]

    def _sample(self, eps: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """(ĝ, ĥ) of one sample from the ``.grad`` its backward left, as ``step(closure)`` computes them."""
        params = [p for group in self.param_groups for p in group["params"]]
        if all(p.grad is None for p in params):
            raise ValueError("sampled_params(train=True) found no gradient: call loss.backward() inside the block")
        grad = flat_gradient(params).to(self.posterior.dtype)
        return grad, self._sample_statistic(grad, eps, scale)

    def step(self, closure=None) -> Tensor | None:
        """One update: from ``closure`` (returns the mean loss) or from the recorded samples (returns None).

        All or nothing, as ``VIOptimizer.step``; a step that finds a non-finite sample has used its
        samples. Under ``torch.amp.GradScaler.step(optimizer)`` (closure-free only) the recorded
        gradients are divided by the scale here, and a step whose scaled gradients overflowed is
        skipped and counted in ``skipped_steps``, as torch's optimizers skip it.
        """
        try:
            if closure is None and getattr(self, "found_inf", None) is not None and float(self.found_inf):
                self._check_recorded()
                self._recorded, self.skipped_steps = [], self.skipped_steps + 1
                return None
            loss = self._atomic_step(closure)
        except BaseException:
            for name in ("grad_scale", "found_inf"):  # GradScaler.step removes them only after a step that returns
                self.__dict__.pop(name, None)
            raise
        return None if closure is None else loss

    def _check_recorded(self) -> None:
        """ValueError unless the samples recorded for a closure-free step are ready for it."""
        if self._sampling:
            raise ValueError("step() was called inside a sampled_params block: call it after the block")
        if hasattr(self, "found_inf") and self.grad_scale is None:
            raise ValueError(
                "scaler.unscale_(optimizer) is not supported with IVON: it unscales only the last sample's .grad, "
                "after the samples were recorded; call scaler.step(optimizer) alone, which IVON unscales itself"
            )
        count = len(self._recorded)
        if count == 0:
            raise ValueError(
                "step() without a closure updates from the samples that `with optimizer.sampled_params(train=True):` "
                "records around the forward and backward, and none were recorded since the last step; record "
                "mc_samples of them, or pass a closure"
            )
        if count != self.mc_samples:
            raise ValueError(
                f"step() found {count} samples recorded by sampled_params(train=True), but mc_samples="
                f"{self.mc_samples}: record one per MC sample, or pass mc_samples={count}"
            )

    def _evaluate(self, closure):
        if closure is not None:
            if self._recorded or self._sampling or hasattr(self, "found_inf"):
                raise ValueError(
                    "step(closure) evaluates its own samples: call it outside sampled_params blocks, without samples "
                    "recorded by sampled_params(train=True) waiting, and not through torch.amp.GradScaler"
                )
            self._read_weight_decay()
            return super()._evaluate(closure)
        self._check_recorded()
        for group in self.param_groups:
            check_non_negative("lr", group["lr"])
        self._read_weight_decay()
        grad, estimate = (_average(list(parts)) for parts in zip(*self._recorded))
        self._recorded = []
        scale = getattr(self, "grad_scale", None)  # torch.amp.GradScaler's, while its step() calls this one
        if scale is not None:
            grad, estimate = grad / scale.to(grad), estimate / scale.to(grad)
        return torch.zeros((), dtype=grad.dtype), grad, None, estimate, None  # no loss is known without a closure

    def _read_weight_decay(self) -> None:
        """Drop-in form: group i's weight_decay sets block i's δ = weight_decay · N (read at every step)."""
        if not self.dropin:
            return
        for index, group in enumerate(self.param_groups):
            check_positive(f"param group {index}: weight_decay", group["weight_decay"])
        posterior = self.posterior
        values = torch.tensor(
            [g["weight_decay"] * posterior.dataset_size for g in self.param_groups], dtype=posterior.dtype
        )
        if not torch.equal(values, posterior.prior_precision.cpu()):
            posterior.prior_precision = values

    def _learning_rates(self) -> float | Tensor:
        """α: the param groups' lr when they agree, else each group's lr over its block (P,)."""
        if len({float(group["lr"]) for group in self.param_groups}) == 1:
            return super()._learning_rates()
        posterior = self.posterior
        device = posterior.parameters[0].device
        return torch.cat([
            torch.full((where.stop - where.start,), float(group["lr"]), dtype=posterior.dtype, device=device)
            for group, where in zip(self.param_groups, posterior.block_slices())
        ])  # fmt: skip

    # ---- the update ----------------------------------------------------------------------------
    def _sampling_scale(self) -> Tensor:
        """1/σ per parameter (0 where σ = 0), for ĥ = ĝ ε / σ: with σ = (c e)^(-1/2), 1/σ = c e σ (c = N/τ)."""
        values, std = self.posterior._flat_diagonal()
        return torch.mul(values, std).mul_(self.posterior._scale())

    def _sample_statistic(self, grad: Tensor, eps: Tensor, scale: Tensor) -> Tensor:
        return torch.mul(grad, eps).mul_(scale)

    def _update(self, grad: Tensor, curvature, estimate) -> None:
        posterior = self.posterior
        beta2 = self.param_groups[0]["betas"][1]
        block = posterior.statistic.blocks
        damping = posterior.flat_damping()[0]
        h = torch.cat([block[p.name].values for p in posterior.plans])
        h = ivon_hessian_update(h, estimate, beta2, damping)
        slices = zip(posterior.plans, posterior.block_slices())
        updated = {p.name: block[p.name].with_tensors([h[where]]) for p, where in slices}
        posterior.update_statistic(posterior.statistic.with_blocks(updated))  # checked, and undone if the step fails
        super()._update(grad, None, None)

    @property
    def _plain_direction(self) -> bool:
        return self.clip_radius == float("inf")

    def _direction(self, velocity: Tensor) -> Tensor:
        direction = super()._direction(velocity)
        if self._plain_direction:  # clamping to ±inf changes nothing
            return direction
        return direction.clamp(-self.clip_radius, self.clip_radius)

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """As ``VIOptimizer.state_dict``; refused while recorded samples wait for their step."""
        if self._recorded:
            raise RuntimeError(
                "state_dict() while samples recorded by sampled_params(train=True) wait; save after step()"
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``VIOptimizer.load_state_dict``; recorded samples that were waiting are dropped."""
        super().load_state_dict(state_dict)
        self._recorded = []
