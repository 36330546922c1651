"""``CurvatureCapture``: the curvature of a training step that the user's own code runs.

Optimizers call a closure that runs the forward and ``loss.backward()``; by the
time it returns, the graph is freed. The capture records module inputs and output
gradients with hooks during that step. For ``fisher_emp`` the user's backward
gives the per-example gradients (times 1/B, for the batch-mean loss). For
``fisher_mc`` and ``ggn`` a tensor hook on the model output runs the extra backward
passes re-entrantly, at the start of the user's backward while the graph is intact.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayesso.curvature.accumulator import StatisticAccumulator, backward_vectors
from bayesso.curvature.curvature import Curvature
from bayesso.curvature.recorder import CallRecorder

if TYPE_CHECKING:
    from bayesso.curvature.engine import CurvatureEngine

__all__ = ["CurvatureCapture"]


class CurvatureCapture:
    """Context manager made by ``CurvatureEngine.capture``; ``curvature()`` after the step."""

    def __init__(self, engine: CurvatureEngine, generator: torch.Generator | None) -> None:
        self.engine, self.generator = engine, generator
        self._inputs: tuple[Tensor, ...] | None = None
        self._outputs: Tensor | None = None
        self._output_grad: Tensor | None = None
        self._vectors: Tensor | None = None
        self._accumulator: StatisticAccumulator | None = None
        self._in_passes = False

    def __enter__(self) -> CurvatureCapture:
        hooked = {p.name: p.module for p in self.engine.plans if p.rule is not None}
        self._recorder = CallRecorder(hooked, batch_size=None).__enter__()
        self._handle = self.engine.module.register_forward_hook(self._on_forward)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._recorder.__exit__(*exc)

    def _on_forward(self, module, args: tuple, output) -> None:
        if not torch.is_grad_enabled():
            return
        if self._outputs is not None:
            raise ValueError("the model was called more than once with gradients enabled inside one capture")
        if not isinstance(output, Tensor) or not all(isinstance(a, Tensor) for a in args):
            raise ValueError("the captured model must take tensor arguments and return a tensor of outputs")
        self._inputs, self._outputs = args, output
        self.engine._warn_training_batchnorm()
        output.register_hook(_forward_to(weakref.ref(self)))

    def _on_output_grad(self, grad: Tensor) -> None:
        if self._in_passes:
            return
        self._output_grad = grad.detach()
        if self.engine.kind == "fisher_emp" or not torch.isfinite(self._outputs).all():
            return  # non-finite outputs: no passes; ``curvature()`` refuses and the caller decides
        engine = self.engine
        outputs = self._outputs.detach().to(engine.dtype)
        self._vectors = backward_vectors(
            engine.likelihood, engine.kind, outputs, None, self.generator, engine.mc_samples
        )
        self._in_passes = True
        try:
            self._accumulator = engine._accumulator(self._recorder)
            engine._run_passes(self._accumulator, self._recorder, self._outputs, self._vectors, retain_graph=True)
        finally:
            self._in_passes = False

    def curvature(self) -> Curvature:
        """Curvature of the summed NLL of the captured batch."""
        if self._output_grad is None:
            raise RuntimeError(
                "no backward pass reached the model output inside the capture: the step must compute its loss "
                "from the model's output and call backward on it"
            )
        if not torch.isfinite(self._outputs).all():
            raise FloatingPointError("the model outputs of the captured step contain NaN or infinite values")
        batch_size = self._outputs.shape[0]
        if self.engine.kind == "fisher_emp":
            self._vectors = (self._output_grad * batch_size).to(self.engine.dtype).unsqueeze(0)
            self._accumulator = self.engine._accumulator(self._recorder)
            self._accumulator.add(self._recorder, scale=float(batch_size))
        vectors = self._vectors.to(self._outputs.dtype)
        return self.engine._assemble(self._accumulator, self._inputs, vectors, batch_size)


def _forward_to(ref: weakref.ref):
    """A tensor hook calling the referenced capture, held weakly to avoid a leaking cycle
    output -> hook -> capture -> output (see ``recorder._store_in``)."""

    def hook(grad: Tensor) -> None:
        capture = ref()
        if capture is not None:
            capture._on_output_grad(grad)

    return hook
