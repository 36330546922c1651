"""Where state lives: the device and dtype of a module, and moving posteriors and optimizer state after it.

A posterior's and an optimizer's tensors follow their module's parameters: they live on the
device of the first parameter, in float64 when the parameters are float64 and in float32
otherwise (``state_dtype``). ``BayesianModel.to`` and ``Posterior.to`` move the module and
that state together, all or nothing (``module_moved`` puts the module back if anything
after the move fails). Random generators are bound to a device: a generator moved to
another device is a new one there, seeded from the old one's state (``moved_generator``),
so runs stay reproducible while the stream after a move differs from the one before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bayesso.curvature import Curvature

if TYPE_CHECKING:
    from bayesso.optim.accumulation import MicroBatchSums

__all__ = [
    "STATE_DTYPES",
    "converted",
    "converted_sums",
    "module_moved",
    "module_placement",
    "moved_generator",
    "parse_placement",
    "state_dtype",
]

STATE_DTYPES = (torch.float32, torch.float64)  # what BayesianModel.to and Posterior.to accept as dtype


def state_dtype(parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of posterior and optimizer state for parameters of ``parameter_dtype``."""
    return torch.float64 if parameter_dtype == torch.float64 else torch.float32


def parse_placement(device=None, dtype: torch.dtype | None = None) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) from ``to``'s arguments, as ``nn.Module.to`` takes them: ``to(device)``, ``to(dtype)``
    (a dtype given first), ``to(device, dtype)``. ValueError naming the value for an unknown or unavailable
    device, or a dtype other than float32 / float64; nothing is allocated but a probe on the device."""
    if isinstance(device, torch.dtype):
        if dtype is not None:
            raise ValueError(f"to() got two dtypes, {device} and {dtype}; pass to(device, dtype)")
        device, dtype = None, device
    if dtype is not None and dtype not in STATE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if device is None:
        return None, dtype
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device must be a torch.device, a device string or index, got {device!r}: {error}") from None
    try:
        torch.zeros(1, device=parsed)
    except (AssertionError, RuntimeError) as error:  # torch raises AssertionError for CUDA in a CPU-only build
        raise ValueError(f"device {device!r} is not available: {error}") from None
    return parsed, dtype


def module_placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """(device of the first parameter or buffer, dtype of the first floating-point parameter); None where absent."""
    first = next(chain(module.parameters(), module.buffers()), None)
    floating = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return (None if first is None else first.device), floating


def converted(value, device: torch.device, dtype: torch.dtype):
    """``value`` with every tensor on ``device`` and every floating-point tensor in ``dtype``.

    Tensors, curvatures, and tuples, lists and dicts of them; anything else is returned as it is.
    A tensor already in place is returned itself (``Tensor.to``), never modified.
    """
    if isinstance(value, Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, Curvature):
        blocks = value.blocks.items()
        return value.with_blocks(
            {name: block.with_tensors(converted(block.tensors(), device, dtype)) for name, block in blocks}
        )
    if isinstance(value, (tuple, list)):
        return type(value)(converted(item, device, dtype) for item in value)
    if isinstance(value, dict):
        return {key: converted(item, device, dtype) for key, item in value.items()}
    return value


def converted_sums(sums: MicroBatchSums, device: torch.device, dtype: torch.dtype) -> MicroBatchSums:
    """A copy of an optimizer's micro-batch sums with their tensors converted (the original is kept)."""
    moved = type(sums).__new__(type(sums))
    vars(moved).update(vars(sums))
    moved.grad, moved.curvature, moved.estimate = converted([sums.grad, sums.curvature, sums.estimate], device, dtype)
    return moved


def moved_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself if it is on ``device``; else a new generator there, seeded from its state.

    The seed is a hash of the old state, so the same state always gives the same new stream and
    the old generator is not advanced. ValueError naming the device where it cannot hold a generator.
    """
    if generator.device == device:
        return generator
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
    try:
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    except RuntimeError as error:
        raise ValueError(f"device {str(device)!r} cannot hold the optimizer's random generator: {error}") from None


@contextmanager
def module_moved(module: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> Iterator[None]:
    """Context in which ``module`` is moved by ``module.to(device, dtype)``; if the move or the body raises,
    the module's parameters (the same objects, with their data and gradients) and buffers are put back."""
    saved = [(sub, dict(sub._parameters), dict(sub._buffers)) for sub in module.modules()]
    data = {
        id(p): (p.data, p.grad, None if p.grad is None else p.grad.data)
        for _, parameters, _ in saved
        for p in parameters.values()
        if p is not None
    }
    try:
        module.to(device=device, dtype=dtype)
        yield
    except BaseException:
        for sub, parameters, buffers in saved:
            sub._parameters.update(parameters)
            sub._buffers.update(buffers)
            for p in parameters.values():
                if p is not None:
                    tensor, grad, grad_data = data[id(p)]
                    p.data = tensor
                    if grad is not None:
                        grad.data = grad_data
                    p.grad = grad
        raise
