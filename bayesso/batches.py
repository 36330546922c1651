"""What the entry points accept as data, checked in one place before anything changes.

``fit``, ``fit_laplace``, ``evaluate`` and ``predict`` share these checks: a loader must be
re-iterable when read more than once and hold data; each batch must be an ``(x, y)``
pair; ``x`` a non-empty batch tensor without NaN or infinite values; ``y`` within the
likelihood's support (dtype, range, finiteness) and, once the model has produced its
outputs, of a shape that fits them (``Likelihood.check``: no silent broadcasting). Errors are ``ValueError``s
that say where (``fit, epoch 2, batch 5``), what was received and what is expected.

Devices and dtypes: every entry point takes its batches through ``checked_batch`` or
``checked_inputs``, which move ``x`` and ``y`` to the device of the module's first parameter
(``non_blocking``, so that copies from pinned memory overlap with compute; not from an
accelerator into the CPU, where that would be unsafe) and cast floating-point ``x`` and ``y`` to the
dtype of the module's floating parameters, as Lightning's precision plugins do (a torch module
does not cast: float64 inputs to a float32 ``nn.Linear`` fail). Integer and boolean tensors (class
targets, token ids) keep their dtype; complex inputs to a real module are a ValueError.

Batches of another layout (dicts, 3-tuples, bare tensors) are adapted by giving the
``DataLoader`` a ``collate_fn`` that returns ``(x, y)``, which keeps the loader (and with it
its sampler and generator) intact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bayesso.likelihoods import Likelihood
from bayesso.placement import module_placement

__all__ = [
    "check_batch",
    "check_inputs",
    "check_loader",
    "checked_batch",
    "checked_inputs",
    "describe",
    "forward",
    "located",
    "on_module",
    "split_batch",
    "transfer",
]

ADAPT = (
    "give the DataLoader a collate_fn that returns (x, y) (e.g. for dict items: "
    "lambda items: (torch.stack([i['x'] for i in items]), torch.stack([i['y'] for i in items])))"
)


def describe(value) -> str:
    """A short account of what was received, for error messages."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])})"
    return f"a {type(value).__name__}"


@contextmanager
def located(where: str) -> Iterator[None]:
    """Prefix ``ValueError``s and ``FloatingPointError``s raised inside with ``where``."""
    try:
        yield
    except (ValueError, FloatingPointError) as error:
        if str(error).startswith(where):
            raise
        raise type(error)(f"{where}: {error}") from error


def check_loader(loader, passes: int = 1, what: str = "loader") -> None:
    """``loader`` is an iterable of batches that can be read ``passes`` times and is not known to be empty."""
    if isinstance(loader, Tensor) or not isinstance(loader, Iterable):
        raise ValueError(
            f"{what} must be an iterable of (x, y) batches such as a DataLoader, got {describe(loader)}; "
            "wrap tensors with bayesso.data.make_loader(x, y, batch_size)"
        )
    if passes > 1 and isinstance(loader, Iterator):
        raise ValueError(
            f"{what} is a one-shot iterator ({type(loader).__name__}), which would be empty after the first of "
            f"{passes} passes; pass a DataLoader or a list of batches"
        )
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{what}'s dataset is empty (0 examples)")


def split_batch(batch) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a batch that is a pair; a clear error for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"expected (x, y) batches, got {describe(batch)}; {ADAPT}")


def check_inputs(x) -> None:
    """``x`` is a non-empty batch tensor (B, ...) with finite values."""
    if not isinstance(x, Tensor) or x.ndim == 0 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch tensor (B, ...), got {describe(x)}")
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        count = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x contains {count} NaN or infinite value(s) out of {x.numel()}")


def check_batch(likelihood: Likelihood, x: Tensor, y) -> None:
    """Inputs, and targets within the likelihood's support with x's batch size (before the forward pass)."""
    check_inputs(x)
    likelihood.check_targets(y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"batch size mismatch: x has {x.shape[0]} examples and y has {y.shape[0]}")


def transfer(tensor: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` on ``device``, floating-point tensors in ``dtype`` (None: kept); itself if already there.

    Non-blocking, except from an accelerator into the CPU, where the copy must finish before it is read.
    """
    non_blocking = device.type != "cpu" or tensor.device.type == "cpu"
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device, dtype, non_blocking=non_blocking)
    return tensor.to(device, non_blocking=non_blocking)


def on_module(module: nn.Module, value, name: str):
    """``value`` moved to the module's device, cast to its floating dtype if floating (see above).

    Anything but a tensor is returned as it is, for the checks to describe it; a complex tensor
    for a module with real parameters is a ValueError naming ``name`` and both dtypes.
    """
    if not isinstance(value, Tensor):
        return value
    device, dtype = module_placement(module)
    if value.is_complex() and dtype is not None:
        raise ValueError(
            f"{name} is a {value.dtype} tensor and the module computes in {dtype}: pass real inputs (floating "
            "point ones are cast to the module's dtype, integer ones such as token ids are kept)"
        )
    return value if device is None else transfer(value, device, dtype)


def checked_batch(module: nn.Module, likelihood: Likelihood, batch) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of ``batch`` on the module's device and in its dtype, checked by ``check_batch``."""
    x, y = split_batch(batch)
    x, y = on_module(module, x, "x"), on_module(module, y, "y")
    check_batch(likelihood, x, y)
    return x, y


def checked_inputs(module: nn.Module, x) -> Tensor:
    """``x`` on the module's device and in its dtype, checked by ``check_inputs``."""
    x = on_module(module, x, "x")
    check_inputs(x)
    return x


def forward(module: nn.Module, x: Tensor):
    """``module(x)``, with advice where torch refuses a single example in a training-mode batch norm."""
    try:
        return module(x)
    except ValueError as error:
        if "more than 1 value per channel" not in str(error):
            raise
        raise ValueError(
            f"a batch of {len(x)} example(s) reached a batch-norm layer in training mode, which needs more than "
            "one value per channel; drop the last incomplete batch (DataLoader(..., drop_last=True) or "
            "bayesso.data.make_loader(..., drop_last=True)) or use larger batches"
        ) from error
