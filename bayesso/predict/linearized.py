"""Linearized (GLM) and probit predictives (docs/predictives.md §2).

Linearizing the network at the posterior mean μ gives Gaussian outputs
f ~ N(f(x; μ), J Σ Jᵀ) with J = ∂f/∂θ at μ. Kronecker blocks of Linear layers use their
rank-one per-example Jacobians (``kronecker_outputs.py``); for the other blocks,
per-example Jacobians come from reverse mode (``torch.func.jacrev`` over chunks of
outputs, ``vmap`` over chunks of examples), and J Σ Jᵀ = Z Zᵀ with Z = Lᵀ Jᵀ from
``Posterior.covariance_root``, so no P × P covariance is formed for diagonal or
Kronecker posteriors. Classification then
averages softmax over draws of f (``linearized``) or uses the probit approximation
softmax(f / sqrt(1 + π/8 · diag var)) (``probit``; sigmoid for binary).
Heteroscedastic regression takes the Gaussian over all 2D outputs (μ, s): the epistemic
variance is the μ block of diag(J Σ Jᵀ), the aleatoric E[e^s] = exp(s̄ + var_s / 2) (lognormal).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call, jacrev, vmap

from bayesso.likelihoods import Binary, Classification, Heteroscedastic, Likelihood, Regression
from bayesso.predict.kronecker_outputs import linear_kronecker_covariance
from bayesso.predict.predictive import DrawAverage, Predictive, check_n_samples, check_predictable, working_precision

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["linearized_outputs", "linearized_predictive", "probit_predictive"]

logger = logging.getLogger(__name__)

JACOBIAN_BUDGET = 2**23  # numbers in one chunk of per-example Jacobians (and as many in Z)


@torch.no_grad()
def linearized_outputs(model: BayesianModel, x: Tensor, output_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(f(x; μ) shaped as the module's outputs, J Σ Jᵀ as (B, O, O)) with the O outputs of an example row-major.

    ``output_chunk`` outputs share one vmapped reverse pass (default: all).
    """
    module, posterior = model.module, model.posterior
    outputs, covariance, handled = linear_kronecker_covariance(module, posterior, x)
    outputs = working_precision(outputs)
    _check_outputs(model, outputs)
    flat = outputs.reshape(len(outputs), -1)
    n_out = flat.shape[1]
    rest = [plan for plan in posterior.plans if plan.name not in handled | posterior.deterministic]
    if covariance is None:
        covariance = flat.new_zeros(len(flat), n_out, n_out)
    if not rest:
        return outputs, covariance.to(flat.dtype)
    names = {id(p): name for name, p in module.named_parameters()}
    covered = [names[id(p)] for plan in rest for p in plan.parameters]
    fixed = {name: p.detach() for name, p in module.named_parameters() if name not in set(covered)}

    def one_example(weights: tuple[Tensor, ...], example: Tensor) -> Tensor:
        params = {**fixed, **dict(zip(covered, weights))}
        return functional_call(module, params, (example.unsqueeze(0),)).reshape(-1)

    def jacobian(examples: Tensor, chunk: int | None) -> tuple[Tensor, ...]:
        return vmap(jacrev(one_example, chunk_size=chunk), in_dims=(None, 0))(weights, examples)

    weights = tuple(p.detach() for plan in rest for p in plan.parameters)
    step = max(1, JACOBIAN_BUDGET // max(1, n_out * sum(plan.numel for plan in rest)))
    parts_of_rest = []
    for start in range(0, len(x), step):
        examples = x[start : start + step]
        try:
            parts = jacobian(examples, output_chunk)
        except (RuntimeError, NotImplementedError) as error:
            if output_chunk == 1:
                raise
            # nested vmap (examples x outputs) lacks batching rules for some ops (e.g. PReLU's backward)
            logger.info("vmap over outputs failed (%s); one reverse pass per output instead", error)
            output_chunk = 1
            parts = jacobian(examples, output_chunk)
        rows = torch.cat([part.reshape(*part.shape[:2], -1) for part in parts], dim=2)  # (b, O, P_rest)
        roots = posterior.covariance_root(rows, names=[plan.name for plan in rest])
        parts_of_rest.append(roots @ roots.transpose(1, 2))
    return outputs, (torch.cat(parts_of_rest) + covariance).to(flat.dtype)


def linearized_predictive(
    model: BayesianModel,
    x: Tensor,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
    keep_samples: bool = False,
) -> Predictive:
    """GLM predictive: exact moments for regression (and heteroscedastic); MC over f ~ N(f(x; μ), J Σ Jᵀ) otherwise.

    ``keep_samples``: also ``n_samples`` draws of the outputs f, as ``samples``.
    """
    check_n_samples(n_samples)
    likelihood = model.likelihood
    check_predictable(likelihood)
    outputs, covariance = linearized_outputs(model, x)
    shape = (len(outputs),) if isinstance(likelihood, Binary) else tuple(outputs.shape)
    mean = outputs.reshape(len(outputs), -1)
    regression = isinstance(likelihood, (Regression, Heteroscedastic))
    if regression and not keep_samples:
        mean, aleatoric, epistemic = _exact_moments(likelihood, outputs, covariance)
        return Predictive(mean=mean, aleatoric=aleatoric, epistemic=epistemic, output_covariance=covariance)
    values, vectors = torch.linalg.eigh(covariance)
    # the symmetric root Q diag(√v) Qᵀ: unlike Q diag(√v), it does not depend on which eigenvectors eigh picks
    # within a repeated eigenvalue, so rounding-level changes in the covariance move the draws by rounding only
    root = (vectors * values.clamp_min(0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)
    where = mean.device if generator is None else generator.device  # a CPU generator serves any device
    eps = torch.randn(n_samples, *mean.shape, dtype=mean.dtype, device=where, generator=generator).to(mean.device)
    draws = mean + torch.einsum("bij,sbj->sbi", root, eps)
    average = DrawAverage(likelihood, keep_samples)
    average.add(draws.reshape(n_samples, *shape))
    predictive = average.result(covariance)
    if regression:  # the exact moments, not the sampled ones
        predictive.mean, predictive.aleatoric, predictive.epistemic = _exact_moments(likelihood, outputs, covariance)
    return predictive


def _exact_moments(likelihood: Likelihood, outputs: Tensor, covariance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, aleatoric, epistemic) of the Gaussian outputs N(outputs, covariance), shaped like the means."""
    variance = covariance.diagonal(dim1=1, dim2=2).reshape(outputs.shape)
    if isinstance(likelihood, Heteroscedastic):
        mean, log_variance = likelihood.split(outputs)
        epistemic, spread = likelihood.split(variance)  # the variances of μ and of s
        return mean, torch.exp(log_variance + spread / 2), epistemic
    return outputs, torch.full_like(outputs, likelihood.sigma_value**2), variance


def probit_predictive(model: BayesianModel, x: Tensor) -> Predictive:
    """softmax(f / sqrt(1 + π/8 · var_k)) per class (sigmoid for binary), var = diag(J Σ Jᵀ)."""
    if not isinstance(model.likelihood, (Classification, Binary)):
        raise ValueError(
            f"method='probit' is for classification and binary likelihoods, got {type(model.likelihood).__name__}; "
            "use 'linearized'"
        )
    outputs, covariance = linearized_outputs(model, x)
    mean, variance = outputs.reshape(len(outputs), -1), covariance.diagonal(dim1=1, dim2=2)
    scaled = mean / (1 + math.pi / 8 * variance).sqrt()
    if isinstance(model.likelihood, Classification):
        probs = torch.softmax(scaled, dim=-1)
    else:
        probs = torch.sigmoid(scaled.squeeze(-1))
    return Predictive(probs=probs, output_covariance=covariance)


def _check_outputs(model: BayesianModel, outputs: Tensor) -> None:
    likelihood = model.likelihood
    if isinstance(likelihood, Classification) and outputs.ndim != 2:
        raise ValueError(
            f"linearized and probit predictives need classification outputs of shape (B, C), got "
            f"{tuple(outputs.shape)}; use method='mc'"
        )
    if isinstance(likelihood, Binary) and (outputs.ndim > 2 or (outputs.ndim == 2 and outputs.shape[1] != 1)):
        raise ValueError(f"binary outputs must be (B,) or (B, 1), got {tuple(outputs.shape)}")
    if isinstance(likelihood, Heteroscedastic):
        likelihood.check_outputs(outputs)
