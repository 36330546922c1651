"""Bayes by Backprop (Blundell et al. 2015) with Pyro: ``BayesianModel.fit(loader, method="bbb")``.

The baseline that natural-gradient VI is compared with: a mean-field Gaussian q(θ) = N(loc, diag(scale²))
over the parameters the model's posterior covers, fitted by reparameterised gradients of a Monte-Carlo
ELBO. It runs on a deep copy of ``model.module`` turned into a ``PyroModule``
(``pyro.nn.module.to_pyro_module_``) whose covered parameters are ``PyroSample`` sites with the model's
prior N(0, I/δ_m) per block; Pyro's ``AutoNormal`` is the guide (loc starts at the module's weights,
scale at ``init_scale``) and ``Trace_ELBO`` the loss. The guide's scales are kept below the prior's std
δ_m^(-1/2), as std · sigmoid(u) (Pyro's ``interval`` constraint) instead of AutoNormal's softplus(u), the
same for small scales: a bayesso posterior is never wider than its prior (its precision is
(N/τ)(S + λ) with S >= 0), and so the fitted guide is installed exactly. Without the bound, parameters
the data do not inform, whose optimum is the prior's std, drifted above it with the ELBO's noise (534 of
6,090 in a CNN on digits at lr 3e-2). The user's module is never converted or swapped:
it is read once, and written once, when the run ends.

ELBO convention (docs/vi.md): the likelihood is the model's own NLL, one ``pyro.factor`` scaled by
N / (B τ) per batch of B, so Trace_ELBO's loss is −ELBO_τ / τ with ELBO_τ = −N E_q[ℓ̄] − τ KL(q ‖ p);
the records report −ELBO_τ / N per example (``neg_elbo``). Parameters outside the posterior (and σ of
the regression likelihood when ``learn_noise``, the ELBO's maximiser by gradient) are point estimates
trained on the same loss.

The step is ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step``, written as the PyTorch loop that
Pyro recommends for module-local parameters (``pyro.settings`` ``module_local_params``): one
``torch.optim.Adam`` over the ELBO module's parameters, which makes the same updates as Pyro's
per-parameter Adam. Local parameters keep Pyro's global parameter store untouched (two runs cannot
share stale values through it), and an optimizer with a ``state_dict`` makes checkpoints possible:
``fit``'s loop (``bayesso.training``) runs unchanged, with its progress bars, records, cosine lr decay,
divergence warning, checkpoints and exact resumption. Samples come from the module device's global
generator, swapped for the run's own (``seed``) around each step, so that the caller's stream is not
advanced.

When the run ends the guide is installed: the module's parameters become the locs (and the point
estimates), its buffers those of the copy, and ``model.posterior`` a new ``DiagonalGaussian`` over the
same modules, with the same δ, N and τ and no damping, whose precision is 1/scale²: its statistic is
S = (τ/N)(1/scale² − δ_m) >= 0, so that (N/τ)(S + τδ_m/N) = 1/scale².
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from operator import attrgetter
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bayesso.batches import checked_batch, forward, located
from bayesso.likelihoods import Classification, Likelihood, Regression
from bayesso.placement import moved_generator
from bayesso.posteriors import DiagonalGaussian
from bayesso.saved_state import check_keys
from bayesso.training import DivergenceWarning, _Run, divergence

try:
    with warnings.catch_warnings():  # pyro.infer imports tqdm.auto, which warns in notebooks without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        import pyro
    from pyro import poutine
    from pyro.distributions import constraints
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_value
    from pyro.infer.autoguide.utils import deep_setattr
    from pyro.nn import PyroModule, PyroParam
except ImportError as error:
    raise ImportError(f"method='bbb' needs Pyro ({error}): pip install 'bayesso[pyro]'") from error

from bayesso.pyro.model import prior_copy  # Pyro is importable here

if TYPE_CHECKING:
    from bayesso.distributed import ProcessGrid
    from bayesso.model import BayesianModel

__all__ = ["BBBRun", "BayesByBackprop"]

STATE_KEYS = ("elbo", "adam", "generator", "lr", "sums")


class _Network(PyroModule):
    """The Pyro copy of the module and the likelihood as one factor, scaled by ``scale`` / B (N / (B τ))."""

    def __init__(self, net: nn.Module, likelihood: Likelihood, scale: float, sigma: Tensor | None) -> None:
        super().__init__()
        self.net, self.likelihood, self.scale = net, likelihood, scale
        if sigma is not None:
            self.sigma = PyroParam(sigma, constraints.positive)
        self.draws: list[tuple[Tensor, Tensor]] = []  # (outputs, summed NLL) of each sample of the step

    def batch_nll(self, outputs: Tensor, y: Tensor) -> Tensor:
        """The summed NLL of the batch; with a learned σ, at the current σ."""
        return (Regression(self.sigma) if "sigma" in self._pyro_params else self.likelihood).nll(outputs, y)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        outputs = forward(self.net, x)
        if y is not None:
            self.likelihood.check(outputs, y, require_finite=False)
            nll = self.batch_nll(outputs, y)
            pyro.factor("likelihood", -self.scale / len(y) * nll)
            self.draws.append((outputs.detach(), nll.detach()))
        return outputs


class _BoundedNormal(AutoNormal):
    """``AutoNormal`` whose scale at each site stays below ``bounds[site]``: bound · sigmoid(u)."""

    def __init__(self, model: PyroModule, bounds: dict[str, float], **options) -> None:
        super().__init__(model, **options)
        self.bounds = bounds

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, bound in self.bounds.items():
            scale = attrgetter(name)(self.scales).detach()
            deep_setattr(self.scales, name, PyroParam(scale, constraints.interval(0.0, bound), self._event_dims[name]))


class BayesByBackprop:
    """Bayes by Backprop as ``fit``'s optimizer for ``method="bbb"`` (see the module's docstring).

    Args:
        model: the ``BayesianModel``; its posterior's modules, δ, N and τ define the prior and the ELBO.
        lr: Adam's learning rate (``fit`` decays it along a cosine).
        mc_samples: weight samples per step (Trace_ELBO's particles).
        init_scale: the guide's initial std for every parameter, below the prior's std.
        seed: seed of the run's sampling generator.
        dataset_size: overrides the posterior's N.
        temperature: overrides the posterior's τ.
        prior_precision: overrides the posterior's δ.
        learn_noise: regression: σ is a parameter of the ELBO (initialised from the residuals at the mean).
        grid: refused when active (one process only).
    """

    engine = None
    accumulating = False
    skipped_steps = 0

    def __init__(
        self,
        model: BayesianModel,
        lr: float = 1e-2,
        *,
        mc_samples: int = 1,
        init_scale: float = 1e-2,
        seed: int = 0,
        dataset_size: float | None = None,
        temperature: float | None = None,
        prior_precision: float | dict[str, float] | None = None,
        learn_noise: bool = False,
        grid: ProcessGrid | None = None,
    ) -> None:
        for name, value in (("lr", lr), ("init_scale", init_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if grid is not None and grid.active:
            raise ValueError(f"method='bbb' runs on one process, got a ProcessGrid of world size {grid.world_size}")
        old = model.posterior
        posterior = DiagonalGaussian(
            model.module,
            prior_precision={plan.name: float(d) for plan, d in zip(old.plans, old.prior_precision)},
            dataset_size=old.dataset_size if dataset_size is None else dataset_size,
            temperature=old.temperature if temperature is None else temperature,
            modules=[plan.module for plan in old.plans],
        )
        if prior_precision is not None:
            posterior.prior_precision = prior_precision
        if posterior.dataset_size is None:
            raise ValueError("dataset_size is unknown: pass dataset_size=N here or to the BayesianModel")
        narrowest = float(posterior.prior_precision.max()) ** -0.5
        if init_scale >= narrowest:
            raise ValueError(f"init_scale must be below the prior's std {narrowest:.4g}, got {init_scale!r}")
        self.model, self.posterior, self.seed, self.init_scale = model, posterior, seed, float(init_scale)
        self.mc_samples, self.learn_noise = mc_samples, learn_noise
        self.param_groups = [{"lr": float(lr), "params": []}]  # fit's cosine schedule sets the lr here
        names = {id(p): name for name, p in model.module.named_parameters()}
        stds = [(names[id(p)], float(d) ** -0.5) for plan, d in zip(posterior.plans, posterior.prior_precision)
                for p in plan.parameters]  # fmt: skip
        self.sites = {name: "net." + name for name, _ in stds}  # module parameter -> Pyro sample site
        self.bounds = {self.sites[name]: std for name, std in stds}
        self.initial = {self.sites[name]: p.detach().clone() for name, p in model.module.named_parameters()
                        if name in self.sites}  # fmt: skip
        self.generator = torch.Generator(device=posterior.device).manual_seed(seed)
        sigma = None
        if learn_noise:
            sigma = torch.tensor(model.likelihood.sigma_value, dtype=posterior.dtype, device=posterior.device)
        with pyro.settings.context(module_local_params=True):
            net = prior_copy(model.module, dict(stds))
            self.network = _Network(net, model.likelihood, posterior.dataset_size / posterior.temperature, sigma)
        self.guide = self.elbo = self.adam = None
        self.pending: dict | None = None  # a checkpoint's state, loaded once the guide exists
        self.sums = [0.0]  # the epoch's −ELBO_τ / N summed over its examples

    @contextmanager
    def _sampling(self):
        """Pyro's module-local parameters, and the device's global generator swapped for the run's own."""
        device = self.generator.device
        with pyro.settings.context(module_local_params=True):
            if device.type == "cpu":
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(self.generator.get_state())
                    yield
                    self.generator.set_state(torch.get_rng_state())
                return
            backend = torch.get_device_module(device.type)
            with torch.random.fork_rng(devices=[device.index or 0], device_type=device.type):
                backend.set_rng_state(self.generator.get_state(), device)
                yield
                self.generator.set_state(backend.get_rng_state(device))

    def prepare(self, x: Tensor, y: Tensor) -> None:
        """Build the guide and Adam on the run's first batch (AutoNormal reads the model's sites by running it),
        then load a checkpoint's state if there is one; the draws made here are discarded (the seed restarts)."""
        if self.guide is not None:
            return
        with self._sampling():
            if self.learn_noise:  # σ² from the residuals at the mean on the first batch, as the presets do
                outputs = self._outputs_at(self.initial, x)
                self.model.likelihood.check(outputs, y, require_finite=False)
                residual = y - outputs
                self.network.sigma = residual.double().square().mean().sqrt().clamp_min(1e-6).to(self.posterior.dtype)
            guide = _BoundedNormal(self.network, self.bounds, init_loc_fn=init_to_value(values=self.initial),
                                   init_scale=self.init_scale)  # fmt: skip
            with poutine.block():
                guide(x, y)
            self.network.draws.clear()
            self.elbo = Trace_ELBO(num_particles=self.mc_samples, max_plate_nesting=0)(self.network, guide)
            self.adam = torch.optim.Adam(self.elbo.parameters(), lr=self.param_groups[0]["lr"])
        self.guide = guide
        self.generator.manual_seed(self.seed)
        if self.pending is not None:
            self._load(self.pending)

    def _outputs_at(self, values: dict[str, Tensor], x: Tensor) -> Tensor:
        """The copy's outputs with its sampled parameters set to ``values`` (eval mode, no gradients)."""
        self.network.eval()
        try:
            with torch.no_grad():
                return poutine.condition(self.network, data=values)(x)
        finally:
            self.network.train()

    def loss_at_mean(self, x: Tensor, y: Tensor) -> float:
        """The batch-mean NLL at the guide's locs, for ``fit``'s divergence check (the batch's targets checked)."""
        with self._sampling():
            outputs = self._outputs_at(self.guide.median(), x)
            self.model.likelihood.check(outputs, y, require_finite=False)
            with torch.no_grad():
                return float(self.network.batch_nll(outputs, y)) / len(y)

    def step(self, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
        """One Adam step on Trace_ELBO's loss; returns the batch-mean NLL at the sampled weights and the outputs
        at the last sample. A non-finite loss raises ``FloatingPointError`` (``fit`` then restores the model)."""
        for group in self.adam.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        self.network.draws.clear()
        with self._sampling():
            self.adam.zero_grad()
            loss = self.elbo(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the negative ELBO is {float(loss)}; lower lr or init_scale")
            loss.backward()
            self.adam.step()
        nll = sum(float(draw[1]) for draw in self.network.draws) / len(self.network.draws)
        self.sums[0] += float(loss.detach()) * self.posterior.temperature / self.posterior.dataset_size * len(y)
        return nll / len(y), self.network.draws[-1][0]

    @property
    def sigma(self) -> float:
        """The learned σ of the regression likelihood."""
        with pyro.settings.context(module_local_params=True):
            return float(self.network.sigma.detach())

    def install(self) -> None:
        """Put the fitted guide into the model (the module's weights, buffers, posterior and σ; see the module's
        docstring); nothing when no step was taken."""
        if self.guide is None:
            return
        model, posterior = self.model, self.posterior
        with pyro.settings.context(module_local_params=True):
            locs = self.guide.median()
            scales = {site: self.guide._get_loc_and_scale(site)[1].detach() for site in locs}
        point = dict(self.network.net.named_parameters())
        buffers = dict(self.network.net.named_buffers())
        blocks, factor = {}, posterior.temperature / posterior.dataset_size
        with torch.no_grad():
            for name, parameter in model.module.named_parameters():
                parameter.copy_(locs[self.sites[name]] if name in self.sites else point[name])
            for name, buffer in model.module.named_buffers():
                buffer.copy_(buffers[name])
        names = {id(p): n for n, p in model.module.named_parameters()}
        for plan, delta in zip(posterior.plans, posterior.prior_precision):
            scale = torch.cat([scales[self.sites[names[id(p)]]].reshape(-1) for p in plan.parameters])
            statistic = factor * (scale.to(posterior.dtype).square().reciprocal() - delta)  # >= 0 up to rounding
            blocks[plan.name] = posterior.statistic.blocks[plan.name].with_tensors([statistic.clamp_min(0)])
        posterior.update_statistic(posterior.statistic.with_blocks(blocks))
        model.posterior = posterior
        if self.learn_noise:
            model.likelihood.sigma = self.sigma

    def state_dict(self) -> dict:
        """The guide's and the copy's parameters, Adam's state, the generator, the lr and the epoch's ELBO sum."""
        return {
            "elbo": {key: value.clone() for key, value in self.elbo.state_dict().items()},
            "adam": copy.deepcopy(self.adam.state_dict()),
            "generator": self.generator.get_state(),
            "lr": {key: value for key, value in self.param_groups[0].items() if key != "params"},
            "sums": list(self.sums),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load ``state_dict`` output (applied when the guide is built, on the run's first batch)."""
        check_keys(state, STATE_KEYS, "the checkpoint's bbb state")
        if self.guide is None:
            self.pending = state
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        self.elbo.load_state_dict(state["elbo"])
        self.adam.load_state_dict(state["adam"])
        self.generator.set_state(state["generator"])
        self.param_groups[0].update(state["lr"])
        self.sums, self.pending = list(state["sums"]), None

    def follow_module(self) -> None:
        """Move the copy, the guide, Adam's state and the generator to the module's device and dtype
        (``BayesianModel.to``); the posterior follows by itself."""
        parameter = next(self.model.module.parameters())
        self.generator = moved_generator(self.generator, parameter.device)
        if self.elbo is not None:
            self.elbo.to(parameter.device, parameter.dtype)
            for state in self.adam.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].to(parameter.device, parameter.dtype)


class BBBRun(_Run):
    """``fit``'s loop with a Bayes-by-Backprop step per batch; the guide is installed when it ends (also on
    Ctrl-C, which keeps the updates made so far)."""

    def train(self) -> None:
        try:
            super().train()
        except KeyboardInterrupt:
            self.optimizer.install()
            raise
        self.optimizer.install()

    def _train_on(self, batch, where: str) -> None:
        model, bbb = self.model, self.optimizer
        with located(where):
            x, y = checked_batch(model.module, model.likelihood, batch)  # on the module's device, in its dtype
            bbb.prepare(x, y)
            if self.batch == 0:  # the divergence check's series: the loss at the mean, once per epoch
                bbb.sums = [0.0]
                self.sums[3] = bbb.loss_at_mean(x, y)
            self._set_lr()
            loss, outputs = bbb.step(x, y)
        if bbb.learn_noise:
            model.likelihood.sigma = bbb.sigma
        self.batch, self.step = self.batch + 1, self.step + 1
        self.sums[0] += loss * len(y)
        self.sums[1] += len(y)
        if isinstance(model.likelihood, Classification):
            self.sums[2] += float((outputs.argmax(-1) == y).sum())

    def _check_divergence(self) -> None:
        """Warn once per call of ``fit``, at the first epoch where ``divergence`` finds one."""
        message = None if self.warned else divergence([record["loss_at_mean"] for record in self.history])
        if message is not None:
            self.warned = True
            warnings.warn(f"fit (bbb), {message}. Lower lr", DivergenceWarning, stacklevel=4)

    def _means(self) -> dict:
        """The mean NLL and accuracy at the sampled weights, and −ELBO_τ / N per example."""
        return {**super()._means(), "neg_elbo": self.optimizer.sums[0] / max(self.sums[1], 1)}
