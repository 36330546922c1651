"""``PyroBayesianModel``: the Pyro model of a ``BayesianModel``, for its guide (``guide.py``) and for Pyro's inference.

    θ_m ~ N(0, I/δ_m) per random block m (each parameter a ``PyroSample`` site named as in ``named_parameters``),
    y_i | x_i, θ ~ the likelihood of f(x_i; θ), scaled by N / (B τ) for a batch of B of N examples,

so that the ELBO is (N/B)(1/τ) Σ_batch E_q[log p(y_i | θ)] − KL(q ‖ p): bayesso's tempered objective divided
by 1/τ (docs/vi.md). The network is a deep copy turned into a ``PyroModule``: the wrapped module stays a plain
``nn.Module``, and the copy's deterministic and uncovered parameters are fixed at the mean of the conversion.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

from bayesso.likelihoods import Binary, Classification, Regression

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["PyroBayesianModel", "prior_copy", "random_sites"]


def prior_copy(module: nn.Module, stds: dict[str, float | Tensor]) -> nn.Module:
    """A deep copy of ``module`` as a ``PyroModule`` (``module`` itself is left a plain ``nn.Module``) whose
    parameters named in ``stds`` (``named_parameters`` names) are ``PyroSample`` sites with prior N(0, std² I)."""
    network = copy.deepcopy(module)
    to_pyro_module_(network)
    for name, std in stds.items():
        owner, _, local = name.rpartition(".")
        holder = network.get_submodule(owner)
        parameter = getattr(holder, local)
        zero = torch.zeros((), dtype=parameter.dtype, device=parameter.device)
        scale = torch.as_tensor(std).to(zero)
        setattr(holder, local, PyroSample(dist.Normal(zero, scale).expand(parameter.shape).to_event(parameter.ndim)))
    return network


def random_sites(model: BayesianModel) -> dict[str, list[str]]:
    """Each random block's Pyro sites: its parameters' ``named_parameters`` names, in flat order."""
    posterior = model.posterior
    names = {id(p): name for name, p in model.module.named_parameters()}
    return {
        plan.name: [names[id(p)] for p in plan.parameters]
        for plan in posterior.plans
        if plan.name not in posterior.deterministic
    }


class PyroBayesianModel:
    """Callable Pyro model ``(x, y=None) -> outputs`` of a ``BayesianModel`` (classification, binary or regression).

    Sites: one per random parameter (its ``named_parameters`` name), "obs" (the targets, observed when ``y`` is
    given) and the deterministic "probs" (class or positive-class probabilities) or "mean" (regression).
    """

    def __init__(self, model: BayesianModel) -> None:
        if not isinstance(model.likelihood, (Classification, Binary, Regression)):
            raise ValueError(
                f"PyroBayesianModel supports the classification, binary and regression likelihoods, got "
                f"{model.likelihood!r}"
            )
        posterior = model.posterior
        self.model, self.sites = model, random_sites(model)  # random block -> its parameter sites, in flat order
        stds = {
            site: delta.rsqrt()
            for plan, delta in zip(posterior.plans, posterior.prior_precision)
            for site in self.sites.get(plan.name, [])
        }
        self.network = prior_copy(model.module, stds)

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        posterior, likelihood = self.model.posterior, self.model.likelihood
        f = self.network(x)
        batch = x.shape[0]
        size = posterior.dataset_size or batch
        with pyro.plate("data", batch), pyro.poutine.scale(scale=size / (batch * posterior.temperature)):
            if isinstance(likelihood, Classification):
                pyro.deterministic("probs", f.softmax(-1))
                pyro.sample("obs", dist.Categorical(logits=f), obs=y)
            elif isinstance(likelihood, Binary):
                logits = f.reshape(batch)
                pyro.deterministic("probs", logits.sigmoid())
                pyro.sample("obs", dist.Bernoulli(logits=logits), obs=None if y is None else y.reshape(batch).to(f))
            else:
                pyro.deterministic("mean", f)
                sigma = torch.as_tensor(likelihood.sigma_value, dtype=f.dtype, device=f.device)
                pyro.sample("obs", dist.Normal(f, sigma).to_event(f.ndim - 1), obs=y)
        return f
