"""``CurvatureEngine``: curvature of a summed NLL per module, for any ``nn.Module``.

kind (docs/curvature.md §1), all for the SUMMED NLL sum_i l_i over the batch:

- ``ggn``: sum_i J_i^T Lambda_i J_i (= exact Fisher here), by backpropagating the
  columns of a square root of Lambda_i (one backward pass per output);
- ``fisher_mc``: sum_i g_i g_i^T with g_i the gradient of -log p(y_hat_i | f_i) for
  labels y_hat_i sampled from the model (``mc_samples`` backward passes, averaged);
- ``fisher_emp``: the same with the true labels (one backward pass);
- ``hessian``: the exact Hessian blocks (one Hessian-vector product per parameter).

structure: ``diag`` (diagonal of the exact block), ``kron`` (K-FAC, G ⊗ A, for
Linear and convolutions; diagonal for other modules) or ``full`` (dense block), or a
mapping from module types and names to these (``structures.py``). Blocks are per
module (block-diagonal over modules).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bayesso.curvature.accumulator import StatisticAccumulator, backward_vectors, dense_or_diag_block, fallback_blocks
from bayesso.curvature.blocks import Block
from bayesso.curvature.capture import CurvatureCapture
from bayesso.curvature.curvature import Curvature
from bayesso.curvature.hessian import hessian_blocks
from bayesso.curvature.plan import ModulePlan, plan_modules, trainable_parameters
from bayesso.curvature.recorder import CallRecorder
from bayesso.curvature.structures import STRUCTURES, Structure, requested_structures, structure_label
from bayesso.likelihoods import Likelihood, get_likelihood

__all__ = ["KINDS", "STRUCTURES", "CurvatureEngine"]

KINDS = ("ggn", "fisher_mc", "fisher_emp", "hessian")
KFAC_APPROXIMATIONS = ("expand", "reduce")


class CurvatureEngine:
    """Computes per-module curvature blocks of ``module`` under ``likelihood``.

    Args:
        module: any ``nn.Module`` whose forward takes the batch (dimension 0) and returns outputs.
        likelihood: "classification", "binary", "regression", "heteroscedastic" or a ``Likelihood``.
        kind: "ggn", "fisher_mc", "fisher_emp" or "hessian".
        structure: "diag", "kron" or "full", or a mapping from module types and module names to them, e.g.
            ``{nn.Conv2d: "kron", nn.BatchNorm2d: "diag", "classifier": "full"}`` (``bayesso.curvature.structures``:
            a module's own name first, then its nearest class, else "diag").
        modules: restrict to these modules (names or module objects), or "last_layer" (the last
            module, in registration order, with trainable parameters). Default: all.
        kfac_approx: K-FAC for weight sharing (positions, repeated calls): "expand" (KFC) or "reduce".
        mc_samples: label samples per example for ``fisher_mc``.
        dtype: computation dtype; default float64 for float64 models, float32 otherwise.
        max_dense_bytes: refuse ``full`` blocks (and ``hessian`` blocks) larger than this.
    """

    def __init__(
        self,
        module: nn.Module,
        likelihood: str | Likelihood,
        kind: str = "ggn",
        structure: Structure = "diag",
        *,
        modules: Iterable[str | nn.Module] | str | None = None,
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        dtype: torch.dtype | None = None,
        max_dense_bytes: int = 2**30,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        _check_choice("kind", kind, KINDS)
        _check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.module = module
        self.likelihood = get_likelihood(likelihood)
        self.kind, self.structure, self.kfac_approx, self.mc_samples = kind, structure, kfac_approx, mc_samples
        trainable = trainable_parameters(module)
        if not trainable:
            raise ValueError("module has no trainable parameters (all have requires_grad=False)")
        self.parameter_names = tuple(n for n, _ in trainable)
        self.parameter_shapes = tuple(p.shape for _, p in trainable)
        if dtype is None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in trainable) else torch.float32
        self.dtype = dtype
        self.plans = plan_modules(module, modules, use_rules=kind != "hessian")
        self.structures = requested_structures(self.plans, structure)  # by plan name, before the K-FAC fallback
        if kind == "hessian" and "kron" in self.structures.values():
            kron = [name for name, value in self.structures.items() if value == "kron"]
            raise ValueError(
                f"kind='hessian' supports structure 'diag' or 'full', got structure='kron' for modules {kron}"
            )
        self._check_sizes(max_dense_bytes)
        self._warned: set[str] = set()
        self.warn_training_batchnorm = True  # off where the caller, not the user, chose training mode
        fallback = [p for p in self.plans if p.rule is None]
        if fallback and kind != "hessian":
            self._warn_fallback(fallback, "no curvature rule, or parameters shared with another module")

    def _check_sizes(self, max_dense_bytes: int) -> None:
        itemsize = torch.finfo(self.dtype).bits // 8
        for plan in self.plans:
            if self.structures[plan.name] != "full" and self.kind != "hessian":
                continue
            size = plan.numel**2 * itemsize
            if size > max_dense_bytes:
                what = "a Hessian block, one Hessian-vector product per parameter, " if self.kind == "hessian" else ""
                raise ValueError(
                    f"structure {self.structures[plan.name]!r} with kind={self.kind!r} needs {what}a {plan.numel:,} x "
                    f"{plan.numel:,} block for module {plan.label()}: {size / 2**30:.2f} GiB in {self.dtype}, above "
                    f"max_dense_bytes={max_dense_bytes / 2**30:.2f} GiB. Use structure='kron' or 'diag' with kind="
                    "'ggn', restrict the engine with modules=..., or raise max_dense_bytes."
                )

    def _warn_fallback(self, plans: list[ModulePlan], reason: str) -> None:
        new = [p for p in plans if p.name not in self._warned]
        if not new:
            return
        self._warned.update(p.name for p in new)
        kron = any(self.structures[p.name] == "kron" for p in new)
        note = "; structure 'kron' falls back to 'diag' for them" if kron else ""
        warnings.warn(
            f"curvature of {', '.join(p.label() for p in new)} uses the generic torch.func fallback "
            f"(per-example gradients through the whole model; {reason}){note}",
            stacklevel=4,
        )

    def compute(
        self, x: Tensor | tuple[Tensor, ...], y: Tensor, *, generator: torch.Generator | None = None
    ) -> Curvature:
        """Curvature of the summed NLL of the batch ``(x, y)``; ``x`` may be a tuple of model inputs.

        ``generator`` drives the label sampling of ``fisher_mc``. Module parameters,
        their ``.grad`` and the registered hooks are left unchanged.
        """
        inputs = x if isinstance(x, tuple) else (x,)
        batch_size = _check_batch(inputs, y)
        self.likelihood.check_targets(y)
        if self.kind == "hessian":
            values = {}
            for diagonal_only in (True, False):
                wanted = "diag" if diagonal_only else "full"
                names = {p.name: list(p.names) for p in self.plans if self.structures[p.name] == wanted}
                if names:
                    values.update(
                        hessian_blocks(self.module, self.likelihood, inputs, y, names, diagonal_only, self.dtype)
                    )
            return self._curvature({p.name: dense_or_diag_block(p, values[p.name]) for p in self.plans}, batch_size)
        hooked = {p.name: p.module for p in self.plans if p.rule is not None}
        with CallRecorder(hooked, batch_size) as recorder, torch.enable_grad():
            outputs = self.module(*inputs)
        self.likelihood.check(outputs, y)
        self._warn_training_batchnorm()
        vectors = backward_vectors(
            self.likelihood, self.kind, outputs.detach().to(self.dtype), y, generator, self.mc_samples
        )
        accumulator = self._accumulator(recorder)
        self._run_passes(accumulator, recorder, outputs, vectors, retain_graph=False)
        return self._assemble(accumulator, inputs, vectors.to(outputs.dtype), batch_size)

    def capture(self, generator: torch.Generator | None = None) -> CurvatureCapture:
        """Context manager recording the curvature of a training step run inside it.

        Inside, run exactly one forward of the model with gradients enabled and a
        backward of a loss computed from its output; ``fisher_emp`` takes the gradients
        of that backward, which must be of the batch MEAN of the NLL (PyTorch's default
        reduction), while ``fisher_mc`` and ``ggn`` run their own passes through the
        same graph before it is freed. Then ``capture.curvature()`` gives the curvature
        of the summed NLL of that batch.
        """
        if self.kind == "hessian":
            raise ValueError("capture() supports kind 'ggn', 'fisher_mc' or 'fisher_emp', got kind='hessian'")
        return CurvatureCapture(self, generator)

    def _accumulator(self, recorder: CallRecorder) -> StatisticAccumulator:
        with_rule = [p for p in self.plans if p.rule is not None]
        uncalled = [p for p in with_rule if not recorder.calls[p.name]]
        if uncalled:
            self._warn_fallback(uncalled, "not called through its own forward")
        called = [p for p in with_rule if recorder.calls[p.name]]
        return StatisticAccumulator(called, recorder, self.structures, self.kfac_approx, self.dtype)

    def _run_passes(
        self, accumulator: StatisticAccumulator, recorder: CallRecorder, outputs: Tensor, vectors: Tensor, retain_graph
    ) -> None:
        """One backward pass per vector through the recorded graph, adding each pass's statistics."""
        targets = [t for p in accumulator.plans for t in recorder.gradient_targets(p.name, p.parameters)]
        for k, vector in enumerate(vectors):
            if targets:  # else no tracked output reaches the loss: all output gradients are zero
                torch.autograd.grad(
                    outputs,
                    targets,
                    grad_outputs=vector.to(outputs.dtype),
                    retain_graph=retain_graph or k + 1 < len(vectors),
                    allow_unused=True,
                )
            accumulator.add(recorder)

    def _assemble(
        self, accumulator: StatisticAccumulator, inputs: tuple[Tensor, ...], vectors: Tensor, batch_size: int
    ) -> Curvature:
        blocks = accumulator.blocks(batch_size)
        rest = [p for p in self.plans if p.name not in blocks]
        blocks.update(fallback_blocks(self.module, rest, inputs, vectors, self.structures, self.dtype))
        return self._curvature({p.name: blocks[p.name] for p in self.plans}, batch_size)

    def _curvature(self, blocks: dict[str, Block], batch_size: int) -> Curvature:
        return Curvature(blocks, self.parameter_names, self.parameter_shapes, self.kind, batch_size)

    def _warn_training_batchnorm(self) -> None:
        if "batchnorm" in self._warned or not self.warn_training_batchnorm:
            return
        training = [
            p.label() for p in self.plans if isinstance(p.module, nn.modules.batchnorm._BatchNorm) and p.module.training
        ]
        if training:
            self._warned.add("batchnorm")
            warnings.warn(
                f"batch-norm modules {', '.join(training)} are in training mode: examples are coupled through "
                "batch statistics, so per-example curvature is an approximation; call module.eval() for exact "
                "curvature",
                stacklevel=4,
            )

    def __repr__(self) -> str:
        return (
            f"CurvatureEngine(kind={self.kind!r}, structure={structure_label(self.structure)!r}, "
            f"likelihood={self.likelihood!r}, "
            f"modules=[{', '.join(p.label() for p in self.plans)}])"
        )


def _check_choice(argument: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_batch(inputs: tuple, targets) -> int:
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor) or x.ndim == 0:
            raise ValueError(f"x[{i}] must be a tensor with a batch dimension, got {type(x).__name__}")
    if not isinstance(targets, Tensor) or targets.ndim == 0:
        raise ValueError(f"y must be a tensor with a batch dimension, got {type(targets).__name__}")
    sizes = {x.shape[0] for x in inputs}
    if len(sizes) != 1 or targets.shape[0] not in sizes:
        raise ValueError(
            f"batch size mismatch: x has batch size(s) {sorted(sizes)} and y has batch size {targets.shape[0]}"
        )
    if targets.shape[0] == 0:
        raise ValueError("the batch is empty (batch size 0)")
    return targets.shape[0]
