"""Forward hooks that record each call's input and capture the gradient of its output."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Call", "CallRecorder"]


@dataclass
class Call:
    """One call of a module: its input, and the gradient of its output in the last backward pass."""

    input: Tensor
    version: int
    output: Tensor = field(repr=False)
    output_version: int
    grad: Tensor | None = field(default=None, repr=False)

    def take_grad(self) -> Tensor:
        """The captured output gradient (zeros if the output did not reach the loss), then forget it."""
        grad = self.grad
        self.grad = None
        if grad is None:
            return torch.zeros_like(self.output)
        return grad


def _store_in(ref: weakref.ref):
    """A tensor hook saving the gradient into the referenced ``Call``.

    The hook holds the call weakly: a strong reference would close the cycle output ->
    hook -> call -> output through autograd's C++ hook storage, which Python's garbage
    collector cannot see, and every recorded step would leak its graph.
    """

    def store(grad: Tensor) -> None:
        call = ref()
        if call is not None:
            call.grad = grad

    return store


class CallRecorder:
    """Context manager recording the calls of ``modules`` (name -> module) during a forward pass.

    The output gradient is captured by a tensor hook registered on the output, so it
    is the gradient with respect to the output as the module returned it, even if a
    later in-place op (``ReLU(inplace=True)``) modifies that tensor; each backward
    pass overwrites it. Calls made with gradients disabled are not recorded. With
    ``batch_size=None`` the first recorded call sets it. Forward hooks are removed on
    exit, also when the forward raises; tensor hooks die with the graph.
    """

    def __init__(self, modules: dict[str, nn.Module], batch_size: int | None) -> None:
        self.modules = modules
        self.batch_size = batch_size
        self.calls: dict[str, list[Call]] = {name: [] for name in modules}
        self._handles: list = []

    def __enter__(self) -> CallRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            x = args[0] if args else None
            if not isinstance(x, Tensor) or not isinstance(output, Tensor):
                raise ValueError(f"module {name!r} must take and return tensors to be tracked by its rule")
            if self.batch_size is None and x.ndim:
                self.batch_size = x.shape[0]
            if x.ndim == 0 or x.shape[0] != self.batch_size or output.ndim == 0 or output.shape[0] != self.batch_size:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) was called on input of shape {tuple(x.shape)} "
                    f"with output {tuple(output.shape)}; the curvature rules need the batch ({self.batch_size}) "
                    "in dimension 0. Exclude the module with modules=... to use the generic fallback for it."
                )
            call = Call(x, x._version, output, output._version)
            if output.requires_grad:
                output.register_hook(_store_in(weakref.ref(call)))
            self.calls[name].append(call)

        return record

    def inputs(self, name: str) -> list[Tensor]:
        """Inputs of every call of module ``name``, checked to be unmodified since the call."""
        for call in self.calls[name]:
            if call.input._version != call.version:
                raise RuntimeError(
                    f"the input of module {name!r} was modified in place after the module used it; "
                    "its curvature cannot be computed from it"
                )
        return [call.input.detach() for call in self.calls[name]]

    def gradient_targets(self, name: str, params: list[Tensor]) -> list[Tensor]:
        """What to differentiate for module ``name``'s output gradients: its outputs, or ``params``.

        Differentiating with respect to the outputs skips the weight-gradient products;
        an output modified in place since the call is no longer the tensor the hook
        watches, so the module's parameters are requested instead (the hook still fires).
        """
        calls = [c for c in self.calls[name] if c.output.requires_grad]
        if all(c.output._version == c.output_version for c in calls):
            return [c.output for c in calls]
        return params

    def take_grads(self, name: str) -> list[Tensor]:
        """Output gradients of every call of module ``name`` from the last backward pass."""
        return [call.take_grad() for call in self.calls[name]]
