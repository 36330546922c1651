"""The VI presets VOGN, NoisyAdam and NoisyKFAC: ``VIOptimizer`` with the papers' choices as defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from bayesso.optim.dropin import require_bayesian_model
from bayesso.optim.vi import VIOptimizer
from bayesso.posteriors import KroneckerGaussian, MixedGaussian

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["VOGN", "NoisyAdam", "NoisyKFAC"]


class _Preset(VIOptimizer):
    """A ``VIOptimizer`` whose defaults are the class's ``preset`` (options given override them).

    Every preset starts from the initial precision h0 = 0.5 per example (``init_precision``, IVON's
    choice): the first samples are drawn close to the initial weights, and the statistic's EMA then
    moves to the data's curvature. Every preset bounds its steps by the trust region
    α² vᵀ(S + λ)⁻¹v <= κ = 1e-2 (``kl_clip``), without which a heteroscedastic likelihood's
    unbounded gradient in the log-variance made steps non-finite within 2 steps.
    ``BayesianModel.fit`` decays lr along a cosine over the run and, for regression, learns σ
    (``bayesso.training``); temperature and prior are the model's (τ = 1).
    The defaults were chosen on ``benchmarks/suite.py`` (8 tasks, 107 to 12,000 training examples).
    """

    preset: ClassVar[dict] = {}

    def __init__(self, model: BayesianModel, lr: float | None = None, **options) -> None:
        options = {"kl_clip": 1e-2, **self.preset, **options}
        if lr is not None:
            options["lr"] = lr
        super().__init__(model, **options)


class VOGN(_Preset):
    """Variational Online Gauss-Newton (Khan et al. 2018; Osawa et al. 2019).

    ĥ = per-example squared gradients at the sampled weights with the true labels
    (empirical Fisher, exact through the engine's rules), heavy-ball momentum on the
    raw gradient. Sampling std sqrt(τ / (N (s + δ̃ + γ))). Works with any posterior
    structure (a Kronecker posterior gives the K-FAC variant). Defaults: lr 3e-2,
    γ = 0.01, h0 = 0.5; the paper's ImageNet run used lr 1e-3 with γ = 1e-4 and τ = 1.
    """

    preset: ClassVar[dict] = {
        "lr": 3e-2,
        "init_precision": 0.5,
        "damping": 1e-2,
        "curvature": "fisher_emp",
        "momentum": "raw",
        "betas": (0.9, 0.999),
    }


class NoisyAdam(_Preset):
    """Noisy Adam (Zhang et al. 2018): MC-Fisher diagonal, Adam-style bias-corrected momentum.

    μ <- μ - α m̂ / (f + γ_in + γ_ex) with f the EMA of squared sampled-label gradients
    (no square root) and γ_in = τδ/N. Defaults: lr 0.3, γ_ex = 0.03, h0 = 0.5.
    """

    preset: ClassVar[dict] = {
        "lr": 0.3,
        "init_precision": 0.5,
        "damping": 3e-2,
        "curvature": "fisher_mc",
        "momentum": "adam",
        "betas": (0.9, 0.999),
    }


class NoisyKFAC(_Preset):
    """Noisy K-FAC (Zhang et al. 2018): matrix-normal posterior from MC-Fisher K-FAC factors.

    Needs ``posterior="kron"`` (or a per-module mapping); the paper's damping is the posterior's
    ``kfac_damping="factored"``.
    Factors refresh every ``curv_interval`` steps, their eigendecompositions every ``inv_interval``
    (default 10). Defaults: lr 5e-3, γ_ex = 0.03, β = (0.9, 0.99), h0 = 0.5 (A = G = sqrt(h0) I);
    without h0 the first factors come from one batch and the steps in their null space went
    non-finite within 11 steps on digits.
    """

    preset: ClassVar[dict] = {
        "lr": 5e-3,
        "init_precision": 0.5,
        "damping": 3e-2,
        "curvature": "fisher_mc",
        "momentum": "raw",
        "betas": (0.9, 0.99),
        "inv_interval": 10,
    }

    def __init__(self, model: BayesianModel, lr: float | None = None, **options) -> None:
        require_bayesian_model(model, "NoisyKFAC")
        if not isinstance(model.posterior, (KroneckerGaussian, MixedGaussian)):
            raise ValueError(
                f"NoisyKFAC needs a KroneckerGaussian (or per-module MixedGaussian) posterior, got "
                f"{type(model.posterior).__name__}"
            )
        super().__init__(model, lr, **options)
