"""Likelihoods: summed negative log-likelihood, label sampling and the loss Hessian.

Every likelihood works on model outputs ``f`` with the batch in dimension 0 and
returns quantities for the SUMMED negative log-likelihood ``sum_i l_i`` (never the
mean). For the curvature engine each also gives

- ``gradient(f, y)``: d l_i / d f_i, shaped like ``f``;
- ``sample(f)``: labels drawn from the model's predictive p(y | f) (MC Fisher);
- ``hessian_sqrt(f)``: S_i with S_i S_i^T = Lambda_i = d^2 l_i / d f_i^2, shaped
  (B, O, K) where O is the number of outputs per example (exact GGN); where that
  Hessian depends on y, its expectation E_y[d^2 l_i / d f_i^2], the Fisher.

``Heteroscedastic``: outputs (B, 2D) are D means μ, then D log-variances s = log σ²;
targets (B, D); l_i = Σ_d ½[(y - μ)² e^{-s} + s + log 2π]. Its gradient is (μ - y) e^{-s}
for μ and ½[1 - (y - μ)² e^{-s}] for s; the Fisher in (μ, s) is diag(e^{-s}, ½), with root
diag(e^{-s/2}, 1/√2). It is the GGN of the network composed with the map D to the natural
parameters η = (μ/σ², -1/(2σ²)), in which l is convex: J_ηᵀ F_η J_η = Jᵀ Dᵀ F_η D J = Jᵀ F_(μ,s) J.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Binary", "Classification", "Heteroscedastic", "Likelihood", "Regression", "get_likelihood"]


class Likelihood(ABC):
    """A per-example likelihood p(y | f) whose NLL is summed over the batch."""

    name: str

    def check_targets(self, targets: Tensor) -> None:
        """Check what can be checked about ``targets`` before the forward pass."""
        if not isinstance(targets, Tensor):
            raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
        if targets.ndim == 0 or targets.shape[0] == 0:
            raise ValueError(f"targets must have a non-empty batch dimension, got shape {tuple(targets.shape)}")

    def check(self, outputs: Tensor, targets: Tensor, require_finite: bool = True) -> None:
        """Raise ``ValueError`` if ``targets`` do not fit ``outputs`` (type, shape, support).

        Non-finite outputs raise ``FloatingPointError`` (unless ``require_finite=False``, for
        callers that handle them themselves, such as optimizers that skip such steps).
        """
        if not isinstance(outputs, Tensor):
            raise ValueError(f"the module must return a tensor of outputs, got {type(outputs).__name__}")
        self._check(outputs, targets)
        if require_finite and not torch.isfinite(outputs).all():
            raise FloatingPointError("the model outputs contain NaN or infinite values")

    @abstractmethod
    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        """Likelihood-specific shape and support checks."""

    @abstractmethod
    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed negative log-likelihood, a scalar."""

    @abstractmethod
    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example gradient d l_i / d f_i, shaped like ``outputs``."""

    @abstractmethod
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from p(y | f_i), one per example."""

    @abstractmethod
    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """S of shape (B, O, K) with S_i S_i^T = d^2 l_i / d f_i^2 (O outputs per example)."""

    def hessian(self, outputs: Tensor) -> Tensor:
        """Output Hessian Lambda_i of shape (B, O, O)."""
        root = self.hessian_sqrt(outputs)
        return root @ root.transpose(-1, -2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_batch(outputs: Tensor, targets: Tensor) -> None:
    if outputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"targets have batch size {targets.shape[0]} but the model outputs have batch size {outputs.shape[0]}"
        )


class Classification(Likelihood):
    """Categorical likelihood on logits (B, C) with integer targets (B,) in [0, C)."""

    name = "classification"

    def check_targets(self, targets: Tensor) -> None:
        super().check_targets(targets)
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ValueError(
                f"classification targets must be integer class indices, got dtype {targets.dtype} "
                "(convert them with y.long())"
            )
        if targets.ndim != 1:
            raise ValueError(f"classification targets must have shape (B,), got {tuple(targets.shape)}")
        low = int(targets.min())
        if low < 0:
            raise ValueError(f"classification targets must be in [0, C), got target {low}")

    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        if outputs.ndim != 2:
            raise ValueError(f"classification outputs must be logits of shape (B, C), got {tuple(outputs.shape)}")
        _check_batch(outputs, targets)
        high = int(targets.max())
        if high >= outputs.shape[1]:
            raise ValueError(f"classification targets must be in [0, C) with C={outputs.shape[1]}, got target {high}")

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="sum")

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        grad = torch.softmax(outputs, dim=1)
        grad[torch.arange(len(targets), device=targets.device), targets] -= 1
        return grad

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().float(), dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        # diag(p) - p p^T = S S^T with S = diag(sqrt p) - p sqrt(p)^T, because sum(p) = 1.
        probs = torch.softmax(outputs, dim=1)
        root_p = probs.sqrt()
        return torch.diag_embed(root_p) - probs.unsqueeze(2) * root_p.unsqueeze(1)


def _binary_logits(outputs: Tensor) -> Tensor:
    """Logits of shape (B,) from outputs of shape (B,) or (B, 1)."""
    if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
        return outputs.reshape(-1)
    raise ValueError(f"binary outputs must be one logit per example, shape (B,) or (B, 1), got {tuple(outputs.shape)}")


class Binary(Likelihood):
    """Bernoulli likelihood on one logit per example; targets in {0, 1}."""

    name = "binary"

    def check_targets(self, targets: Tensor) -> None:
        super().check_targets(targets)
        if targets.numel() != targets.shape[0]:
            raise ValueError(f"binary targets must have shape (B,) or (B, 1), got {tuple(targets.shape)}")
        bad = targets[(targets != 0) & (targets != 1)]
        if bad.numel():
            raise ValueError(f"binary targets must be 0 or 1, got {bad.flatten()[0].item()}")

    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        _binary_logits(outputs)
        _check_batch(outputs, targets)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = _binary_logits(outputs)
        return F.binary_cross_entropy_with_logits(logits, targets.reshape(-1).to(logits.dtype), reduction="sum")

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.sigmoid(outputs) - targets.reshape(outputs.shape).to(outputs.dtype)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(outputs.detach().float()), generator=generator).reshape(outputs.shape[0])

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        probs = torch.sigmoid(_binary_logits(outputs))
        return (probs * (1 - probs)).sqrt().reshape(-1, 1, 1)


def _check_real(targets: Tensor, name: str) -> None:
    if not targets.dtype.is_floating_point:
        raise ValueError(f"{name} targets must be floating point, got dtype {targets.dtype}")
    if not torch.isfinite(targets).all():
        raise ValueError(f"{name} targets must be finite, got a NaN or infinite target")


class Regression(Likelihood):
    """Gaussian likelihood N(y | f, sigma^2 I) on outputs (B,) or (B, D).

    The summed NLL includes the normaliser: sum_i ||y_i - f_i||^2 / (2 sigma^2) + (O/2) log(2 pi sigma^2)
    with O outputs per example. ``sigma`` may be a tensor that requires grad.
    """

    name = "regression"

    def __init__(self, sigma: float | Tensor = 1.0) -> None:
        value = float(sigma.detach()) if isinstance(sigma, Tensor) else float(sigma)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"sigma must be a positive finite number, got {value}")
        self.sigma = sigma

    @property
    def sigma_value(self) -> float:
        """σ as a Python float (detached, never rounded through float32)."""
        return float(self.sigma.detach()) if isinstance(self.sigma, Tensor) else float(self.sigma)

    def check_targets(self, targets: Tensor) -> None:
        super().check_targets(targets)
        _check_real(targets, self.name)

    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        _check_batch(outputs, targets)
        if targets.shape != outputs.shape:
            hint = " (add the output dimension with y.unsqueeze(-1))" if targets.shape == outputs.shape[:-1] else ""
            raise ValueError(
                f"regression targets must have the outputs' shape {tuple(outputs.shape)}, got {tuple(targets.shape)}"
                f"{hint}; targets of another shape would broadcast against the outputs"
            )

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        sigma = torch.as_tensor(self.sigma, dtype=outputs.dtype, device=outputs.device)
        squared = (targets.to(outputs.dtype) - outputs).square().sum()
        return squared / (2 * sigma**2) + 0.5 * outputs.numel() * torch.log(2 * math.pi * sigma**2)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs - targets.to(outputs.dtype)) / self._variance(outputs)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device)
        return outputs.detach() + noise * self._variance(outputs).sqrt()

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        n_out = outputs[0].numel()
        eye = torch.eye(n_out, dtype=outputs.dtype, device=outputs.device) / self._variance(outputs).sqrt()
        return eye.expand(outputs.shape[0], n_out, n_out)

    def _variance(self, outputs: Tensor) -> Tensor:
        sigma = torch.as_tensor(self.sigma, dtype=outputs.dtype, device=outputs.device).detach()
        return sigma**2

    def __repr__(self) -> str:
        return f"Regression(sigma={float(torch.as_tensor(self.sigma))})"


class Heteroscedastic(Likelihood):
    """Gaussian likelihood N(y | μ, e^s) whose mean μ and log-variance s = log σ² are network outputs.

    Outputs (B, 2D): D means, then D log-variances ((B, 2) for one target); targets (B, D).
    Summed NLL Σ_i Σ_d ½[(y - μ)² e^{-s} + s + log 2π]; ``hessian_sqrt`` is the root of the Fisher
    diag(e^{-s}, ½), the GGN through the natural parameters (see the module docstring).
    """

    name = "heteroscedastic"

    def check_targets(self, targets: Tensor) -> None:
        super().check_targets(targets)
        _check_real(targets, self.name)
        if targets.ndim != 2:
            hint = " (add the target dimension with y.unsqueeze(-1))" if targets.ndim == 1 else ""
            raise ValueError(f"heteroscedastic targets must have shape (B, D), got {tuple(targets.shape)}{hint}")

    def check_outputs(self, outputs: Tensor) -> None:
        """Raise ``ValueError`` unless ``outputs`` are (B, 2D) with D ≥ 1."""
        if outputs.ndim != 2:
            raise ValueError(f"{_LAYOUT}, got {tuple(outputs.shape)}")
        self.split(outputs)

    def split(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, s), each (..., D), from outputs (..., 2D): (B, 2D), or draws (S, B, 2D)."""
        if outputs.ndim < 2 or outputs.shape[-1] == 0 or outputs.shape[-1] % 2:
            raise ValueError(f"{_LAYOUT}, got {tuple(outputs.shape)}")
        mean, log_variance = outputs.chunk(2, dim=-1)
        return mean, log_variance

    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        self.check_outputs(outputs)
        _check_batch(outputs, targets)
        expected = (outputs.shape[0], outputs.shape[1] // 2)
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"heteroscedastic targets must have shape (B, D) = {expected} for outputs (B, 2D) = "
                f"{tuple(outputs.shape)}, got {tuple(targets.shape)}"
            )

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        mean, log_variance = self.split(outputs)
        squared = (targets.to(outputs.dtype) - mean).square()
        return 0.5 * (squared * torch.exp(-log_variance) + log_variance + math.log(2 * math.pi)).sum()

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        mean, log_variance = self.split(outputs)
        precision = torch.exp(-log_variance)
        error = mean - targets.to(outputs.dtype)
        return torch.cat([error * precision, 0.5 * (1 - error.square() * precision)], dim=-1)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_variance = self.split(outputs.detach())
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + noise * torch.exp(0.5 * log_variance)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        _, log_variance = self.split(outputs)
        root = torch.cat([torch.exp(-0.5 * log_variance), torch.full_like(log_variance, math.sqrt(0.5))], dim=-1)
        return torch.diag_embed(root)


_LAYOUT = "heteroscedastic outputs must have shape (B, 2D): D means, then D log-variances"

_NAMES = {
    "classification": Classification,
    "binary": Binary,
    "regression": Regression,
    "heteroscedastic": Heteroscedastic,
}


def get_likelihood(likelihood: str | Likelihood, sigma: float | Tensor = 1.0) -> Likelihood:
    """A ``Likelihood`` from its name ("classification", "binary", "regression", "heteroscedastic") or itself.

    ``sigma`` is the noise of "regression" and is unused by the others.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood not in _NAMES:
        raise ValueError(f"likelihood must be one of {sorted(_NAMES)} or a Likelihood, got {likelihood!r}")
    return Regression(sigma) if likelihood == "regression" else _NAMES[likelihood]()
