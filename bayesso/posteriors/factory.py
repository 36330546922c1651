"""``build_posterior``: the posterior class for a structure name, or ``MixedGaussian`` for a mapping."""

from __future__ import annotations

from torch import nn

from bayesso.curvature.structures import Structure, check_structure
from bayesso.posteriors.base import Posterior
from bayesso.posteriors.diagonal import DiagonalGaussian
from bayesso.posteriors.full import FullGaussian
from bayesso.posteriors.kronecker import KroneckerGaussian
from bayesso.posteriors.mixed import MixedGaussian

__all__ = ["POSTERIORS", "build_posterior"]

POSTERIORS = {"diag": DiagonalGaussian, "kron": KroneckerGaussian, "full": FullGaussian}


def build_posterior(module: nn.Module, structure: Structure, argument: str = "structure", **options) -> Posterior:
    """``POSTERIORS[structure](module, **options)``, or ``MixedGaussian(module, structure, **options)`` for a
    mapping from module types and names to structures; ``argument`` names the caller's argument in errors."""
    check_structure(structure, argument)
    if isinstance(structure, str):
        return POSTERIORS[structure](module, **options)
    return MixedGaussian(module, structure, **options)
