"""``PosteriorGuide``: a bayesso posterior as a Pyro guide for ``PyroBayesianModel``.

Per call one auxiliary site "_eps" draws ε ~ N(0, I) over the posterior's P parameters; the random
parameters are θ = μ + Σ^½ ε with the symmetric root (``Posterior.root_noise``, the map of
``sample_noise`` and so of ``predict(method="mc")``), each given to its model site as a ``Delta``. The
change of variables adds log |det ∂ε/∂θ| = ½ log det Σ⁻¹ to the guide's log-density (on the first
site), so log q(θ) = log N(ε; 0, I) + ½ log det Σ⁻¹ is the posterior's density and ``Trace_ELBO`` is the
ELBO of the bayesso posterior.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from bayesso.pyro.model import random_sites

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["PosteriorGuide"]


class GeneratedNormal(dist.Normal):
    """N(0, I) over (P,) whose samples come from a ``torch.Generator`` (one ``randn(P)`` per draw, the stream of
    ``predict(..., generator=g, chunk_size=1)``), so that a guide and bayesso's predictive can share the noise."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> None:
        zero = torch.zeros(size, dtype=dtype, device=device)
        super().__init__(zero, torch.ones_like(zero))
        self.generator = generator

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self.loc.dtype, generator=self.generator, device=self.generator.device).to(
            self.loc.device
        )

    rsample = sample


class PosteriorGuide:
    """Callable guide ``(x, y=None)`` over the random parameters of ``PyroBayesianModel(model)``.

    ``generator``: draw ε from it (else from Pyro's random state), one ``randn(P)`` per call, as
    ``model.predict(x, n_samples=S, method="mc", generator=..., chunk_size=1)`` draws them: the same
    generator state gives the same weights. ``Predictive(pyro_model, guide=guide, num_samples=S)`` calls
    the guide once more, first, to find its plates, so its S samples are the 2nd to (S + 1)-th draws.
    """

    def __init__(self, model: BayesianModel, generator: torch.Generator | None = None) -> None:
        self.model, self.generator = model, generator
        self.sites = random_sites(model)

    def __call__(self, x: Tensor | None = None, y: Tensor | None = None) -> dict[str, Tensor]:
        posterior = self.model.posterior
        size, dtype, device = posterior.numel, posterior.dtype, posterior.device
        if self.generator is None:
            zero = torch.zeros(size, dtype=dtype, device=device)
            noise = dist.Normal(zero, torch.ones_like(zero)).to_event(1)
        else:
            noise = GeneratedNormal(size, dtype, device, self.generator).to_event(1)
        eps = pyro.sample("_eps", noise, infer={"is_auxiliary": True})
        theta = posterior.mean() + posterior.root_noise(eps)
        log_jacobian = 0.5 * posterior.log_det_precision()
        values = {}
        for plan, where in zip(posterior.plans, posterior.block_slices()):
            if plan.name not in self.sites:
                continue
            start = where.start
            for site, parameter in zip(self.sites[plan.name], plan.parameters):
                value = theta[start : start + parameter.numel()].reshape(parameter.shape).to(parameter)
                start += parameter.numel()
                delta = dist.Delta(value, log_density=log_jacobian, event_dim=parameter.ndim)
                values[site] = pyro.sample(site, delta)
                log_jacobian = torch.zeros_like(log_jacobian)
        return values
