"""Monte Carlo predictive: the network evaluated at posterior samples of its weights.

Samples are drawn in chunks. A chunk runs either as one vectorised forward
(``torch.func.functional_call`` under ``vmap`` over the samples) or as a loop of
forwards with each sample written into the module; a model vmap cannot run falls back
to the loop. Both use the same noise, so a ``generator`` gives the same result either
way. On CPU the loop is as fast or faster (``benchmarks/predictive.py``: vmap 0.9-1.1x
the loop's time for an MLP, 2.5-3.6x for CNNs, whose per-sample weights become grouped
convolutions), so vectorising is the default only on accelerators, where it saves launches.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from bayesso.distributed import ProcessGrid
from bayesso.posteriors import Posterior
from bayesso.predict.predictive import DrawAverage, Predictive, check_n_samples

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["mc_predictive", "sampled_outputs"]

logger = logging.getLogger(__name__)

CHUNK_BUDGET = 2**22  # numbers of parameters and inputs per vectorised chunk of samples


@torch.no_grad()
def mc_predictive(
    model: BayesianModel,
    x: Tensor,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
    keep_samples: bool = False,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
    grid: ProcessGrid | None = None,
) -> Predictive:
    """Average over ``n_samples`` posterior samples θ_s of softmax / sigmoid / identity of f(x; θ_s).

    ``vectorize``: one vmapped forward per chunk of ``chunk_size`` samples (default: about
    2**22 numbers of sampled parameters and inputs per chunk); None means True off the CPU.
    The module is used in its current mode. With a ``grid`` every rank draws the same noise and
    evaluates its share of the samples; the sums are reduced, so every rank gets the unsharded result.
    """
    check_n_samples(n_samples)
    if chunk_size is not None:
        check_n_samples(chunk_size, "chunk_size")
    grid = grid or ProcessGrid()
    if grid.active and (keep_samples or n_samples < grid.world_size):
        raise ValueError(
            f"sharded MC prediction needs n_samples >= world size ({grid.world_size}) and keep_samples=False, got "
            f"n_samples={n_samples}, keep_samples={keep_samples}"
        )
    posterior, mine = model.posterior, grid.sample_slice(n_samples, over_world=True)
    size = chunk_size or max(1, min(n_samples, CHUNK_BUDGET // (posterior.numel + x.numel())))
    average = DrawAverage(model.likelihood, keep_samples)
    if vectorize is None:
        vectorize = x.device.type != "cpu"
    with grid.lockstep("MC prediction"):  # a failure on any rank raises on every rank
        for start in range(0, n_samples, size):
            noise, _ = posterior.sample_noise(min(size, n_samples - start), generator)
            noise = noise[max(0, mine.start - start) : max(0, mine.stop - start)]
            if not len(noise):
                continue
            if vectorize:
                try:
                    average.add(sampled_outputs(model.module, posterior, noise, x))
                    continue
                except (RuntimeError, NotImplementedError) as error:
                    logger.info("vectorised MC prediction failed (%s); using a loop over samples", error)
                    vectorize = False
            average.add(torch.stack([_perturbed_outputs(model.module, posterior, row, x) for row in noise]))
    if grid.active:
        average.reduce(grid)
    return average.result()


def sampled_outputs(module: torch.nn.Module, posterior: Posterior, noise: Tensor, x: Tensor) -> Tensor:
    """f(x; μ + noise_s) for each row of ``noise`` (S, P) in one vmapped forward: (S, B, ...)."""
    names = {id(p): name for name, p in module.named_parameters()}
    params = {name: p.detach() for name, p in module.named_parameters()}
    in_dims = dict.fromkeys(params)
    sizes = [p.numel() for p in posterior.parameters]
    for p, part in zip(posterior.parameters, noise.split(sizes, dim=1)):
        name = names[id(p)]
        params[name] = p.detach() + part.reshape(len(noise), *p.shape).to(p.dtype)
        in_dims[name] = 0
    return vmap(lambda sample: functional_call(module, sample, (x,)), in_dims=(in_dims,))(params)


def _perturbed_outputs(module: torch.nn.Module, posterior: Posterior, noise: Tensor, x: Tensor) -> Tensor:
    with posterior.perturbed(noise):
        return module(x)
