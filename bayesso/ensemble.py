"""Ensembles: equal-weight mixtures of ``BayesianModel``s, and the deep-ensemble baseline.

An ``Ensemble`` of k members predicts with the mixture p(y | x) = (1/k) Σ_m p_m(y | x) of
its members' predictives. With ``method="map"`` each member predicts at its posterior mean
(its module's own weights), which is the deep ensemble of Lakshminarayanan et al. (2017),
the strong baseline of Ovadia et al. (2019); with "mc", "linearized" or "probit" after
``fit_laplace`` it is a mixture of Laplace approximations (Eschenhagen et al. 2021), after
``fit`` a mixture of variational posteriors (MultiSWAG-like, Wilson & Izmailov 2020).

``deep_ensemble`` builds k differently seeded networks and trains each by Adam (``train_map``)
into a ``BayesianModel``, ready for ``fit_laplace`` afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from bayesso.batches import check_loader, checked_batch, checked_inputs, forward, located, on_module, split_batch
from bayesso.likelihoods import Likelihood, Regression
from bayesso.model import PREDICTIVES, BayesianModel
from bayesso.posteriors import Posterior
from bayesso.predict.predictive import DrawAverage, Predictive, check_n_samples
from bayesso.progress import check_progress, known_length, progress_bar, track
from bayesso.training import ModelState

__all__ = ["ENSEMBLE_PREDICTIVES", "Ensemble", "deep_ensemble", "map_predictive", "mixture", "train_map"]

ENSEMBLE_PREDICTIVES = (*PREDICTIVES, "map")


class Ensemble:
    """k ``BayesianModel``s with one likelihood kind, predicting as their equal-weight mixture.

    Members share no module, parameter or buffer. ``likelihood`` is the first member's
    (``evaluate`` uses it to check targets); regression members may have different σ.
    ``fit``, ``fit_laplace`` and ``optimize_prior_precision`` run the members' own methods
    one member after the other, each all or nothing per member: if member m raises, the
    members before it keep their new state and member m is as before.
    """

    def __init__(self, members: Sequence[BayesianModel]) -> None:
        members = list(members)
        if not members:
            raise ValueError("members must hold at least one BayesianModel, got 0")
        owners: dict[int, int] = {}
        for i, member in enumerate(members):
            if not isinstance(member, BayesianModel):
                raise ValueError(f"members[{i}] must be a BayesianModel, got {type(member).__name__}")
            if type(member.likelihood) is not type(first := members[0].likelihood):
                raise ValueError(
                    f"members must share one likelihood kind: members[0] has {first!r}, members[{i}] has "
                    f"{member.likelihood!r}"
                )
            named = chain(member.module.named_parameters(), member.module.named_buffers())
            tensors = ((f"the tensor {name!r}", tensor) for name, tensor in named)
            for what, part in [(f"the module {type(member.module).__name__}", member.module), *tensors]:
                j = owners.setdefault(id(part), i)
                if j != i:
                    raise ValueError(f"members[{j}] and members[{i}] share {what}: each member needs its own module")
        self.members = members

    @property
    def likelihood(self) -> Likelihood:
        return self.members[0].likelihood

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[BayesianModel]:
        return iter(self.members)

    def predict(
        self,
        x: Tensor,
        n_samples: int = 32,
        method: str | None = None,
        generator: torch.Generator | None = None,
        keep_samples: bool = False,
        chunk_size: int | None = None,
        vectorize: bool | None = None,
    ) -> Predictive:
        """The mixture's predictive at a batch ``x`` (see ``mixture``), members in order.

        ``method``: None (each member's default), "mc", "linearized" or "probit" (each member's
        ``BayesianModel.predict``, with
        ``n_samples`` draws PER MEMBER, k · ``n_samples`` in all, from the one ``generator``), or
        "map": each member at its mean weights, no sampling (``map_predictive``). With
        ``keep_samples`` the members' draws are concatenated, (k · S, B, ...).
        """
        if method is not None and method not in ENSEMBLE_PREDICTIVES:
            raise ValueError(f"method must be one of {', '.join(map(repr, ENSEMBLE_PREDICTIVES))}; got {method!r}")
        check_n_samples(n_samples)
        if method == "map":
            return mixture([map_predictive(m, x, keep_samples) for m in self])
        return mixture([m.predict(x, n_samples, method, generator, keep_samples, chunk_size, vectorize) for m in self])

    def fit(
        self,
        loaders: Iterable | Sequence[Iterable],
        method: str = "vogn",
        epochs: int = 1,
        progress: bool = True,
        *,
        seed: int = 0,
        checkpoint: str | Path | None = None,
        **options,
    ) -> list[list[dict]]:
        """``BayesianModel.fit`` for each member, member m with the optimizer's ``seed + m``.

        ``loaders``: one loader for all members, or a sequence of k loaders (one per member, e.g.
        bootstrap resamples). ``checkpoint``: member m writes ``name.member{m}.suffix``. Other
        ``options`` go to every member's ``fit``. Returns each member's per-epoch history.
        """
        histories, path = [], None if checkpoint is None else Path(checkpoint)
        for m, (member, loader) in enumerate(self._with_loaders(loaders, progress, f"fit {method}")):
            at = None if path is None else path.with_name(f"{path.stem}.member{m}{path.suffix}")
            histories.append(member.fit(loader, method, epochs, progress, checkpoint=at, seed=seed + m, **options))
        return histories

    def fit_laplace(self, loaders: Iterable | Sequence[Iterable], progress: bool = True, **options) -> list[Posterior]:
        """``BayesianModel.fit_laplace`` at each member's current weights; ``loaders`` as in ``fit``."""
        return [
            member.fit_laplace(loader, progress=progress, **options)
            for member, loader in self._with_loaders(loaders, progress, "Laplace")
        ]

    def optimize_prior_precision(self, progress: bool = True, **options) -> list[dict]:
        """``BayesianModel.optimize_prior_precision(**options)`` for each member, after ``fit_laplace``."""
        members = track(self.members, "prior precision, members", progress)
        return [member.optimize_prior_precision(progress=progress, **options) for member in members]

    def _with_loaders(self, loaders, progress: bool, what: str) -> Iterable[tuple[BayesianModel, Iterable]]:
        k = len(self.members)  # (member, its loader) pairs under a progress bar over the members
        if isinstance(loaders, (list, tuple)) and loaders and not any(map(_is_batch, loaders)):
            if len(loaders) != k:
                raise ValueError(f"loaders must be one loader or one per member ({k}), got {len(loaders)} loaders")
        else:
            loaders = [loaders] * k
        return track(zip(self.members, loaders), f"{what}, members", progress, total=k)

    def __repr__(self) -> str:
        return f"Ensemble(k={len(self.members)}, {self.likelihood!r})"


def mixture(predictives: Sequence[Predictive]) -> Predictive:
    """The equal-weight mixture of k >= 1 predictives of the same batch (sums in float64).

    Classification and binary: probs = mean of the members' probs. Regression (law of total
    variance): mean = mean of the member means, aleatoric = mean of the member aleatoric
    variances, epistemic = mean of the member epistemic variances + the variance (over members,
    divided by k) of the member means. Kept samples are concatenated along the draws. Members on other
    devices are gathered on the first member's device.
    """
    first = predictives[0].probs if predictives[0].probs is not None else predictives[0].mean
    kept = [p.samples for p in predictives]
    samples = torch.cat([s.to(first.device) for s in kept]) if all(s is not None for s in kept) else None

    def stacked(name: str) -> Tensor:
        return torch.stack([getattr(p, name).double().to(first.device) for p in predictives])

    if predictives[0].probs is not None:
        return Predictive(probs=stacked("probs").mean(0).to(predictives[0].probs.dtype), samples=samples)
    means, dtype = stacked("mean"), predictives[0].mean.dtype
    mean = means.mean(0)
    return Predictive(
        mean=mean.to(dtype),
        aleatoric=stacked("aleatoric").mean(0).to(dtype),
        epistemic=(stacked("epistemic").mean(0) + (means - mean).square().mean(0)).to(dtype),
        samples=samples,
    )


@torch.no_grad()
def map_predictive(model: BayesianModel, x: Tensor, keep_samples: bool = False) -> Predictive:
    """The predictive at the posterior mean μ, the module's own weights (module in eval mode, then restored).

    It is the MC predictive with one draw at zero noise: the outputs f(x; μ) go through the
    same conversion as MC and linearized draws (``DrawAverage``): softmax probs (B, C),
    sigmoid (B,) for binary, regression mean f with aleatoric σ² from the likelihood and
    epistemic exactly 0. (The "linearized" predictive's mean would add J Σ Jᵀ and need Jacobians.)
    """
    module = model.module
    x = checked_inputs(module, x)  # on the module's device, in its dtype
    was_training = module.training
    module.eval()
    try:
        outputs = module(x)
    except (RuntimeError, IndexError) as error:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit the module: {error}") from error
    finally:
        module.train(was_training)
    average = DrawAverage(model.likelihood, keep_samples)
    average.add(outputs.unsqueeze(0))
    return average.result()


def train_map(
    module: nn.Module,
    loader: Iterable,
    likelihood: str | Likelihood,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    progress: bool = True,
    **model_options,
) -> BayesianModel:
    """Train ``module`` by ``torch.optim.Adam`` on the batch-mean NLL; return it as a ``BayesianModel``.

    ``weight_decay`` is Adam's (gradient + λθ, i.e. the prior N(0, I/(λN)) on the summed NLL).
    Batches are checked as in ``fit``. Regression: σ is then set to the RMS residual over
    ``loader`` in eval mode, sqrt(Σ (y - f(x))² / number of targets), the maximum-likelihood
    homoscedastic σ (a ``Likelihood`` object given is copied, so models never share σ).
    ``model_options`` go to ``BayesianModel`` (``posterior``, ``prior_precision``, ... for a
    later ``fit_laplace``). All or nothing: if it raises, the module is as before (Ctrl-C keeps the updates).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    check_progress(progress)
    model = BayesianModel(module, copy.copy(likelihood), **model_options)
    likelihood, regression = model.likelihood, isinstance(model.likelihood, Regression)
    check_loader(loader, passes=epochs + regression)
    saved, was_training = ModelState(model), module.training
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    try:
        module.train()
        for epoch in range(epochs):
            bar, index = progress_bar(known_length(loader), f"adam {epoch + 1}/{epochs}", progress), -1
            for index, batch in enumerate(loader):
                with located(f"train_map, epoch {epoch + 1}, batch {index + 1}"):
                    x, y = checked_batch(module, likelihood, batch)  # on the module's device, in its dtype
                    optimizer.zero_grad()
                    outputs = forward(module, x)
                    likelihood.check(outputs, y)
                    loss = likelihood.nll(outputs, y) / len(y)
                loss.backward()
                optimizer.step()
                if not bar.disable:  # .item() waits for an accelerator: only for a bar that is shown
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                bar.update()
            bar.close()
            if index < 0:
                raise ValueError(f"train_map, epoch {epoch + 1}: the loader yielded no batches")
        module.eval()
        if regression:
            likelihood.sigma = rms_residual(module, loader)
    except Exception:
        saved.restore()
        raise
    module.train(was_training)
    return model


@torch.no_grad()
def rms_residual(module: nn.Module, loader: Iterable) -> float:
    """sqrt(Σ (y - f(x))² / number of targets) over ``loader``'s (x, y) batches, in the module's current mode."""
    squared, count = 0.0, 0
    for batch in loader:
        x, y = (on_module(module, value, name) for value, name in zip(split_batch(batch), "xy"))
        squared += float((y - module(x)).double().square().sum())
        count += y.numel()
    sigma = math.sqrt(squared / count)
    if not 0 < sigma < math.inf:
        raise ValueError(f"the RMS residual over the loader is {sigma}; σ must be positive and finite")
    return sigma


def deep_ensemble(
    build: Callable[[], nn.Module],
    loader: Iterable,
    likelihood: str | Likelihood,
    k: int = 5,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    **model_options,
) -> Ensemble:
    """k networks from ``build()`` (member m after ``torch.manual_seed(seed + m)``), each trained by ``train_map``.

    The global generators, seeded so, also drive the member's shuffling (loaders without their
    own generator) and dropout. ``predict(method="map")`` is then the deep ensemble;
    ``fit_laplace`` turns it into a mixture of Laplace posteriors. Other arguments as in ``train_map``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    members = []
    for m in track(range(k), "deep ensemble", progress):
        torch.manual_seed(seed + m)
        members.append(train_map(build(), loader, likelihood, epochs, lr, weight_decay, progress, **model_options))
    return Ensemble(members)


def _is_batch(item) -> bool:
    """Whether ``item`` is one batch (a tensor or a tuple/list of tensors) rather than a loader."""
    return isinstance(item, Tensor) or (isinstance(item, (tuple, list)) and all(isinstance(v, Tensor) for v in item))
