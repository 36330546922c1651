"""Temperature scaling (Guo et al., 2017): the classical post-hoc recalibration baseline.

One scalar T > 0 divides the logits, p = softmax(z / T) (sigmoid for binary logits),
and is fitted by minimising the NLL on held-out data. The NLL is convex in 1/T, so a
bounded scalar search over log T finds the global minimum (docs/metrics.md §6).
Held-out labels of a single class cannot calibrate anything: ``warn_if_single_class``
says so, here and wherever else labels are fitted for calibration.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor

__all__ = ["TemperatureScaling", "warn_if_single_class"]


class TemperatureScaling:
    """Recalibrate any model's logits with one temperature fitted on held-out NLL.

    >>> scaler = TemperatureScaling().fit(val_logits, val_targets)
    >>> probs = scaler.probs(test_logits)
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive("temperature", temperature)

    def fit(self, logits: Tensor, targets: Tensor, bounds: tuple[float, float] = (0.01, 100.0)) -> TemperatureScaling:
        """Fit T on held-out ``logits`` (N, C) or binary (N,) and integer ``targets`` (N,); returns self.

        Warns when T ends at an edge of ``bounds`` or when ``targets`` hold a single class.
        """
        logits, targets = _check(logits, targets)
        low, high = (_positive("bounds", b) for b in bounds)
        if low >= high:
            raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")
        warn_if_single_class(targets, "TemperatureScaling.fit")

        def objective(log_t: float) -> float:
            return _nll(logits / math.exp(log_t), targets)

        result = minimize_scalar(objective, bounds=(math.log(low), math.log(high)), method="bounded",
                                 options={"xatol": 1e-6})  # fmt: skip
        self.temperature = math.exp(result.x)
        edge = 0.01 * (math.log(high) - math.log(low))  # the NLL is flat there, e.g. T -> 0 if all are right
        if min(abs(result.x - math.log(low)), abs(result.x - math.log(high))) < edge:
            warnings.warn(
                f"the fitted temperature {self.temperature:.4g} is at the edge of bounds={bounds}", stacklevel=2
            )
        return self

    def probs(self, logits: Tensor) -> Tensor:
        """softmax(logits / T) for (N, C) logits, sigmoid(logits / T) for binary (N,) logits."""
        scaled = logits / self.temperature
        return torch.sigmoid(scaled) if logits.ndim == 1 else torch.softmax(scaled, dim=-1)

    def nll(self, logits: Tensor, targets: Tensor) -> float:
        """Mean NLL of ``targets`` under the scaled logits."""
        logits, targets = _check(logits, targets)
        return _nll(logits / self.temperature, targets)

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature:.4g})"


def warn_if_single_class(targets: Tensor, fitter: str, stacklevel: int = 3) -> None:
    """A ``UserWarning`` naming ``fitter`` and the class when the labels ``targets`` (any shape) hold one class.

    A calibration map fitted on one class only learns to make that class likely (e.g. T -> 0).
    """
    classes = torch.unique(targets.detach())
    if classes.numel() == 1:
        label = classes.item()
        label = int(label) if float(label).is_integer() else label
        warnings.warn(
            f"{fitter}: all {targets.numel()} held-out labels are class {label}; a calibration fitted on a single "
            "class only learns to make that class likely, so the result is meaningless. Hold out examples of every "
            "class (a random or stratified split, not a slice of data ordered by class)",
            UserWarning,
            stacklevel=stacklevel,
        )


def _nll(logits: Tensor, targets: Tensor) -> float:
    if logits.ndim == 1:
        return F.binary_cross_entropy_with_logits(logits, targets.double()).item()
    return F.cross_entropy(logits, targets).item()


def _check(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise ValueError("logits and targets must be tensors")
    if logits.ndim not in (1, 2) or targets.ndim != 1 or len(logits) != len(targets) or len(targets) == 0:
        raise ValueError(
            f"logits must be (N, C) or binary (N,) and targets (N,) with the same N > 0, got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain non-finite values")
    return logits.detach().double(), targets.long()


def _positive(argument: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{argument} must be positive and finite, got {value!r}")
    return float(value)
