"""``Curvature``: the block-diagonal curvature of a summed NLL, one block per module."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesso.curvature.blocks import Block

__all__ = ["Curvature"]


class Curvature:
    """Per-module curvature blocks of the SUMMED negative log-likelihood over ``n_examples``.

    ``blocks`` maps a module's qualified name ("" for the root) to its block. The
    dense view runs over all trainable parameters of the module the engine was
    built on (``parameter_names``, in ``module.parameters()`` order, each flattened
    row-major), with zeros between blocks and for parameters no block covers.
    """

    def __init__(
        self,
        blocks: dict[str, Block],
        parameter_names: tuple[str, ...],
        parameter_shapes: tuple[torch.Size, ...],
        kind: str,
        n_examples: int,
    ) -> None:
        self.blocks = dict(blocks)
        self.parameter_names = tuple(parameter_names)
        self.parameter_shapes = tuple(torch.Size(s) for s in parameter_shapes)
        self.kind = kind
        self.n_examples = n_examples
        self._offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in zip(self.parameter_names, self.parameter_shapes):
            self._offsets[name] = (start, math.prod(shape))
            start += math.prod(shape)
        self.numel = start

    @property
    def structures(self) -> dict[str, str]:
        """Structure actually used per module ("diag", "kron" or "full")."""
        return {name: block.structure for name, block in self.blocks.items()}

    def _block_index(self, block: Block) -> Tensor:
        return torch.cat([torch.arange(start, start + size) for start, size in map(self._offsets.get, block.names)])

    def _covered_index(self) -> Tensor:
        covered = {name for block in self.blocks.values() for name in block.names}
        parts = [torch.arange(s, s + n) for name, (s, n) in self._offsets.items() if name in covered]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def _reference(self) -> Tensor:
        return next(iter(self.blocks.values())).tensors()[0]

    def to_dense(self, covered_only: bool = False) -> Tensor:
        """The (P, P) matrix; with ``covered_only`` only the rows/columns of covered parameters."""
        ref = self._reference()
        dense = ref.new_zeros(self.numel, self.numel)
        for block in self.blocks.values():
            index = self._block_index(block).to(ref.device)
            dense[index.unsqueeze(1), index.unsqueeze(0)] = block.to_dense()
        if covered_only:
            index = self._covered_index().to(ref.device)
            dense = dense[index.unsqueeze(1), index.unsqueeze(0)]
        return dense

    def diagonal(self) -> Tensor:
        """The (P,) diagonal, zero for parameters no block covers."""
        ref = self._reference()
        diag = ref.new_zeros(self.numel)
        for block in self.blocks.values():
            diag[self._block_index(block).to(ref.device)] = block.diagonal()
        return diag

    def _like(self, blocks: dict[str, Block], n_examples: int) -> Curvature:
        return Curvature(blocks, self.parameter_names, self.parameter_shapes, self.kind, n_examples)

    def with_blocks(self, blocks: dict[str, Block]) -> Curvature:
        """A curvature over the same parameters with ``blocks`` (same names) in place of these."""
        if blocks.keys() != self.blocks.keys():
            raise ValueError("with_blocks needs a block for every module of this curvature")
        return self._like(blocks, self.n_examples)

    def _check_same(self, other: Curvature) -> None:
        if not isinstance(other, Curvature) or other.blocks.keys() != self.blocks.keys():
            raise ValueError("cannot combine curvatures over different modules")

    def __add__(self, other: Curvature) -> Curvature:
        self._check_same(other)
        blocks = {name: block + other.blocks[name] for name, block in self.blocks.items()}
        return self._like(blocks, self.n_examples + other.n_examples)

    def __mul__(self, scale: float) -> Curvature:
        return self._like({name: block * scale for name, block in self.blocks.items()}, self.n_examples)

    def __rmul__(self, scale: float) -> Curvature:
        return self * scale

    def isotropic(self, value: float) -> Curvature:
        """value · I in every block (``Block.isotropic``), e.g. an initial statistic s0 I."""
        return self.with_blocks({name: block.isotropic(value) for name, block in self.blocks.items()})

    def clone(self) -> Curvature:
        """A copy with its own tensors."""
        return self * 1.0

    def ema_(self, other: Curvature, beta: float) -> Curvature:
        """self <- beta * self + (1 - beta) * other, in place (beta weighs the old value)."""
        self._check_same(other)
        for name, block in self.blocks.items():
            block.ema_(other.blocks[name], beta)
        return self

    def entry_sum(self) -> Tensor:
        """The sum of every stored entry of every block (0-dim): non-finite exactly when an entry is (barring
        overflow), so one host read checks the whole curvature (``Block.is_finite`` then names the block)."""
        return sum(t.sum() for block in self.blocks.values() for t in block.tensors())

    def flatten(self) -> Tensor:
        """All blocks in one 1-D buffer (module order), additive over batches; see ``blocks``."""
        return torch.cat([block.flatten() for block in self.blocks.values()])

    def load_flat_(self, buffer: Tensor) -> Curvature:
        """Overwrite every block from a buffer made by ``flatten`` (in place)."""
        needed = sum(block.flat_numel for block in self.blocks.values())
        if buffer.numel() != needed:
            raise ValueError(f"buffer has {buffer.numel()} elements, the curvature needs {needed}")
        offset = 0
        for block in self.blocks.values():
            block.load_flat_(buffer[offset : offset + block.flat_numel])
            offset += block.flat_numel
        return self

    def __repr__(self) -> str:
        parts = ", ".join(f"{name or '(root)'}: {block.structure}" for name, block in self.blocks.items())
        return f"Curvature(kind={self.kind!r}, n_examples={self.n_examples}, blocks={{{parts}}})"
