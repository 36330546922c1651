"""Gaussian posteriors over a module's parameters: diagonal, Kronecker-factored and full blocks."""

from bayesso.posteriors.base import Posterior
from bayesso.posteriors.diagonal import DiagonalGaussian
from bayesso.posteriors.eigenbasis import Eigenbasis
from bayesso.posteriors.full import FullGaussian
from bayesso.posteriors.kronecker import KroneckerGaussian

POSTERIORS = {"diag": DiagonalGaussian, "kron": KroneckerGaussian, "full": FullGaussian}

__all__ = ["POSTERIORS", "DiagonalGaussian", "Eigenbasis", "FullGaussian", "KroneckerGaussian", "Posterior"]
