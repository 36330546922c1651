"""``MixedGaussian``: a structure per module, e.g. K-FAC for convolutions, diagonal for norms, full for the head.

The structures come as a mapping from module types and module names to "diag", "kron" or "full"
(``bayesso.curvature.structures``: a module's own name first, then its nearest class, else "diag";
"kron" is diagonal for modules without a K-FAC rule). Each block is the block of the single-structure
posterior of its kind (``DiagonalBasis``, ``KroneckerBasis``, ``DenseBasis``): sampling, solves, the
dense views, log-determinants and KL are the block-diagonal combination, so every single-structure
equation holds block by block.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from bayesso.curvature import Block, DenseBlock, KronBlock
from bayesso.curvature.structures import check_structure
from bayesso.posteriors.base import Posterior
from bayesso.posteriors.diagonal import DiagonalBasis
from bayesso.posteriors.eigenbasis import Eigenbasis
from bayesso.posteriors.full import DenseBasis, FullGaussian, check_dense_sizes
from bayesso.posteriors.kronecker import KFAC_DAMPING, KroneckerBasis

__all__ = ["MixedGaussian"]


class MixedGaussian(Posterior):
    """Block-diagonal Gaussian whose blocks have per-module structures.

    Args: as ``Posterior``, plus ``structures`` (the mapping, e.g. ``{nn.Conv2d: "kron",
    nn.BatchNorm2d: "diag", "classifier": "full"}``), ``kfac_damping`` for the Kronecker blocks
    ("exact" or "factored", as ``KroneckerGaussian``) and ``max_dense_bytes`` for the full ones.
    """

    structure = "mixed"

    def __init__(
        self,
        module: nn.Module,
        structures: Mapping[type[nn.Module] | str, str],
        *,
        kfac_damping: str = "exact",
        max_dense_bytes: int = 2**30,
        **kwargs,
    ) -> None:
        if isinstance(structures, str):
            raise ValueError(
                f"structures must be a mapping from module types or names to 'diag', 'kron' or 'full', got "
                f"{structures!r}: for one structure everywhere use the posterior of that structure"
            )
        check_structure(structures, "structures")
        if kfac_damping not in KFAC_DAMPING:
            raise ValueError(f"kfac_damping must be 'exact' or 'factored', got {kfac_damping!r}")
        self._structures = dict(structures)
        self.kfac_damping, self.max_dense_bytes = kfac_damping, max_dense_bytes
        super().__init__(module, **kwargs)

    @property
    def curvature_structure(self) -> dict:
        """The mapping as given (module types and names); ``requested`` holds it resolved per block."""
        return self._structures

    @property
    def default_inv_interval(self) -> int:
        """Full blocks' interval (10) if there is a full block, else 1 (``FullGaussian``'s reasoning)."""
        return FullGaussian.default_inv_interval if "full" in self.statistic.structures.values() else 1

    def _check_plans(self, dtype) -> None:
        check_dense_sizes(self, [plan for plan in self.plans if self.requested[plan.name] == "full"], dtype)

    def _factors(self, block: Block) -> list[Tensor]:
        if isinstance(block, KronBlock):
            return [block.A, block.G]
        if isinstance(block, DenseBlock):
            return [block.to_dense()]
        return []

    def _eigenbasis(self, block: Block, eighs: list[tuple[Tensor, Tensor]] | None = None) -> Eigenbasis:
        if isinstance(block, KronBlock):
            return KroneckerBasis(block, self.kfac_damping, eighs)
        if isinstance(block, DenseBlock):
            return DenseBasis(block.to_dense(), eighs[0] if eighs else None)
        return DiagonalBasis(block.diagonal())
