"""``CurvatureEngine``: curvature of a summed NLL per module, for any ``nn.Module``.

kind (ALGORITHMS.md section 1), all for the SUMMED NLL sum_i l_i over the batch:

- ``ggn``: sum_i J_i^T Lambda_i J_i (= exact Fisher here), by backpropagating the
  columns of a square root of Lambda_i (one backward pass per output);
- ``fisher_mc``: sum_i g_i g_i^T with g_i the gradient of -log p(y_hat_i | f_i) for
  labels y_hat_i sampled from the model (``mc_samples`` backward passes, averaged);
- ``fisher_emp``: the same with the true labels (one backward pass);
- ``hessian``: the exact Hessian blocks (one Hessian-vector product per parameter).

structure: ``diag`` (diagonal of the exact block), ``kron`` (K-FAC, G ⊗ A, for
Linear and convolutions; diagonal for other modules) or ``full`` (dense block).
Blocks are per module (block-diagonal over modules).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayesso.curvature.blocks import Block, DenseBlock, DiagBlock, KronBlock
from bayesso.curvature.capture import CallRecorder
from bayesso.curvature.curvature import Curvature
from bayesso.curvature.fallback import per_example_gradients
from bayesso.curvature.hessian import hessian_blocks
from bayesso.curvature.modules import AffineRule, ModuleRule, rule_for
from bayesso.likelihoods import Likelihood, get_likelihood

__all__ = ["KINDS", "STRUCTURES", "CurvatureEngine"]

logger = logging.getLogger(__name__)

KINDS = ("ggn", "fisher_mc", "fisher_emp", "hessian")
STRUCTURES = ("diag", "kron", "full")
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass
class _Unit:
    """A module's trainable parameters that form one block."""

    name: str
    module: nn.Module
    rule: ModuleRule | None  # None: generic fallback
    local: tuple[str, ...]  # parameter names within the module
    shapes: tuple[torch.Size, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{n}" if self.name else n for n in self.local)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def label(self) -> str:
        return f"{self.name or '(root)'!r} ({type(self.module).__name__})"


class CurvatureEngine:
    """Computes per-module curvature blocks of ``module`` under ``likelihood``.

    Args:
        module: any ``nn.Module`` whose forward takes the batch (dimension 0) and returns outputs.
        likelihood: "classification", "binary", "regression" or a ``Likelihood``.
        kind: "ggn", "fisher_mc", "fisher_emp" or "hessian".
        structure: "diag", "kron" or "full".
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
        structure: str = "diag",
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
        _check_choice("structure", structure, STRUCTURES)
        _check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        if kind == "hessian" and structure == "kron":
            raise ValueError("kind='hessian' supports structure 'diag' or 'full', got structure='kron'")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.module = module
        self.likelihood = get_likelihood(likelihood)
        self.kind, self.structure, self.kfac_approx, self.mc_samples = kind, structure, kfac_approx, mc_samples
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("module has no trainable parameters (all have requires_grad=False)")
        self.parameter_names = tuple(n for n, _ in trainable)
        self.parameter_shapes = tuple(p.shape for _, p in trainable)
        if dtype is None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in trainable) else torch.float32
        self.dtype = dtype
        self.units = self._units(_selected(module, modules))
        self._check_sizes(max_dense_bytes)
        self._warned: set[str] = set()
        fallback = [u for u in self.units if u.rule is None]
        if fallback and kind != "hessian":
            self._warn_fallback(fallback, "no curvature rule, or parameters shared with another module")

    def _units(self, selected: set[str]) -> list[_Unit]:
        owner: dict[int, str] = {}
        users: dict[int, set[int]] = {}
        for name, module in self.module.named_modules():
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), name)
                users.setdefault(id(p), set()).add(id(module))
        units = []
        for name, module in self.module.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            own = [(n, p) for n, p in own if owner[id(p)] == name]
            if name not in selected or not own:
                continue
            shared = any(len(users[id(p)]) > 1 for p in module.parameters(recurse=False))
            rule = None if shared or self.kind == "hessian" else rule_for(module)
            units.append(_Unit(name, module, rule, tuple(n for n, _ in own), tuple(p.shape for _, p in own)))
        if not units:
            raise ValueError("the selected modules have no trainable parameters")
        return units

    def _check_sizes(self, max_dense_bytes: int) -> None:
        if self.structure != "full" and self.kind != "hessian":
            return
        itemsize = torch.finfo(self.dtype).bits // 8
        for unit in self.units:
            size = unit.numel**2 * itemsize
            if size > max_dense_bytes:
                what = "a Hessian block, one Hessian-vector product per parameter," if self.kind == "hessian" else ""
                raise ValueError(
                    f"structure={self.structure!r} with kind={self.kind!r} needs {what} a {unit.numel:,} x "
                    f"{unit.numel:,} block for module {unit.label()}: {size / 2**30:.2f} GiB in {self.dtype}, above "
                    f"max_dense_bytes={max_dense_bytes / 2**30:.2f} GiB. Use structure='kron' or 'diag' with kind="
                    "'ggn', restrict the engine with modules=..., or raise max_dense_bytes."
                )

    def _warn_fallback(self, units: list[_Unit], reason: str) -> None:
        new = [u for u in units if u.name not in self._warned]
        if not new:
            return
        self._warned.update(u.name for u in new)
        note = "; structure 'kron' falls back to 'diag' for them" if self.structure == "kron" else ""
        warnings.warn(
            f"curvature of {', '.join(u.label() for u in new)} uses the generic torch.func fallback "
            f"(per-example gradients through the whole model; {reason}){note}",
            stacklevel=3,
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
            blocks = {u.name: list(u.names) for u in self.units}
            values = hessian_blocks(
                self.module, self.likelihood, inputs, y, blocks, self.structure == "diag", self.dtype
            )
            return self._curvature({u.name: self._block(u, values[u.name]) for u in self.units}, batch_size)
        hooked = {u.name: u.module for u in self.units if u.rule is not None}
        with CallRecorder(hooked, batch_size) as recorder, torch.enable_grad():
            outputs = self.module(*inputs)
        self.likelihood.check(outputs, y)
        self._warn_training_batchnorm()
        vectors = self._backward_vectors(outputs.detach().to(self.dtype), y, generator)
        called = [u for u in self.units if u.rule is not None and recorder.calls[u.name]]
        uncalled = [u for u in self.units if u.rule is not None and not recorder.calls[u.name]]
        if uncalled:
            self._warn_fallback(uncalled, "not called through its own forward")
        blocks = self._hooked_blocks(called, recorder, outputs, vectors)
        rest = [u for u in self.units if u.name not in blocks]
        blocks.update(self._fallback_blocks(rest, inputs, vectors.to(outputs.dtype)))
        return self._curvature({u.name: blocks[u.name] for u in self.units}, batch_size)

    def _curvature(self, blocks: dict[str, Block], batch_size: int) -> Curvature:
        return Curvature(blocks, self.parameter_names, self.parameter_shapes, self.kind, batch_size)

    def _structure(self, unit: _Unit) -> str:
        if self.structure == "kron" and not (unit.rule is not None and unit.rule.has_kron):
            return "diag"
        return self.structure

    def _block(self, unit: _Unit, value: Tensor) -> Block:
        cls = DiagBlock if value.ndim == 1 else DenseBlock
        return cls(unit.names, unit.shapes, value)

    def _backward_vectors(self, outputs: Tensor, targets: Tensor, generator) -> Tensor:
        """Vectors v_k (K, *outputs.shape) whose per-example outer products sum to the curvature."""
        lik = self.likelihood
        if self.kind == "fisher_emp":
            return lik.gradient(outputs, targets).unsqueeze(0)
        if self.kind == "fisher_mc":
            samples = [lik.gradient(outputs, lik.sample(outputs, generator)) for _ in range(self.mc_samples)]
            return torch.stack(samples) / math.sqrt(self.mc_samples)
        root = lik.hessian_sqrt(outputs)  # (B, O, K)
        return root.permute(2, 0, 1).reshape(root.shape[2], *outputs.shape)

    def _hooked_blocks(self, units: list[_Unit], recorder: CallRecorder, outputs: Tensor, vectors: Tensor):
        if not units:
            return {}
        prepared = {u.name: u.rule.prepare(u.module, recorder.inputs(u.name), u.local, self.dtype) for u in units}
        totals: dict[str, Tensor] = {}
        targets = [t for u in units for t in recorder.gradient_targets(u.name, [getattr(u.module, n) for n in u.local])]
        for k, vector in enumerate(vectors):
            if targets:  # else no tracked output reaches the loss: all output gradients are zero
                torch.autograd.grad(
                    outputs,
                    targets,
                    grad_outputs=vector.to(outputs.dtype),
                    retain_graph=k + 1 < len(vectors),
                    allow_unused=True,
                )
            for u in units:
                grads = u.rule.output_gradients(u.module, recorder.take_grads(u.name), self.dtype)
                total = self._accumulate(u, prepared[u.name], grads)
                totals[u.name] = total if u.name not in totals else totals[u.name].add_(total)
        blocks = {}
        for u in units:
            if self._structure(u) == "kron":
                A = AffineRule.input_factor(prepared[u.name], self.kfac_approx)
                blocks[u.name] = KronBlock(u.names, u.shapes, A, totals[u.name], len(outputs), prepared[u.name][1])
            else:
                blocks[u.name] = self._block(u, totals[u.name])
        return blocks

    def _accumulate(self, unit: _Unit, prepared, grads) -> Tensor:
        """This backward vector's contribution: G increment, diagonal or dense block."""
        structure = self._structure(unit)
        if structure == "kron":
            return AffineRule.output_factor(grads, self.kfac_approx)
        if structure == "diag":
            fast = unit.rule.diagonal(prepared, grads)
            if fast is not None:
                return fast
        total = None
        for index in _chunks(len(grads), unit.numel):
            parts = unit.rule.per_example_gradients(prepared, grads, index)
            if structure == "diag":
                part = torch.cat([p.square().sum(dim=0) for p in parts])
            else:
                per_example = torch.cat(parts, dim=1)
                part = per_example.T @ per_example
            total = part if total is None else total.add_(part)
        return total

    def _fallback_blocks(self, units: list[_Unit], inputs: tuple[Tensor, ...], vectors: Tensor):
        if not units:
            return {}
        names = [n for u in units for n in u.names]
        sizes = [u.numel for u in units]
        diagonal = self.structure != "full"
        totals: list[Tensor | None] = [None] * len(units)
        for index in _chunks(vectors.shape[1], sum(sizes) * vectors.shape[0]):
            per_example = per_example_gradients(self.module, inputs, names, vectors, index).to(self.dtype)
            per_example = per_example.reshape(-1, per_example.shape[-1])
            for i, part in enumerate(per_example.split(sizes, dim=1)):
                value = part.square().sum(0) if diagonal else part.T @ part
                totals[i] = value if totals[i] is None else totals[i].add_(value)
        return {u.name: self._block(u, total) for u, total in zip(units, totals)}

    def _warn_training_batchnorm(self) -> None:
        if "batchnorm" in self._warned:
            return
        training = [
            u.label() for u in self.units if isinstance(u.module, nn.modules.batchnorm._BatchNorm) and u.module.training
        ]
        if training:
            self._warned.add("batchnorm")
            warnings.warn(
                f"batch-norm modules {', '.join(training)} are in training mode: examples are coupled through "
                "batch statistics, so per-example curvature is an approximation; call module.eval() for exact "
                "curvature",
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return (
            f"CurvatureEngine(kind={self.kind!r}, structure={self.structure!r}, likelihood={self.likelihood!r}, "
            f"modules=[{', '.join(u.label() for u in self.units)}])"
        )


def _check_choice(argument: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _selected(module: nn.Module, modules) -> set[str]:
    names = {id(m): n for n, m in module.named_modules()}
    if modules is None:
        return set(names.values())
    if modules == "last_layer":
        with_params = [n for n, m in module.named_modules() if any(p.requires_grad for p in m.parameters(False))]
        return {with_params[-1]} if with_params else set()
    if isinstance(modules, str):
        raise ValueError(f"modules must be None, 'last_layer' or an iterable of names/modules, got {modules!r}")
    selected = set()
    known = set(names.values())
    for item in modules:
        name = names.get(id(item)) if isinstance(item, nn.Module) else item
        if name not in known:
            raise ValueError(f"modules contains {item!r}, which is not a submodule of the model")
        selected.add(name)
    return selected


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


def _chunks(batch_size: int, numel_per_example: int, budget: int = 2**21):
    """Slices of examples whose per-example gradients hold about ``budget`` numbers.

    Chunks of a few MiB are reused by the allocator; larger fresh buffers are
    page-fault bound on CPU (measured 3.6x slower at 64 MiB than at 8 MiB).
    """
    step = max(1, budget // max(1, numel_per_example))
    return [slice(start, min(start + step, batch_size)) for start in range(0, batch_size, step)]
