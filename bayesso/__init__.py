"""bayesso: second-order optimization and Bayesian deep learning in PyTorch."""

from bayesso import curvature, likelihoods

__version__ = "0.1.0"

__all__ = ["__version__", "curvature", "likelihoods"]
