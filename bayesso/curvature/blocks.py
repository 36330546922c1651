"""Curvature blocks of one module: diagonal, Kronecker-factored (K-FAC) and dense.

A block covers the module's trainable parameters, flattened row-major and
concatenated in ``module.parameters()`` order. All blocks describe the curvature
of the SUMMED NLL. Arithmetic keeps that meaning:

- ``a + b`` is the curvature of the union of the two batches;
- ``c * a`` scales the matrix;
- ``a.ema(b, beta)`` is beta * a + (1 - beta) * b as a new block (``ema_`` in place; beta
  weighs the OLD value, as in ``torch.optim.Adam``; PyTorch-SSO's ``ema_decay`` is 1 - beta);
- ``flatten()`` / ``load_flat_()`` give one buffer for all-reduce, additive:
  flatten(a + b) == flatten(a) + flatten(b), so a summed all-reduce adds batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AffineLayout", "Block", "DenseBlock", "DiagBlock", "KronBlock"]


class Block(ABC):
    """Curvature over one module's trainable parameters ``names`` of ``shapes``."""

    structure: str

    def __init__(self, names: tuple[str, ...], shapes: tuple[torch.Size, ...]) -> None:
        self.names = tuple(names)
        self.shapes = tuple(torch.Size(s) for s in shapes)

    @property
    def numel(self) -> int:
        """Number of parameters the block covers."""
        return sum(math.prod(s) for s in self.shapes)

    def _check_same(self, other: Block) -> None:
        if type(other) is not type(self) or other.names != self.names or other.shapes != self.shapes:
            raise ValueError(f"cannot combine {self!r} with {other!r}: structure or parameters differ")

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The (P_m, P_m) matrix over the block's flattened parameters."""

    @abstractmethod
    def diagonal(self) -> Tensor:
        """The (P_m,) diagonal."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The tensors that hold the block's state (in flatten order)."""

    @property
    def flat_numel(self) -> int:
        """Length of the buffer ``flatten`` returns."""
        return sum(t.numel() for t in self.tensors())

    def flatten(self) -> Tensor:
        """One 1-D buffer with the block's state, additive over batches."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def load_flat_(self, buffer: Tensor) -> Block:
        """Overwrite the state from a buffer made by ``flatten`` (in place)."""
        if buffer.numel() != self.flat_numel:
            raise ValueError(f"buffer has {buffer.numel()} elements, the block needs {self.flat_numel}")
        offset = 0
        for t in self.tensors():
            t.copy_(buffer[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return self

    @abstractmethod
    def with_tensors(self, tensors: list[Tensor]) -> Block:
        """A block over the same parameters holding ``tensors`` (in ``tensors()`` order)."""

    def is_finite(self) -> bool:
        """Whether every entry is finite (by sums: a sum is non-finite exactly when an entry is, barring overflow)."""
        return all(bool(torch.isfinite(t.sum())) for t in self.tensors())

    def ema(self, other: Block, beta: float) -> Block:
        """beta * self + (1 - beta) * other as a new block (factor by factor for Kronecker blocks)."""
        self._check_same(other)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        pairs = zip(self.tensors(), other.tensors())
        return self.with_tensors([torch.lerp(new.detach().to(old.dtype), old, beta) for old, new in pairs])

    def ema_(self, other: Block, beta: float) -> Block:
        """self <- beta * self + (1 - beta) * other, in place."""
        for mine, new in zip(self.tensors(), self.ema(other, beta).tensors()):
            mine.copy_(new)
        return self

    @abstractmethod
    def isotropic(self, value: float) -> Block:
        """The block value · I over the same parameters (Kronecker: A = G = sqrt(value) I, so A ⊗ G = value · I)."""

    @abstractmethod
    def __add__(self, other: Block) -> Block:
        """The curvature of both batches together."""

    @abstractmethod
    def __mul__(self, scale: float) -> Block:
        """The block scaled by ``scale``."""

    def as_diagonal(self) -> DiagBlock:
        """A diagonal block holding this block's diagonal (a copy)."""
        return DiagBlock(self.names, self.shapes, self.diagonal().clone())

    def __rmul__(self, scale: float) -> Block:
        return self * scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)}; {self.numel} parameters)"


class _SingleTensorBlock(Block):
    """A block held in one tensor, so that sums and scalings act on that tensor."""

    def with_tensors(self, tensors: list[Tensor]) -> Block:
        (tensor,) = tensors
        return type(self)(self.names, self.shapes, tensor)

    def __add__(self, other: Block) -> Block:
        self._check_same(other)
        return self.with_tensors([self.tensors()[0] + other.tensors()[0]])

    def __mul__(self, scale: float) -> Block:
        return self.with_tensors([self.tensors()[0] * scale])


class DiagBlock(_SingleTensorBlock):
    """Diagonal block: ``values`` (P_m,)."""

    structure = "diag"

    def __init__(self, names, shapes, values: Tensor) -> None:
        super().__init__(names, shapes)
        self.values = values

    def to_dense(self) -> Tensor:
        return torch.diag(self.values)

    def diagonal(self) -> Tensor:
        return self.values

    def isotropic(self, value: float) -> DiagBlock:
        return DiagBlock(self.names, self.shapes, torch.full_like(self.values, value))

    def tensors(self) -> list[Tensor]:
        return [self.values]


class DenseBlock(_SingleTensorBlock):
    """Dense block: ``matrix`` (P_m, P_m)."""

    structure = "full"

    def __init__(self, names, shapes, matrix: Tensor) -> None:
        super().__init__(names, shapes)
        self.matrix = matrix

    def to_dense(self) -> Tensor:
        return self.matrix

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()

    def isotropic(self, value: float) -> DenseBlock:
        eye = torch.eye(self.matrix.shape[0], dtype=self.matrix.dtype, device=self.matrix.device)
        return DenseBlock(self.names, self.shapes, eye * value)

    def tensors(self) -> list[Tensor]:
        return [self.matrix]


@dataclass(frozen=True)
class AffineLayout:
    """How an affine module's parameters map onto Kronecker factors.

    The module computes, per group g, out_g = W_g a_g (+ b_g) with W_g of shape
    (out_features, in_features); ``W.flatten()`` is ordered (group, out, in). The
    input-side vector is [a_g, 1] when the bias is trainable, a_g alone when only
    the weight is, and [1] when only the bias is.
    """

    groups: int
    out_features: int
    in_features: int
    has_weight: bool
    has_bias: bool

    @property
    def input_dim(self) -> int:
        """Size of the input-side factor A."""
        return (self.in_features if self.has_weight else 0) + int(self.has_bias)

    def flat_index(self) -> Tensor:
        """Position in the flat parameter vector of each (group, out, input-side) entry."""
        groups, out, inp = self.groups, self.out_features, self.in_features
        rows = torch.arange(groups * out).view(groups, out, 1)
        parts = []
        if self.has_weight:
            parts.append(rows * inp + torch.arange(inp).view(1, 1, inp))
        if self.has_bias:
            parts.append((self.has_weight * groups * out * inp + rows).expand(groups, out, 1))
        return torch.cat(parts, dim=2)


class KronBlock(Block):
    """K-FAC block: per group, G ⊗ A over the (out, input-side) matrix [W_g | b_g].

    ``A`` (groups, d_in, d_in) is the MEAN over ``n`` examples of the input-side outer
    products, ``G`` (groups, d_out, d_out) the SUM of the output-gradient outer
    products, so that G ⊗ A approximates the summed-NLL block (exact for one example
    through a Linear layer). Groups (grouped convolutions) are independent blocks.
    """

    structure = "kron"

    def __init__(self, names, shapes, A: Tensor, G: Tensor, n: Tensor | float, layout: AffineLayout) -> None:
        super().__init__(names, shapes)
        self.A, self.G, self.layout = A, G, layout
        self.n = torch.as_tensor(n, dtype=A.dtype, device=A.device).reshape(1).clone()

    def to_dense(self) -> Tensor:
        index = self.layout.flat_index().to(self.A.device)
        dense = self.A.new_zeros(self.numel, self.numel)
        for group in range(self.layout.groups):
            rows = index[group].reshape(-1)
            dense[rows.unsqueeze(1), rows.unsqueeze(0)] = torch.kron(self.G[group], self.A[group])
        return dense

    def diagonal(self) -> Tensor:
        index = self.layout.flat_index().to(self.A.device).reshape(-1)
        kron_diag = torch.einsum("go,gi->goi", self.G.diagonal(dim1=1, dim2=2), self.A.diagonal(dim1=1, dim2=2))
        return self.A.new_zeros(self.numel).index_copy_(0, index, kron_diag.reshape(-1))

    def tensors(self) -> list[Tensor]:
        return [self.A, self.G, self.n]

    def isotropic(self, value: float) -> KronBlock:
        root = math.sqrt(value)
        eye_a = torch.eye(self.A.shape[-1], dtype=self.A.dtype, device=self.A.device).expand_as(self.A) * root
        eye_g = torch.eye(self.G.shape[-1], dtype=self.G.dtype, device=self.G.device).expand_as(self.G) * root
        return KronBlock(self.names, self.shapes, eye_a, eye_g, torch.ones_like(self.n), self.layout)

    def with_tensors(self, tensors: list[Tensor]) -> KronBlock:
        A, G, n = tensors
        return KronBlock(self.names, self.shapes, A, G, n, self.layout)

    def flatten(self) -> Tensor:
        return torch.cat([(self.A * self.n).reshape(-1), self.G.reshape(-1), self.n])

    def load_flat_(self, buffer: Tensor) -> KronBlock:
        super().load_flat_(buffer)
        self.A.div_(self.n.clamp_min(torch.finfo(self.n.dtype).tiny))
        return self

    def __add__(self, other: Block) -> KronBlock:
        self._check_same(other)
        n = self.n + other.n
        A = (self.A * self.n + other.A * other.n) / n.clamp_min(torch.finfo(n.dtype).tiny)
        return KronBlock(self.names, self.shapes, A, self.G + other.G, n, self.layout)

    def __mul__(self, scale: float) -> KronBlock:
        return KronBlock(self.names, self.shapes, self.A.clone(), self.G * scale, self.n, self.layout)
