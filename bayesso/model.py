"""``BayesianModel``: a posterior bound to a module's own parameters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from bayesso.batches import checked_inputs
from bayesso.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from bayesso.curvature.structures import Structure
from bayesso.distributed import ProcessGrid
from bayesso.laplace import LaplaceFit, fit_laplace, log_marginal_likelihood, optimize_prior_precision
from bayesso.likelihoods import Binary, Classification, Likelihood, Regression, get_likelihood
from bayesso.placement import module_moved, parse_placement
from bayesso.posteriors import KroneckerGaussian, MixedGaussian, Posterior, build_posterior
from bayesso.predict.linearized import linearized_predictive, probit_predictive
from bayesso.predict.monte_carlo import mc_predictive
from bayesso.predict.predictive import Predictive, check_n_samples
from bayesso.saved_state import check_entries, check_keys
from bayesso.training import fit

__all__ = ["PREDICTIVES", "BayesianModel", "default_predictive"]

PREDICTIVES = ("mc", "linearized", "probit")
MODEL_KEYS = ("module", "posterior", "posterior_modules", "posterior_options", "likelihood", "sigma", "laplace")


class BayesianModel:
    """Wraps any ``nn.Module`` with a Gaussian posterior whose mean IS the module's parameters.

    Args:
        module: the network; nothing is copied or swapped.
        likelihood: "classification", "binary", "regression", "heteroscedastic" or a ``Likelihood``.
        posterior: "diag", "kron", "full", a mapping from module types and names to these (``MixedGaussian``,
            e.g. ``{nn.Conv2d: "kron", nn.BatchNorm2d: "diag", "fc": "full"}``) or a ``Posterior`` built on ``module``.
        prior_precision: δ of the prior N(0, I/δ) (a number or {module name: number}).
        dataset_size: N; ``fit`` fills it from the loader when None.
        temperature: τ, the weight of the KL term.
        sigma: observation noise of the "regression" likelihood.
        modules: restrict the posterior to some modules (names, objects or "last_layer").
        **posterior_options: e.g. ``kfac_damping`` for "kron", ``max_dense_bytes`` for "full".
    """

    def __init__(
        self,
        module: nn.Module,
        likelihood: str | Likelihood,
        posterior: Structure | Posterior = "diag",
        prior_precision: float | dict[str, float] = 1.0,
        dataset_size: int | None = None,
        temperature: float = 1.0,
        sigma: float = 1.0,
        modules: Iterable[str | nn.Module] | str | None = None,
        **posterior_options,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.likelihood = get_likelihood(likelihood, sigma)
        if isinstance(posterior, Posterior):
            if posterior.module is not module:
                raise ValueError("the posterior was built on a different module")
            self.posterior = posterior
        else:
            self.posterior = build_posterior(
                module,
                posterior,
                "posterior",
                prior_precision=prior_precision,
                dataset_size=dataset_size,
                temperature=temperature,
                modules=modules,
                **posterior_options,
            )
        self.laplace_fit: LaplaceFit | None = None
        self.optimizer: torch.optim.Optimizer | None = None  # the last ``fit``'s

    @contextmanager
    def sample_parameters(self, generator: torch.Generator | None = None) -> Iterator[None]:
        """Put one posterior sample into the module; the mean is restored bit-exactly on exit."""
        noise, _ = self.posterior.sample_noise(1, generator)
        with self.posterior.perturbed(noise[0]):
            yield

    def fit(
        self,
        loader: Iterable,
        method: str = "vogn",
        epochs: int = 1,
        progress: bool = True,
        *,
        checkpoint: str | Path | None = None,
        checkpoint_every: int | str = "epoch",
        resume: bool = True,
        grid: ProcessGrid | None = None,
        **optimizer_options,
    ) -> list[dict]:
        """Natural-gradient VI over ``loader`` of (x, y) batches with a preset optimizer.

        ``method``: "vogn", "noisy_kfac", "noisy_adam" or "ivon"; ``optimizer_options`` go to the
        preset (``lr``, ``mc_samples``, ...), except ``schedule`` ("cosine", the default, or None:
        lr decays over the run) and ``learn_noise`` (regression: σ learned, True by default). The
        closure's loss is the batch mean of the NLL. Each record also holds the prior precision per
        block and, for regression, σ; a diverging run raises a ``DivergenceWarning``.
        Every batch is checked first (``bayesso.batches``). Returns one dict per epoch with the
        mean loss and, for classification, the running accuracy (at the sampled weights).

        All or nothing: if it raises, the module, posterior and Laplace record are as before
        (Ctrl-C keeps the updates made so far). ``checkpoint``: a file written every
        ``checkpoint_every`` updates (or at the end of each epoch, "epoch") and at the end; if it
        exists, training resumes from it bit-identically (``resume=False`` starts afresh);
        ``epochs`` counts from the start of the run. ``grid``: data- and MC-parallel training over
        ``bayesso.distributed`` (``dataset_size`` defaults to the sum of the shards). The optimizer is
        kept as ``self.optimizer``. ``progress``: a bar in terminals and notebooks and one INFO log record per
        epoch (``bayesso.progress``); False silences both. See ``bayesso.training``.
        """
        return fit(
            self, loader, method, epochs, progress, checkpoint, checkpoint_every, resume, grid, optimizer_options
        )

    def fit_laplace(
        self,
        loader: Iterable,
        kind: str = "ggn",
        structure: str | None = None,
        modules: Iterable[str | nn.Module] | str | None = None,
        prior_precision: float | dict[str, float] | Tensor | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        progress: bool = True,
        grid: ProcessGrid | None = None,
    ) -> Posterior:
        """Post-hoc Laplace at the current weights (the MAP): precision = Σ_i curvature_i + δ I.

        Sums the ``kind`` curvature ("ggn", "fisher_mc", "fisher_emp", "hessian") over ``loader``
        into a new ``structure`` posterior (default: this model's) over ``modules`` (default: the
        current posterior's; "last_layer" or a list), with the current prior precision and
        temperature; Kronecker blocks use exact damping G ⊗ A + δ I. Replaces ``self.posterior``
        only on success. Also after VI: the refit happens at the VI mean. With a ``grid``
        (``bayesso.distributed``), each rank passes its own shard and the curvature is summed over ranks.
        """
        posterior, record = fit_laplace(
            self, loader, kind, structure, modules, prior_precision, mc_samples, generator, progress, grid
        )
        self.posterior, self.laplace_fit = posterior, record
        return posterior

    def log_marginal_likelihood(
        self, prior_precision: float | Tensor | None = None, sigma: float | Tensor | None = None
    ) -> Tensor:
        """Laplace's log evidence after ``fit_laplace``; differentiable in tensor ``prior_precision`` / ``sigma``."""
        return log_marginal_likelihood(self, prior_precision, sigma)

    def optimize_prior_precision(self, method: str = "marglik", granularity: str = "scalar", **options) -> dict:
        """Tune the prior precision after ``fit_laplace``: ``method`` "marglik" (evidence, L-BFGS, also
        ``optimize_sigma=True`` for regression) or "grid" (``val_loader=``); ``granularity`` "scalar"
        or "module". See ``bayesso.laplace.optimize_prior_precision``.
        """
        return optimize_prior_precision(self, method, granularity, **options)

    def predict(
        self,
        x: Tensor,
        n_samples: int = 32,
        method: str | None = None,
        generator: torch.Generator | None = None,
        keep_samples: bool = False,
        chunk_size: int | None = None,
        vectorize: bool | None = None,
        grid: ProcessGrid | None = None,
    ) -> Predictive:
        """Predictive distribution at a batch ``x`` (module in eval mode, then restored).

        ``method``: None (default) is "probit" for classification and binary likelihoods (unless
        ``keep_samples``) and "mc" otherwise; on the suite's classification tasks (6 seeds) probit's test
        NLL was lower than 32 MC samples' in 13 of 16 preset × task pairs (README, "Benchmark suite").
        "mc" averages probabilities (not logits) over ``n_samples`` weight samples
        (``vectorize``: ``chunk_size`` of them per vmapped forward; default off the CPU only);
        "linearized" draws ``n_samples`` outputs
        from the GLM predictive N(f(x; μ), J Σ Jᵀ) (exact moments for regression); "probit"
        (classification, binary) uses softmax(f / sqrt(1 + π/8 · var)) and no samples. With a
        ``grid``, "mc" shards the samples over all ranks (same ``x`` and generator seed on every rank)
        and every rank gets the full result. ``x`` goes to the module's device and, if floating point,
        its dtype; a ``generator`` on the CPU serves a model on any device, with the same draws.
        """
        with (grid or ProcessGrid()).lockstep("prediction arguments"):  # refused on one rank: on every rank
            if method is not None and method not in PREDICTIVES:
                raise ValueError(f"method must be one of {', '.join(map(repr, PREDICTIVES))}; got {method!r}")
            check_n_samples(n_samples)
            if chunk_size is not None:  # checked whatever the method, as every argument is
                check_n_samples(chunk_size, "chunk_size")
            method = method or default_predictive(self.likelihood, keep_samples)
            x = checked_inputs(self.module, x)  # on the module's device, in its dtype
        was_training = self.module.training
        self.module.eval()
        try:
            _check_fits(self.module, x)
            if method == "mc":
                return mc_predictive(self, x, n_samples, generator, keep_samples, chunk_size, vectorize, grid)
            if method == "linearized":
                return linearized_predictive(self, x, n_samples, generator, keep_samples)
            return probit_predictive(self, x)
        finally:
            self.module.train(was_training)

    def to(
        self, device: str | torch.device | int | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> BayesianModel:
        """Move the module, the posterior and ``optimizer``'s state together; returns the model.

        Called like ``nn.Module.to``: ``to("cuda")``, ``to(torch.float64)``, ``to("cuda", torch.float64)``.
        ``dtype``: float32 or float64; the posterior's and optimizer's tensors are float64 for a float64
        module and float32 otherwise. The optimizer's random generators, bound to a device, become new
        generators on the new device seeded from their states (same device: kept). All or nothing: a
        ValueError naming an unknown or unavailable device or another dtype comes before anything
        moves, and a failure later puts the module, posterior and optimizer back as they were.
        """
        device, dtype = parse_placement(device, dtype)
        posterior, optimizer = self.posterior, self.optimizer
        saved = posterior.snapshot()
        before = list(self.module.parameters())
        with module_moved(self.module, device, dtype):
            try:
                posterior.follow_module()
                if optimizer is not None:  # its state, and its own posterior when fit_laplace replaced the model's
                    _rebind(optimizer, before, list(self.module.parameters()))
                    optimizer.follow_module()
            except BaseException:
                posterior.restore(saved)
                if optimizer is not None:
                    _rebind(optimizer, list(self.module.parameters()), before)
                raise
        return self

    def save(self, path: str | Path) -> None:
        """Save the module's state (the mean), the posterior and the Laplace record, atomically with checksums."""
        posterior = self.posterior
        options = {"kfac_damping": posterior.kfac_damping} if isinstance(posterior, KroneckerGaussian) else {}
        if isinstance(posterior, MixedGaussian):  # the mapping, resolved to module names
            options = {"structures": posterior.requested, "kfac_damping": posterior.kfac_damping}
        write_checkpoint(
            path,
            "model",
            {
                "module": self.module.state_dict(),
                "posterior": posterior.state_dict(),
                "posterior_modules": [plan.name for plan in posterior.plans],
                "posterior_options": options,
                "likelihood": self.likelihood.name,
                "sigma": self.likelihood.sigma_value if isinstance(self.likelihood, Regression) else 1.0,
                "laplace": None if self.laplace_fit is None else asdict(self.laplace_fit),
            },
        )

    @classmethod
    def load(cls, path: str | Path, module: nn.Module) -> BayesianModel:
        """Rebuild a ``BayesianModel`` saved with ``save`` on a module of the same architecture.

        The file's checksums, then every key, shape and dtype are checked before ``module`` is
        touched; any mismatch is a ``CheckpointError`` naming the file and the first mismatch.
        """
        content = read_checkpoint(path, "model")
        try:
            check_keys(content, MODEL_KEYS, "the saved model")
            check_entries(content["module"], module.state_dict(), "the module state")
            options = dict(content["posterior_options"])
            model = cls(
                module,
                content["likelihood"],
                posterior=options.pop("structures", content["posterior"]["structure"]),
                sigma=content["sigma"],
                modules=content["posterior_modules"],
                **options,
            )
            model.posterior.load_state_dict(content["posterior"])
            model.laplace_fit = None if content["laplace"] is None else LaplaceFit(**content["laplace"])
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"{path}: {error}") from error
        module.load_state_dict(content["module"])
        return model

    def __repr__(self) -> str:
        return f"BayesianModel({type(self.module).__name__}, {self.likelihood!r}, {self.posterior!r})"


def _rebind(optimizer: torch.optim.Optimizer, old: list[nn.Parameter], new: list[nn.Parameter]) -> None:
    """Point ``optimizer``'s param groups at ``new`` where they hold ``old`` (moves to some devices,
    e.g. "meta", replace the Parameter objects instead of their data)."""
    if any(a is not b for a, b in zip(old, new)):
        replace = {id(a): b for a, b in zip(old, new)}
        for group in optimizer.param_groups:
            group["params"] = [replace.get(id(p), p) for p in group["params"]]


def default_predictive(likelihood: Likelihood, keep_samples: bool = False) -> str:
    """The predictive of ``predict(method=None)``: "probit" for classification and binary, else "mc"."""
    return "probit" if isinstance(likelihood, (Classification, Binary)) and not keep_samples else "mc"


def _check_fits(module: nn.Module, x: Tensor) -> None:
    """One example through the module, so a wrong input shape is a ValueError naming it."""
    try:
        with torch.no_grad():
            module(x[:1])
    except (RuntimeError, IndexError) as error:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit the module: {error}") from error
