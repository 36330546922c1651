"""IVON (Shen et al. 2024), implemented from its equations on top of ``VIOptimizer``."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from bayesso.optim.accumulation import check_positive
from bayesso.optim.presets import _Preset
from bayesso.posteriors import DiagonalGaussian

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["IVON", "ivon_hessian_update"]


def ivon_hessian_update(h: Tensor, estimate: Tensor, beta2: float, damping: Tensor) -> Tensor:
    """h <- β2 h + (1-β2) ĥ + ½(1-β2)²(h - ĥ)²/(h + λ), IVON's update for any estimate ĥ.

    With x = (1-β2)(h - ĥ)/(h + λ), h' + λ = (h + λ)(½ + ½(1 - x)²) >= (h + λ)/2: the precision
    h + λ stays positive, and so does h itself when λ = 0.
    """
    return beta2 * h + (1 - beta2) * estimate + 0.5 * (1 - beta2) ** 2 * (h - estimate).square() / (h + damping)


class IVON(_Preset):
    """Improved Variational Online Newton (Shen et al. 2024), implemented from its equations.

    ĥ = ĝ ∘ ε / σ (reparameterisation), h <- β2 h + (1-β2) ĥ + ½(1-β2)²(h - ĥ)²/(h + λ), which
    keeps h + λ > 0; μ <- μ - α clip((ḡ/(1-β1^t) + δ̃μ)/(h + λ), ±ξ). The effective sample size
    is the posterior's N and the weight decay δ̃ = τδ/N. Needs ``posterior="diag"``. Defaults
    lr 0.2, h0 0.5, β2 = 0.999, with the cosine decay of lr that ``fit`` applies (as in the paper):
    at a constant lr 0.2, h decays to the data's small curvature over a few thousand steps and the
    steps lr/h grow until the run diverges (7,000 examples, 60 epochs); the decay prevents it.
    The paper's large-data runs use β2 = 0.99999.
    Extra options: ``hess_init`` h0 (default 0.5) and ``clip_radius`` ξ (default no clipping).
    """

    preset: ClassVar[dict] = {"lr": 0.2, "betas": (0.9, 0.999), "deterministic_batchnorm": False, "momentum": "adam"}
    prior_in_momentum = False

    def __init__(
        self,
        model: BayesianModel,
        lr: float | None = None,
        *,
        hess_init: float = 0.5,
        clip_radius: float = float("inf"),
        **options,
    ) -> None:
        if not isinstance(model.posterior, DiagonalGaussian):
            raise ValueError(f"IVON needs a DiagonalGaussian posterior, got {type(model.posterior).__name__}")
        check_positive("hess_init", hess_init)
        if not clip_radius > 0:
            raise ValueError(f"clip_radius must be positive, got {clip_radius!r}")
        super().__init__(model, lr, curvature=None, init_precision=hess_init, **options)
        self.clip_radius = clip_radius

    def _sampling_scale(self) -> Tensor:
        """1/σ per parameter (0 where σ = 0), for ĥ = ĝ ε / σ."""
        variance = self.posterior.variance()
        return torch.where(variance > 0, variance.clamp_min(torch.finfo(variance.dtype).tiny).rsqrt(), 0)

    def _sample_statistic(self, grad: Tensor, eps: Tensor, scale: Tensor) -> Tensor:
        return grad * eps * scale

    def _update(self, grad: Tensor, curvature, estimate) -> None:
        posterior = self.posterior
        beta2 = self.param_groups[0]["betas"][1]
        block = posterior.statistic.blocks
        damping = torch.cat([lam.expand(p.numel) for lam, p in zip(posterior.block_damping(), posterior.plans)])
        h = torch.cat([block[p.name].values for p in posterior.plans])
        h = ivon_hessian_update(h, estimate, beta2, damping)
        slices = zip(posterior.plans, posterior.block_slices())
        updated = {p.name: block[p.name].with_tensors([h[where]]) for p, where in slices}
        posterior.update_statistic(posterior.statistic.with_blocks(updated))  # checked, and undone if the step fails
        super()._update(grad, None, None)

    def _direction(self, velocity: Tensor) -> Tensor:
        return super()._direction(velocity).clamp(-self.clip_radius, self.clip_radius)
