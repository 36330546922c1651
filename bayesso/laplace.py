"""Post-hoc Laplace: a Gaussian posterior at the MAP from the curvature engine, and the marginal likelihood.

Precision = Σ_i curvature_i(θ*) + δ I (docs/laplace.md §1): the posterior's
statistic is the summed curvature over the data divided by N, with temperature τ
(1 by default) and no external damping, so (N/τ)(S + τδ/N) = Σ curvature / τ + δ.
Kronecker blocks use exact damping, G ⊗ A + δ I through the factors' eigenbases.
The Laplace estimate of the evidence is

    log p(D | δ, σ) ≈ -(1/τ) Σ_i ℓ_i(θ*) - ½ Σ_m δ_m ‖θ*_m‖² + ½ Σ_m P_m log δ_m - ½ log det(precision),

differentiable in the prior precision δ (scalar or per module) and, for regression, in
the noise σ: the Gaussian NLL's curvature scales as 1/σ², so the statistic fitted at
σ₀ enters as (σ₀/σ)² S.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayesso.batches import check_loader, checked_batch, located
from bayesso.caller import user_stacklevel
from bayesso.curvature import CurvatureEngine
from bayesso.curvature.structures import Structure, structure_label
from bayesso.distributed import ProcessGrid
from bayesso.likelihoods import Binary, Classification, Regression
from bayesso.posteriors import Posterior, build_posterior
from bayesso.progress import check_progress, progress_bar, track

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["LaplaceFit", "fit_laplace", "log_marginal_likelihood", "optimize_prior_precision", "set_noise"]


@dataclass
class LaplaceFit:
    """What the marginal likelihood needs from the fitting pass over the data.

    ``nll``: Σ_i ℓ_i(θ*) at ``sigma``; regression also keeps Σ ‖y_i - f_i‖² (``squared_error``)
    and the number of output values (``n_outputs``), so the NLL can be re-evaluated at any σ.
    """

    kind: str
    n_examples: int
    nll: float
    squared_error: float = 0.0
    n_outputs: int = 0
    sigma: float = 1.0


def fit_laplace(
    model: BayesianModel,
    loader: Iterable,
    kind: str = "ggn",
    structure: Structure | None = None,
    modules: Iterable | str | None = None,
    prior_precision: float | dict[str, float] | Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = True,
    grid: ProcessGrid | None = None,
) -> tuple[Posterior, LaplaceFit]:
    """Sum the ``kind`` curvature of the NLL at the current weights over ``loader`` into a new posterior.

    The posterior has ``structure`` ("diag", "kron", "full" or a per-module mapping as ``MixedGaussian``;
    default: the model's) over ``modules``
    (default: the model posterior's modules; "last_layer" or a list). The module is in eval mode
    during the pass. Nothing on the model changes if anything fails; the caller installs the result.
    With a ``grid``, each rank passes its own non-empty shard of the data and the sums cover all shards.
    """
    current = model.posterior
    structure = current.curvature_structure if structure is None else structure
    plan_names = [plan.name for plan in current.plans]
    mixed = not isinstance(structure, str)
    options = {"kfac_damping": "exact"} if structure == "kron" or mixed else {}
    if (structure == "full" or mixed) and hasattr(current, "max_dense_bytes"):
        options["max_dense_bytes"] = current.max_dense_bytes
    posterior = build_posterior(
        model.module,
        structure,
        temperature=current.temperature,
        modules=plan_names if modules is None else modules,
        **options,
    )
    posterior.prior_precision = _prior_for(current, posterior, prior_precision)
    engine = CurvatureEngine(
        model.module,
        model.likelihood,
        kind,
        posterior.curvature_structure,
        modules=[plan.name for plan in posterior.plans],
        mc_samples=mc_samples,
        dtype=posterior.dtype,
    )
    total, record = _summed_curvature(model, engine, loader, kind, generator, progress, grid or ProcessGrid())
    posterior.dataset_size = record.n_examples
    posterior.update_statistic(total * (1.0 / record.n_examples), grid=grid)
    return posterior, record


def _prior_for(current: Posterior, new: Posterior, given) -> Tensor | float:
    if given is not None:
        return given
    if [p.name for p in current.plans] == [p.name for p in new.plans]:
        return current.prior_precision.clone()
    values = current.prior_precision
    if torch.all(values == values[0]):
        return float(values[0])
    raise ValueError("the model's prior precision differs per module and the modules changed: pass prior_precision")


def _summed_curvature(model: BayesianModel, engine: CurvatureEngine, loader, kind, generator, progress, grid):
    module, likelihood = model.module, model.likelihood
    was_training = module.training
    module.eval()
    total, nll, squared, n_outputs, count = None, 0.0, 0.0, 0, 0
    try:
        with grid.lockstep("Laplace pass") as shared:  # a failure on any rank raises on every rank
            check_loader(loader)
            check_progress(progress)
            batches = track(
                loader, f"Laplace ({kind}, {structure_label(engine.structure)})", progress and grid.rank == 0
            )
            for index, batch in enumerate(batches):
                with located(f"fit_laplace, batch {index + 1}"):
                    x, y = checked_batch(module, likelihood, batch)  # on the module's device, in its dtype
                    curvature = engine.compute(x, y, generator=generator)
                with torch.no_grad():
                    outputs = module(x)
                    nll += float(likelihood.nll(outputs, y))
                    if isinstance(likelihood, Regression):
                        squared += float((y - outputs).double().square().sum())
                        n_outputs += outputs.numel()
                total = curvature if total is None else total + curvature
                count += len(y)
            if total is None:
                raise ValueError("fit_laplace: the loader yielded no batches: Laplace needs data")
            shared.values = [nll, squared, n_outputs, count]
    finally:
        module.train(was_training)
    if grid.active:
        total = grid.sum_curvature(total)
        nll, squared, n_outputs, count = shared.totals.tolist()
        n_outputs, count = round(n_outputs), round(count)
    if not math.isfinite(nll) or not bool(torch.isfinite(total.flatten()).all()):
        raise FloatingPointError(f"non-finite NLL ({nll}) or curvature at the current weights; nothing was changed")
    sigma = likelihood.sigma_value if isinstance(likelihood, Regression) else 1.0
    return total, LaplaceFit(kind, count, nll, squared, n_outputs, sigma)


def log_marginal_likelihood(
    model: BayesianModel, prior_precision: float | Tensor | None = None, sigma: float | Tensor | None = None
) -> Tensor:
    """Laplace's log evidence (float64 scalar), differentiable in ``prior_precision`` and ``sigma`` tensors.

    ``prior_precision``: a scalar or one value per posterior block (default: the posterior's);
    ``sigma``: the regression noise (default: the one at fitting time).
    """
    fit: LaplaceFit | None = getattr(model, "laplace_fit", None)
    if fit is None:
        raise ValueError("log_marginal_likelihood needs a Laplace posterior: call fit_laplace(loader) first")
    posterior = model.posterior
    n_blocks = len(posterior.plans)
    delta = posterior.prior_precision if prior_precision is None else torch.as_tensor(prior_precision)
    if delta.numel() not in (1, n_blocks):
        raise ValueError(f"prior_precision must be a scalar or have {n_blocks} values (one per block), got "
                         f"{delta.numel()}")  # fmt: skip
    if not bool((delta.detach() > 0).all()):
        raise ValueError(f"prior_precision must be positive, got {delta.detach().tolist()}")
    delta = delta.double().reshape(-1).expand(n_blocks)
    nll, scale = torch.tensor(fit.nll, dtype=torch.float64), 1.0
    if sigma is not None:
        if not isinstance(model.likelihood, Regression):
            raise ValueError(
                "sigma is the noise of the regression likelihood; this model is not regression (its likelihood is "
                f"{type(model.likelihood).__name__})"
            )
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if not bool(sigma.detach() > 0):
            raise ValueError(f"sigma must be positive, got {float(sigma.detach())}")
        nll = fit.squared_error / (2 * sigma**2) + 0.5 * fit.n_outputs * torch.log(2 * math.pi * sigma**2)
        scale = (fit.sigma / sigma) ** 2
    mean = posterior.mean().double()
    prior = delta.new_zeros(())
    for i, where in enumerate(posterior.block_slices()):
        if posterior.plans[i].name in posterior.deterministic:
            continue
        size = where.stop - where.start
        prior = prior - 0.5 * delta[i] * mean[where].square().sum() + 0.5 * size * delta[i].log()
    log_det = posterior.log_det_precision(delta, scale)
    return -nll / posterior.temperature + prior - 0.5 * log_det


def optimize_prior_precision(
    model: BayesianModel,
    method: str = "marglik",
    granularity: str = "scalar",
    optimize_sigma: bool = False,
    val_loader: Iterable | None = None,
    grid: Iterable[float] | None = None,
    predictive: str | None = None,
    n_samples: int = 32,
    max_iter: int = 100,
    progress: bool = True,
) -> dict[str, object]:
    """Tune δ (and, for regression with ``optimize_sigma``, σ) and install them on the model.

    ``method="marglik"``: maximise ``log_marginal_likelihood`` over log δ (one value, or one per
    block with ``granularity="module"``) and log σ by L-BFGS. ``method="grid"``: the δ in ``grid``
    (default 10^-3 ... 10^3) with the lowest NLL of the ``predictive`` (default "probit", or
    "linearized" for regression) on ``val_loader``. Returns the chosen values and the objective.
    ``progress``: a bar over the grid, or over the evidence evaluations (``bayesso.progress``).
    """
    check_progress(progress)
    if method not in ("marglik", "grid"):
        raise ValueError(f"method must be 'marglik' or 'grid', got {method!r}")
    if granularity not in ("scalar", "module"):
        raise ValueError(f"granularity must be 'scalar' or 'module', got {granularity!r}")
    regression = not isinstance(model.likelihood, (Classification, Binary))  # the default grid predictive
    if optimize_sigma and not isinstance(model.likelihood, Regression):
        raise ValueError(
            "optimize_sigma needs the regression likelihood, whose one noise σ it tunes; "
            f"{type(model.likelihood).__name__} has no σ (a heteroscedastic model predicts its noise)"
        )
    if getattr(model, "laplace_fit", None) is None:
        raise ValueError("optimize_prior_precision needs a Laplace posterior: call fit_laplace(loader) first")
    if method == "grid":
        if granularity != "scalar" or optimize_sigma:
            raise ValueError("method='grid' tunes one scalar prior precision (granularity='scalar', no sigma)")
        if val_loader is None:
            raise ValueError("method='grid' scores each prior precision on held-out data: pass val_loader")
        return _grid_search(model, val_loader, grid, predictive or ("linearized" if regression else "probit"),
                            n_samples, progress)  # fmt: skip
    return _maximise_evidence(model, granularity, optimize_sigma, max_iter, progress)


def _maximise_evidence(
    model: BayesianModel, granularity: str, optimize_sigma: bool, max_iter: int, progress: bool
) -> dict:
    posterior, fit = model.posterior, model.laplace_fit
    logs = posterior.prior_precision.double().log()
    log_delta = (logs.mean().reshape(1) if granularity == "scalar" else logs.clone()).requires_grad_(True)
    log_sigma = torch.tensor(math.log(fit.sigma), dtype=torch.float64, device=logs.device, requires_grad=True)
    variables = [log_delta, log_sigma] if optimize_sigma else [log_delta]
    optimizer = torch.optim.LBFGS(variables, lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-14)  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        sigma = log_sigma.exp() if optimize_sigma else None
        loss = -log_marginal_likelihood(model, log_delta.exp(), sigma) / fit.n_examples
        loss.backward()
        bar.update()
        return loss

    with progress_bar(None, "prior precision, evidence evaluations", progress) as bar:
        optimizer.step(closure)
    delta, sigma = log_delta.detach().exp(), float(log_sigma.detach().exp())
    if not bool(torch.isfinite(delta).all()) or not math.isfinite(sigma):
        raise FloatingPointError("the evidence maximisation diverged; the prior precision was left unchanged")
    posterior.prior_precision = delta.to(posterior.dtype)
    if optimize_sigma:
        set_noise(model, sigma)
    with torch.no_grad():
        evidence = float(log_marginal_likelihood(model))
    return {"prior_precision": posterior.prior_precision.clone(), "sigma": sigma if optimize_sigma else None,
            "log_marginal_likelihood": evidence}  # fmt: skip


def set_noise(model: BayesianModel, sigma: float) -> None:
    """Move a regression Laplace posterior to noise σ: statistic × (σ₀/σ)², NLL re-evaluated."""
    fit = model.laplace_fit
    scale = (fit.sigma / sigma) ** 2
    model.posterior.update_statistic(model.posterior.statistic * scale)
    model.likelihood.sigma = sigma
    fit.nll = fit.squared_error / (2 * sigma**2) + 0.5 * fit.n_outputs * math.log(2 * math.pi * sigma**2)
    fit.sigma = sigma


def _grid_search(model: BayesianModel, val_loader, grid, predictive: str, n_samples: int, progress: bool) -> dict:
    from bayesso.predict.metrics import evaluate
    from bayesso.predict.temperature import warn_if_single_class

    values = [float(v) for v in (torch.logspace(-3, 3, 25) if grid is None else grid)]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"grid must hold positive finite prior precisions, got {values}")
    check_loader(val_loader, passes=len(values), what="val_loader")
    posterior = model.posterior
    original = posterior.prior_precision.clone()
    scores, labels = [], []
    try:
        for value in track(values, "prior precision grid", progress):
            posterior.prior_precision = value
            generator = torch.Generator().manual_seed(0)
            batches = val_loader if scores else _noting_labels(val_loader, labels)  # the first pass notes the labels
            scores.append(evaluate(model, batches, predictive, n_samples, generator=generator, progress=False)["nll"])
    except BaseException:
        posterior.prior_precision = original
        raise
    if isinstance(model.likelihood, (Classification, Binary)):
        warn_if_single_class(torch.cat(labels), "optimize_prior_precision(method='grid')", user_stacklevel() + 1)
    best = min(range(len(values)), key=scores.__getitem__)
    if len(values) > 1 and values[best] in (min(values), max(values)):
        edge = "largest" if values[best] == max(values) else "smallest"
        hint = ("the MAP's own predictions may be as good on this data" if edge == "largest"
                else "the posterior may be too narrow")  # fmt: skip
        warnings.warn(
            f"the best prior precision {values[best]:.3g} is the {edge} value of the grid; the optimum may lie "
            f"beyond it ({hint}): widen the grid",
            stacklevel=user_stacklevel(),
        )
    posterior.prior_precision = values[best]
    return {"prior_precision": posterior.prior_precision.clone(), "val_nll": scores[best],
            "grid": values, "scores": scores}  # fmt: skip


def _noting_labels(loader: Iterable, labels: list[Tensor]):
    """The batches of ``loader``, unchanged, appending the labels of (x, y) batches to ``labels``."""
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
            labels.append(batch[1].detach().reshape(-1))
        yield batch
