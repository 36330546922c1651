"""What one optimizer step consumes: the closure's loss, flat gradients and curvature, checked,
summed over micro-batches.

Shared by ``VIOptimizer`` and ``SecondOrderOptimizer``: with ``accumulation_steps = k`` each
``step(closure)`` adds one micro-batch and every k-th applies the update with the mean
gradient and the curvature of all k micro-batches per example. Each closure returns its
batch MEAN, so micro-batch gradients are averaged with equal weights; micro-batches whose
sizes differ by more than 10 % are warned about (their examples would not count equally).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bayesso.curvature import Curvature

__all__ = [
    "MicroBatchSums",
    "check_non_negative",
    "check_positive",
    "closure_loss",
    "flat_gradient",
    "nonfinite_part",
    "recorded_batch_sizes",
    "refuse_grad_scaler",
]

UNEVEN = 0.9  # warn when the smallest micro-batch is below this fraction of the largest


def check_positive(name: str, value, integer: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is a positive finite number (an int if ``integer``)."""
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "positive and finite"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_non_negative(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number >= 0 (a learning rate may be 0, as in torch)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be non-negative and finite, got {value!r}")


def closure_loss(loss) -> Tensor:
    """The detached scalar loss a closure returned; a clear error for anything else (e.g. a forgotten return)."""
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss.detach().reshape(())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss))
    what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else repr(loss)
    raise ValueError(
        f"the closure must return the batch-mean loss as a scalar tensor (end it with `return loss`), got {what}"
    )


def refuse_grad_scaler(optimizer) -> None:
    """ValueError when ``torch.amp.GradScaler.step`` calls a closure optimizer's step.

    The optimizer declares ``_step_supports_amp_scaling``, so the scaler hands it ``grad_scale`` and
    ``found_inf`` (removed here: the scaler removes them only after a step that returns) instead of
    unscaling ``.grad`` and stepping on a gradient that the closure's loss would then scale again.
    """
    if not hasattr(optimizer, "found_inf"):
        return
    for name in ("grad_scale", "found_inf"):
        optimizer.__dict__.pop(name, None)
    raise ValueError(
        f"torch.amp.GradScaler does not support {type(optimizer).__name__}: its step(closure) runs the closure "
        "itself (with curvature hooks, once per sample), which GradScaler cannot scale. Use "
        "torch.autocast(device_type, dtype=torch.bfloat16) inside the closure, which needs no scaler, or float32; "
        "IVON's closure-free step after sampled_params(train=True) supports GradScaler"
    )


@contextmanager
def recorded_batch_sizes(module: nn.Module, enabled: bool) -> Iterator[list[int]]:
    """Context collecting the batch size of every forward of ``module`` inside it (when ``enabled``)."""
    sizes: list[int] = []
    if not enabled:
        yield sizes
        return

    def record(_module, _args, output) -> None:
        if isinstance(output, Tensor) and output.ndim:
            sizes.append(output.shape[0])

    handle = module.register_forward_hook(record)
    try:
        yield sizes
    finally:
        handle.remove()


def flat_gradient(params: list[Tensor]) -> Tensor:
    """The parameters' ``.grad`` concatenated (zeros for parameters without one)."""
    return torch.cat(
        [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
         for p in params]
    )  # fmt: skip


def nonfinite_part(loss: Tensor, grad: Tensor, curvature: Curvature | None, estimate: Tensor | None = None) -> str:
    """Which of the step's quantities holds a NaN or an infinity ('' if none), in one host read when all are finite.

    A sum is non-finite exactly when an element is (barring overflow near 3e38), and a
    reduction is an order of magnitude cheaper than ``isfinite().all()`` on CPU. The parts'
    sums are added into one number, read once; only if it is not finite is each part read.
    """
    sums = {"loss": loss.sum(), "gradient": grad.sum()}
    if curvature is not None:
        sums["curvature"] = curvature.entry_sum()
    if estimate is not None:
        sums["curvature estimate"] = estimate.sum()
    if bool(torch.isfinite(sum(total.to(grad.dtype) for total in sums.values()))):
        return ""
    return next((name for name, total in sums.items() if not bool(torch.isfinite(total))), "")


class MicroBatchSums:
    """Sums of gradients, summed curvature (and an optional estimate) over micro-batches."""

    def __init__(self) -> None:
        self.count = 0
        self.grad: Tensor | None = None
        self.curvature: Curvature | None = None
        self.estimate: Tensor | None = None
        self.sizes: list[int] = []

    def add(
        self, grad: Tensor, curvature: Curvature | None = None, estimate: Tensor | None = None, size: int | None = None
    ) -> None:
        """Add one micro-batch (``size`` examples, when known). Never modifies tensors in place."""
        self.sizes = [*self.sizes, size] if size is not None else self.sizes
        self.grad = grad if self.grad is None else self.grad + grad
        if curvature is not None:
            self.curvature = curvature if self.curvature is None else self.curvature + curvature
        if estimate is not None:
            self.estimate = estimate if self.estimate is None else self.estimate + estimate
        self.count += 1

    def ensure_empty(self) -> None:
        """RuntimeError in the middle of an accumulation: optimizer state is saved after full updates."""
        if self.count:
            raise RuntimeError("state_dict() in the middle of gradient accumulation; save after a full update")

    def uneven(self) -> bool:
        """Whether the micro-batches so far differ in size by more than 10 %."""
        return len(self.sizes) > 1 and min(self.sizes) < UNEVEN * max(self.sizes)

    def mean(self) -> tuple[Tensor, Curvature | None, Tensor | None]:
        """(mean gradient, curvature per example, mean estimate), and reset."""
        n, grad, curvature, estimate = self.count, self.grad, self.curvature, self.estimate
        self.__init__()
        if curvature is not None:
            curvature = curvature * (1.0 / curvature.n_examples)
        if n == 1:
            return grad, curvature, estimate
        return grad / n, curvature, None if estimate is None else estimate / n
