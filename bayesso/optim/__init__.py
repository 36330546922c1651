"""Optimizers: natural-gradient VI (VOGN, noisy K-FAC, noisy Adam, IVON) and the K-FAC SecondOrderOptimizer.

All take a ``BayesianModel`` (``SecondOrderOptimizer`` the module) and step with a closure; IVON also drops
into a torch training loop: ``IVON(net.parameters(), lr, ess=N)``, ``sampled_params(train=True)``, ``step()``.
"""

from bayesso.optim.ivon import IVON, ivon_hessian_update
from bayesso.optim.presets import VOGN, NoisyAdam, NoisyKFAC
from bayesso.optim.second_order import SecondOrderOptimizer
from bayesso.optim.vi import VIOptimizer

PRESETS = {"vogn": VOGN, "noisy_adam": NoisyAdam, "noisy_kfac": NoisyKFAC, "ivon": IVON}

__all__ = [
    "IVON",
    "PRESETS",
    "VOGN",
    "NoisyAdam",
    "NoisyKFAC",
    "SecondOrderOptimizer",
    "VIOptimizer",
    "ivon_hessian_update",
]
