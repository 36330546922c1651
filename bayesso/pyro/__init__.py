"""Pyro interoperation (the ``pyro`` extra): a ``BayesianModel`` as a Pyro model with its posterior as a guide.

``PyroBayesianModel(model)`` is a Pyro model whose random parameters carry the bayesso prior N(0, I/δ) and
whose likelihood is tempered and scaled to the data set; ``PosteriorGuide(model)`` samples those parameters
from the bayesso posterior, so ``pyro.infer.Predictive``, ``Trace_ELBO`` and the rest of Pyro work on a VI or
Laplace posterior fitted here. ``BayesianModel.fit(method="bbb")`` trains the Bayes-by-Backprop baseline.
"""

import warnings

try:
    with warnings.catch_warnings():  # pyro.infer imports tqdm.auto, which warns in notebooks without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        import pyro  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised with Pyro hidden
    raise ImportError("bayesso.pyro needs Pyro: pip install 'bayesso[pyro]' (or pip install pyro-ppl)") from error

from bayesso.pyro.guide import PosteriorGuide
from bayesso.pyro.model import PyroBayesianModel

__all__ = ["PosteriorGuide", "PyroBayesianModel"]
