"""Per-module curvature rules: per-example gradients (and K-FAC factors) from hooks.

A rule turns what forward hooks recorded for one module (its input at each call)
and the gradient of one backward vector with respect to the module's output at
each call into per-example gradients of the module's trainable parameters,
flattened row-major and concatenated in ``module.parameters()`` order. Calls of a
module used several times in one forward are summed per example, so weight
sharing gives the exact per-example gradient. All rules assume the batch in
dimension 0 of the module's input and output.

Rules exist for Linear (any number of leading dimensions), Conv1d, Conv2d,
BatchNorm1d/2d/3d, GroupNorm, LayerNorm and Embedding; ``register_rule`` adds more.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayesso.curvature.blocks import AffineLayout

__all__ = ["AffineRule", "ModuleRule", "register_rule", "rule_for"]


class ModuleRule(ABC):
    """Per-example gradients of one module type; ``trainable`` names its parameters in the block."""

    has_kron = False

    def supports(self, module: nn.Module) -> bool:
        """Whether this rule is exact for this instance (else the generic fallback is used)."""
        return True

    @abstractmethod
    def prepare(self, module: nn.Module, inputs: Sequence[Tensor], trainable: tuple[str, ...], dtype) -> Any:
        """What the statistics need from the inputs of all calls (computed once per batch)."""

    @abstractmethod
    def output_gradients(self, module: nn.Module, grads: Sequence[Tensor], dtype) -> Any:
        """The recorded output gradients of all calls for one backward vector, in the rule's layout."""

    @abstractmethod
    def per_example_gradients(self, prepared: Any, grads: Any, index: slice) -> list[Tensor]:
        """Per-example gradients of the examples in ``index``: one (b, numel) tensor per trainable parameter."""

    def diagonal(self, prepared: Any, grads: Any) -> Tensor | None:
        """Sum over examples of squared per-example gradients without forming them, if possible."""
        return None


class AffineRule(ModuleRule):
    """Modules computing out = W a (+ b) per position and group: Linear and convolutions.

    ``prepare`` gives the input vectors a of shape (B, R, groups, in_features)
    (positions R of all calls concatenated; (B, 1, groups, 0) if the weight is frozen) and
    ``output_gradients`` the output gradients (B, R, groups, out_features). Weight
    entries come out in ``W.flatten()`` order (group, out, in), then the bias.
    """

    has_kron = True

    @abstractmethod
    def patches(self, module: nn.Module, x: Tensor) -> Tensor:
        """Input vectors of one call, (B, R, groups, in_features)."""

    @abstractmethod
    def output_gradient(self, module: nn.Module, grad: Tensor) -> Tensor:
        """Output gradient of one call, (B, R, groups, out_features)."""

    @abstractmethod
    def layout(self, module: nn.Module, trainable: tuple[str, ...]) -> AffineLayout:
        """Factor layout for the trainable parameters."""

    def prepare(self, module, inputs, trainable, dtype):
        layout = self.layout(module, trainable)
        if layout.has_weight:
            a = _cat([self.patches(module, x.to(dtype)) for x in inputs])
        else:  # bias only: no input vectors; the input side of K-FAC is the constant 1
            a = inputs[0].new_zeros(inputs[0].shape[0], 1, layout.groups, 0, dtype=dtype)
        return a, layout

    def output_gradients(self, module, grads, dtype):
        return _cat([self.output_gradient(module, g.to(dtype)) for g in grads])

    def per_example_gradients(self, prepared, grads, index):
        a, layout = prepared
        g = grads[index]
        parts = [torch.einsum("brgo,brgi->bgoi", g, a[index]).flatten(1)] if layout.has_weight else []
        if layout.has_bias:
            parts.append(g.sum(dim=1).flatten(1))
        return parts

    def diagonal(self, prepared, grads):
        a, layout = prepared
        if grads.shape[1] != 1:  # positions or repeated calls: square after summing per example
            return None
        squared = grads[:, 0].square()
        parts = [torch.einsum("bgo,bgi->goi", squared, a[:, 0].square()).flatten()] if layout.has_weight else []
        if layout.has_bias:
            parts.append(squared.sum(dim=0).flatten())
        return _cat(parts, dim=0)

    @staticmethod
    def input_factor(prepared, approx: str) -> Tensor:
        """A (groups, d_in, d_in): mean over examples (expand: and positions) of [a, 1] [a, 1]^T."""
        a, layout = prepared
        batch, positions, groups, features = a.shape
        rows = a.mean(dim=1) if approx == "reduce" else a.reshape(batch * positions, groups, features)
        count = rows.shape[0]
        scaled = rows / count if count < features else rows  # scale whichever side is smaller
        inner = torch.einsum("ngi,ngj->gij", scaled, rows)
        if count >= features:
            inner.div_(count)
        if not layout.has_bias:
            return inner
        # the appended 1 without copying the rows: [[aᵀa, aᵀ1], [1ᵀa, n]] / n
        column = rows.mean(dim=0).unsqueeze(2)
        corner = rows.new_ones(groups, 1, 1)
        return torch.cat([torch.cat([inner, column], dim=2), torch.cat([column.transpose(1, 2), corner], dim=2)], dim=1)

    @staticmethod
    def output_factor(grads: Tensor, approx: str) -> Tensor:
        """G (groups, d_out, d_out): sum over examples (expand: and positions) of g g^T."""
        if approx == "reduce":
            total = grads.sum(dim=1)
            return torch.einsum("bgo,bgp->gop", total, total)
        return torch.einsum("brgo,brgp->gop", grads, grads)


def _cat(tensors: list[Tensor], dim: int = 1) -> Tensor:
    """torch.cat that does not copy a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _affine_layout(module, trainable, groups, out_features, in_features) -> AffineLayout:
    return AffineLayout(groups, out_features, in_features, "weight" in trainable, "bias" in trainable)


class LinearRule(AffineRule):
    """nn.Linear on inputs (B, *, in_features); the leading dimensions are positions."""

    def patches(self, module, x):
        return x.reshape(x.shape[0], -1, 1, x.shape[-1])

    def output_gradient(self, module, grad):
        return grad.reshape(grad.shape[0], -1, 1, grad.shape[-1])

    def layout(self, module, trainable):
        return _affine_layout(module, trainable, 1, module.out_features, module.in_features)


class ConvRule(AffineRule):
    """nn.Conv1d / nn.Conv2d with zero padding (stride, dilation, groups, "same"/"valid")."""

    def supports(self, module):
        return module.padding_mode == "zeros"

    def _padding(self, module) -> tuple[list[int], list[int]]:
        """(before, after) zero padding per spatial dimension that reproduces the module's."""
        before, after = [], []
        for dim, kernel in enumerate(module.kernel_size):
            if module.padding == "valid":
                left = right = 0
            elif module.padding == "same":
                total = module.dilation[dim] * (kernel - 1)
                left, right = total // 2, total - total // 2
            else:
                left = right = module.padding[dim]
            before.append(left)
            after.append(right)
        return before, after

    def patches(self, module, x):
        before, after = self._padding(module)
        if before != after:  # asymmetric "same" padding: pad explicitly
            x = F.pad(x, [p for pair in zip(reversed(before), reversed(after)) for p in pair])
            before = [0] * len(before)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if len(kernel) == 1:  # Conv1d as a Conv2d of height 1
            x, kernel, dilation, stride, before = (
                x.unsqueeze(2),
                (1, *kernel),
                (1, *dilation),
                (1, *stride),
                [0, *before],
            )
        cols = F.unfold(x, kernel, dilation=dilation, padding=before, stride=stride)  # (B, C * prod(kernel), R)
        groups = module.groups
        return cols.view(x.shape[0], groups, -1, cols.shape[-1]).permute(0, 3, 1, 2)

    def output_gradient(self, module, grad):
        groups = module.groups
        return grad.reshape(grad.shape[0], groups, module.out_channels // groups, -1).permute(0, 3, 1, 2)

    def layout(self, module, trainable):
        groups = module.groups
        fan_in = module.in_channels // groups * math.prod(module.kernel_size)
        return _affine_layout(module, trainable, groups, module.out_channels // groups, fan_in)


class NormRule(ModuleRule):
    """Affine normalisation out = x_hat * weight + bias: BatchNorm, GroupNorm, LayerNorm.

    x_hat is recomputed from the recorded input with the statistics the module
    used (batch statistics in training mode, running statistics in eval mode).
    """

    def _normalized(self, module, x) -> Tensor:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            batch_stats = module.training or module.running_mean is None
            mean = None if batch_stats else module.running_mean.to(x.dtype)
            var = None if batch_stats else module.running_var.to(x.dtype)
            return F.batch_norm(x, mean, var, training=batch_stats, eps=module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, eps=module.eps)
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    def _features(self, module, t: Tensor) -> Tensor:
        """(B, R, F): features that share one affine parameter as the last dimension."""
        if isinstance(module, nn.LayerNorm):
            return t.reshape(t.shape[0], -1, math.prod(module.normalized_shape))
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)

    def prepare(self, module, inputs, trainable, dtype):
        x_hat = _cat([self._features(module, self._normalized(module, x.to(dtype))) for x in inputs])
        return x_hat, trainable

    def output_gradients(self, module, grads, dtype):
        return _cat([self._features(module, g.to(dtype)) for g in grads])

    def per_example_gradients(self, prepared, grads, index):
        x_hat, trainable = prepared
        g = grads[index]
        parts = {"weight": lambda: (g * x_hat[index]).sum(dim=1), "bias": lambda: g.sum(dim=1)}
        return [parts[name]() for name in trainable]


class EmbeddingRule(ModuleRule):
    """nn.Embedding (not ``scale_grad_by_freq``); rows of ``padding_idx`` get no gradient."""

    def supports(self, module):
        return not module.scale_grad_by_freq

    def prepare(self, module, inputs, trainable, dtype):
        index = _cat([x.reshape(x.shape[0], -1) for x in inputs])
        keep = torch.ones_like(index, dtype=torch.bool)
        if module.padding_idx is not None:
            keep = index != module.padding_idx
        return index, keep, module.num_embeddings

    def output_gradients(self, module, grads, dtype):
        return _cat([g.to(dtype).reshape(g.shape[0], -1, g.shape[-1]) for g in grads])

    def per_example_gradients(self, prepared, grads, index):
        rows, keep, num = prepared
        g = grads[index] * keep[index].unsqueeze(-1)
        batch = torch.arange(g.shape[0], device=g.device).unsqueeze(1).expand_as(rows[index])
        out = g.new_zeros(g.shape[0], num, g.shape[-1])
        out.index_put_((batch, rows[index]), g, accumulate=True)
        return [out.reshape(g.shape[0], -1)]

    def diagonal(self, prepared, grads):
        rows, keep, num = prepared
        batch_size, dim = grads.shape[0], grads.shape[-1]
        # One slot per (example, row) pair: sum the example's gradient on that row, then square.
        key = (torch.arange(batch_size, device=rows.device).unsqueeze(1) * num + rows)[keep]
        pairs, slot = torch.unique(key, return_inverse=True)
        summed = grads.new_zeros(pairs.numel(), dim).index_add_(0, slot, grads[keep])
        diag = grads.new_zeros(num, dim).index_add_(0, pairs % num, summed.square())
        return diag.reshape(-1)


_RULES: dict[type[nn.Module], ModuleRule] = {}


def register_rule(module_type: type[nn.Module], rule: ModuleRule) -> None:
    """Use ``rule`` for modules of exactly ``module_type`` (subclasses need their own entry)."""
    if not isinstance(rule, ModuleRule):
        raise ValueError(f"rule must be a ModuleRule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> ModuleRule | None:
    """The rule for this module, or None if it needs the generic fallback."""
    rule = _RULES.get(type(module))
    return rule if rule is not None and rule.supports(module) else None


for _type, _rule in [
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.BatchNorm1d, NormRule()),
    (nn.BatchNorm2d, NormRule()),
    (nn.BatchNorm3d, NormRule()),
    (nn.GroupNorm, NormRule()),
    (nn.LayerNorm, NormRule()),
    (nn.Embedding, EmbeddingRule()),
]:
    register_rule(_type, _rule)
