"""Gaussian posteriors over a module's parameters: diagonal, Kronecker-factored, full and per-module mixed blocks."""

from bayesso.posteriors.base import Posterior
from bayesso.posteriors.diagonal import DiagonalGaussian
from bayesso.posteriors.eigenbasis import Eigenbasis
from bayesso.posteriors.factory import POSTERIORS, build_posterior
from bayesso.posteriors.full import FullGaussian
from bayesso.posteriors.kronecker import KroneckerGaussian
from bayesso.posteriors.mixed import MixedGaussian

__all__ = [
    "POSTERIORS",
    "DiagonalGaussian",
    "Eigenbasis",
    "FullGaussian",
    "KroneckerGaussian",
    "MixedGaussian",
    "Posterior",
    "build_posterior",
]
