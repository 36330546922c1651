"""bayesso: second-order optimization and Bayesian deep learning in PyTorch."""

from bayesso import curvature, likelihoods, optim, posteriors, predict
from bayesso.ensemble import Ensemble
from bayesso.model import BayesianModel

__version__ = "0.1.0"

__all__ = ["BayesianModel", "Ensemble", "__version__", "curvature", "likelihoods", "optim", "posteriors", "predict"]
