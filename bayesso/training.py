"""``BayesianModel.fit``: natural-gradient VI over a loader, all or nothing, with checkpoints and exact resumption.

All or nothing: if ``fit`` raises, the module (parameters, buffers, train/eval modes), the
posterior, the Laplace record and ``model.optimizer`` are as they were before the call. An
interrupt (Ctrl-C) is not a failure: it keeps the updates made so far, each of them whole.

Checkpoints: with ``checkpoint=path`` the run is written to ``path`` every
``checkpoint_every`` updates (or at the end of every epoch with ``"epoch"``) and at its
end, atomically and with checksums (``bayesso.checkpoint``), keeping the previous file as
``path.previous``. A later ``fit`` with the same path resumes from the newest intact file:
the module, the posterior and the optimizer (its generators included), every global
random generator and the loader's shuffling generator (``bayesso.random_state``), and the
position in the data (epoch and batches already used, which are read again and skipped),
so that a run killed at any point and resumed ends bit-identical to an uninterrupted one.
``epochs`` is the total: ``fit(epochs=2)`` after ``fit(epochs=1)`` on the same checkpoint
trains one more epoch. Samplers must draw their randomness when an epoch starts (as all of
torch's do); ``set_epoch`` is called on samplers that have it.

Every preset runs with ``fit``'s defaults: lr decays along a cosine over the run
(``schedule="cosine"``; None keeps it), the Gaussian likelihood's σ is learned (``learn_noise``:
σ² is the mean squared residual at the sampled weights, the ELBO's maximiser, first from the
residuals at the mean on the first batch and then an EMA, with the statistic and momentum
rescaled by (σ_old/σ_new)²), each epoch's record reports the prior precision per block and σ, and
a run whose loss at the mean gives back more than half of its gain two epochs running raises a
``DivergenceWarning`` (once per call).

Under a ``ProcessGrid`` every rank writes its own file (``name.rank{r}.suffix``); on
resumption the ranks agree on the newest step that all of them hold, so a job that
``torchrun --max-restarts`` restarts after a worker died loses nothing.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bayesso.batches import check_loader, checked_batch, forward, located
from bayesso.checkpoint import CheckpointFiles
from bayesso.distributed import ProcessGrid
from bayesso.likelihoods import Classification, Regression
from bayesso.optim.empirical_bayes import NoiseEstimate
from bayesso.progress import check_progress, progress_bar
from bayesso.random_state import capture_random_state, loader_generators, restore_random_state
from bayesso.saved_state import check_entries

if TYPE_CHECKING:
    from bayesso.model import BayesianModel

__all__ = ["DivergenceWarning", "ModelState", "divergence", "fit"]

logger = logging.getLogger(__name__)


class DivergenceWarning(UserWarning):
    """``fit``'s training loss rose back, two epochs running, by more than half of what it had gained."""


class ModelState:
    """Everything ``fit`` may change on a ``BayesianModel``, kept to be put back if it fails."""

    def __init__(self, model: BayesianModel) -> None:
        self.model = model
        self.tensors = [t.detach().clone() for t in model.module.state_dict(keep_vars=True).values()]
        self.modes = [m.training for m in model.module.modules()]
        self.posterior, self.posterior_state = model.posterior, model.posterior.snapshot()
        self.laplace_fit, self.optimizer = copy.copy(model.laplace_fit), model.optimizer
        self.sigma = getattr(model.likelihood, "sigma", None)

    def restore(self) -> None:
        model = self.model
        with torch.no_grad():
            for tensor, saved in zip(model.module.state_dict(keep_vars=True).values(), self.tensors):
                tensor.copy_(saved)
        for module, mode in zip(model.module.modules(), self.modes):
            module.training = mode
        model.posterior = self.posterior
        self.posterior.restore(self.posterior_state)
        model.laplace_fit, model.optimizer = self.laplace_fit, self.optimizer
        if self.sigma is not None:
            model.likelihood.sigma = self.sigma


def fit(
    model: BayesianModel,
    loader,
    method: str,
    epochs: int,
    progress: bool,
    checkpoint: str | Path | None,
    checkpoint_every: int | str,
    resume: bool,
    grid: ProcessGrid | None,
    options: dict,
) -> list[dict]:
    """See ``BayesianModel.fit``; returns one record per epoch (all epochs, resumed ones included)."""
    from bayesso.optim import PRESETS

    grid = grid or ProcessGrid()
    options = dict(options)
    learn_noise = options.pop("learn_noise", isinstance(model.likelihood, Regression))
    schedule = options.pop("schedule", "cosine")
    infer_size = model.posterior.dataset_size is None and "dataset_size" not in options
    with grid.lockstep("fit arguments") as shared:  # refused on one rank: refused on every rank
        if method not in PRESETS and method != "bbb":
            raise ValueError(f"method must be one of {sorted([*PRESETS, 'bbb'])}, got {method!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        check_progress(progress)
        if checkpoint_every != "epoch" and (
            isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be a positive number of updates or 'epoch', got {checkpoint_every!r}"
            )
        if not isinstance(resume, bool):
            raise ValueError(f"resume must be True or False, got {resume!r}")
        if schedule not in ("cosine", None):
            raise ValueError(f"schedule must be 'cosine' or None, got {schedule!r}")
        if learn_noise not in (True, False) or (learn_noise and not isinstance(model.likelihood, Regression)):
            raise ValueError(f"learn_noise must be True (regression likelihood only) or False, got {learn_noise!r}")
        check_loader(loader, passes=epochs)
        files = None if checkpoint is None else CheckpointFiles(checkpoint, grid)
        if infer_size:
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError("dataset_size is unknown and the loader has no sized dataset: pass dataset_size=N")
            shared.values = [len(dataset)]
    if infer_size:  # the data shards' sizes summed (each shard is read by mc_groups ranks)
        options = {**options, "dataset_size": round(float(shared.totals[0])) // grid.mc_groups}
    saved = ModelState(model)
    optimizer = None
    try:
        if method == "bbb":  # Bayes by Backprop with Pyro; without it an ImportError names the extra
            from bayesso.bbb import BayesByBackprop, BBBRun

            optimizer = BayesByBackprop(model, grid=grid, learn_noise=learn_noise, **options)
            run_type, noise = BBBRun, None
        else:
            optimizer, run_type = PRESETS[method](model, grid=grid, **options), _Run
            if optimizer.engine is not None:  # fit sets the training mode itself: no advice to switch it
                optimizer.engine.warn_training_batchnorm = False
            noise = NoiseEstimate() if learn_noise else None
        run = run_type(model, optimizer, loader, method, epochs, progress, files, checkpoint_every, grid, noise,
                       schedule)  # fmt: skip
        if files is not None and resume:
            run.resume(files.latest())
        run.train()
    except KeyboardInterrupt:
        if optimizer is None:
            saved.restore()
        else:
            model.optimizer, model.laplace_fit = optimizer, None
        raise
    except BaseException:
        saved.restore()
        raise
    model.optimizer, model.laplace_fit = optimizer, None
    return run.history


def divergence(losses: list[float]) -> str | None:
    """What is wrong when each of the last two epochs' losses gave back more than half of the gain from
    the first epoch to the best one (None when they did not: one noisy epoch is not a divergence).

    ``fit`` passes the loss at the posterior mean on each epoch's first batch (eval mode): the
    loss at sampled weights also rises when the posterior widens, which is no divergence."""
    first, best, last = losses[0], min(losses), losses[-1]
    if len(losses) > 2 and first > best and min(losses[-2:]) - best > 0.5 * (first - best):
        return (f"epoch {len(losses)}: the training loss at the mean rose to {last:.4g} from its best {best:.4g} "
                f"(epoch {losses.index(best) + 1}; first epoch {first:.4g}): the run is diverging")  # fmt: skip
    return None


class _Run:
    """The training loop and its position: epoch, batches used in it, steps in total, running sums."""

    def __init__(self, model, optimizer, loader, method, epochs, progress, files, every, grid, noise, schedule) -> None:
        self.model, self.optimizer, self.loader, self.method, self.epochs = model, optimizer, loader, method, epochs
        self.progress, self.files, self.every, self.grid, self.noise = progress, files, every, grid, noise
        self.generators = loader_generators(loader)
        self.epoch = self.batch = self.step = self.saved_step = 0
        self.sums = [0.0, 0, 0.0, 0.0]  # loss x examples, examples, correct; loss at the mean on the first batch
        self.history: list[dict] = []
        self.resumed: dict | None = None
        self.schedule, self.warned = schedule, False
        per_epoch = len(loader) if hasattr(loader, "__len__") else None
        self.total_steps = None if per_epoch is None else epochs * per_epoch

    def resume(self, content: dict | None) -> None:
        """Continue from a checkpoint's content (None: start afresh)."""
        if content is None:
            return
        module, position = self.model.module, content["progress"]
        if content["method"] != self.method:
            raise ValueError(f"the checkpoint is of a {content['method']!r} run, not {self.method!r}; resume=False")
        if content["world_size"] != self.grid.world_size:
            raise ValueError(f"the checkpoint was written by {content['world_size']} process(es), this run has "
                             f"{self.grid.world_size}")  # fmt: skip
        if position["epoch"] > self.epochs or (position["epoch"] == self.epochs and position["batch"]):
            raise ValueError(
                f"the checkpoint is at epoch {position['epoch']} (batch {position['batch']}), past epochs="
                f"{self.epochs}; pass more epochs, or resume=False to start afresh"
            )
        check_entries(content["module"], module.state_dict(), "the checkpoint's module state")
        if (content["noise"] is None) != (self.noise is None):
            raise ValueError("the checkpoint's run learned σ and this one does not, or the other way round")
        self.optimizer.load_state_dict(content["optimizer"])
        module.load_state_dict(content["module"])
        if self.noise is not None:
            self.noise.variance = content["noise"]["variance"]
            self.model.likelihood.sigma = content["noise"]["sigma"]
        self.epoch, self.batch, self.step = position["epoch"], position["batch"], position["step"]
        self.saved_step, self.history, self.sums = self.step, list(position["history"]), list(position["sums"])
        self.resumed = content["random"]

    def train(self) -> None:
        model = self.model
        model.module.train()
        for epoch in range(self.epoch, self.epochs):
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            batches = self._batches()
            total = len(self.loader) if hasattr(self.loader, "__len__") else None
            shown = self.progress and self.grid.rank == 0  # under a grid, rank 0 alone shows progress
            bar = progress_bar(total, f"{self.method} {epoch + 1}/{self.epochs}", shown, initial=self.batch)
            for batch in batches:
                self._train_on(batch, f"fit, epoch {epoch + 1}, batch {self.batch + 1}")
                bar.set_postfix(self._postfix(), refresh=False)
                bar.update()
                if not isinstance(self.every, str) and self.step - self.saved_step >= self.every:
                    self._save()
            if self.batch == 0:
                raise ValueError(f"fit, epoch {epoch + 1}: the loader yielded no batches")
            record = {"epoch": epoch + 1, **self._means(), "loss_at_mean": self.sums[3]}
            self.history.append({**record, **self._hyperparameters()})
            bar.close()
            if shown:
                summary = ", ".join(f"{key} {value}" for key, value in self._postfix().items())
                logger.info("fit %s, epoch %d/%d: %s", self.method, epoch + 1, self.epochs, summary)
            self._check_divergence()
            self.epoch, self.batch, self.sums = epoch + 1, 0, [0.0, 0, 0.0, 0.0]
            if self.every == "epoch" or self.epoch == self.epochs:
                self._save()

    def _batches(self):
        """An iterator over this epoch's batches, positioned where a resumed run left off."""
        state, self.resumed = self.resumed, None
        if state is None or self.batch == 0:
            if state is not None:
                restore_random_state(state["now"], self.generators)
            self.epoch_start = capture_random_state(self.generators)
            return iter(self.loader)
        restore_random_state(state["epoch_start"], self.generators)
        self.epoch_start = state["epoch_start"]
        batches = iter(self.loader)
        for skipped in range(self.batch):
            if next(batches, None) is None:
                raise ValueError(f"the loader yields {skipped} batches per epoch, fewer than the checkpoint had used")
        restore_random_state(state["now"], self.generators)
        return batches

    def _train_on(self, batch, where: str) -> None:
        model, optimizer = self.model, self.optimizer
        likelihood, module = model.likelihood, model.module
        with located(where):
            x, y = checked_batch(module, likelihood, batch)  # on the module's device, in its dtype
        checked, last = [], {}
        if self.batch == 0:  # the divergence check's series: the loss at the mean, in eval mode, once per epoch
            module.eval()
            with torch.no_grad(), located(where):
                outputs = forward(module, x)
                likelihood.check(outputs, y, require_finite=False)  # the targets against the outputs, first
                checked.append(True)
                if self.noise is not None and self.noise.variance is None:  # σ from these residuals, before any step
                    self.noise.add(float((y - outputs).double().square().sum()), y.numel())
                    likelihood.sigma = self._learned_sigma()
                self.sums[3] = float(likelihood.nll(outputs, y)) / len(y)
            module.train()

        def closure():
            optimizer.zero_grad()
            with located(where):
                outputs = forward(module, x)
                if not checked:  # the first use of the batch: its targets against the outputs
                    likelihood.check(outputs, y, require_finite=False)
                    checked.append(True)
            loss = likelihood.nll(outputs, y) / len(y)
            loss.backward()
            last["outputs"] = outputs.detach()
            if self.noise is not None:
                residual = (y.to(outputs.dtype) - outputs.detach()).double()
                self.noise.add(float(residual.square().sum()), residual.numel())
            return loss

        skipped = optimizer.skipped_steps
        self._set_lr()
        loss = optimizer.step(closure)
        if self.noise is not None:  # σ² moves to the mean squared residual at the sampled weights
            if optimizer.skipped_steps != skipped:
                self.noise.discard()
            else:
                sigma = self._learned_sigma()
                optimizer.rescale((likelihood.sigma_value / sigma) ** 2)
                likelihood.sigma = sigma
        self.batch, self.step = self.batch + 1, self.step + 1
        self.sums[0] += float(loss) * len(y)
        self.sums[1] += len(y)
        if isinstance(likelihood, Classification):
            self.sums[2] += float((last["outputs"].argmax(-1) == y).sum())

    def _means(self) -> dict:
        loss, count, correct, _ = self.sums
        means = {"loss": loss / max(count, 1)}
        if isinstance(self.model.likelihood, Classification):
            means["accuracy"] = correct / max(count, 1)
        return means

    def _learned_sigma(self) -> float:
        """The updated σ; under a grid from every rank's residuals, so that all ranks keep one σ."""
        if self.grid.active:
            totals = self.grid.all_reduce([torch.tensor(self.noise.pending, dtype=torch.float64)])[0]
            self.noise.discard()
            self.noise.add(float(totals[0]), round(float(totals[1])))
        return self.noise.update()

    def _set_lr(self) -> None:
        """Cosine decay over the run: lr_t = lr · ½(1 + cos(π t / T)) for update t of T (the base lr is kept)."""
        group = self.optimizer.param_groups[0]
        base = group.setdefault("initial_lr", group["lr"])
        if self.schedule is None or self.total_steps is None:
            return
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(self.step, self.total_steps - 1) / self.total_steps))

    def _hyperparameters(self) -> dict:
        """The learned values at the end of an epoch: δ per posterior block and, for regression, σ."""
        values = {"prior_precision": [float(v) for v in self.model.posterior.prior_precision]}
        if isinstance(self.model.likelihood, Regression):
            values["sigma"] = self.model.likelihood.sigma_value
        return values

    def _check_divergence(self) -> None:
        """Warn once per call of ``fit``, at the first epoch where ``divergence`` finds one."""
        message = None if self.warned else divergence([record["loss_at_mean"] for record in self.history])
        if message is not None:
            self.warned = True
            warnings.warn(f"fit ({self.method}), {message}. Lower lr (for K-FAC also inv_interval) or raise damping",
                          DivergenceWarning, stacklevel=4)  # fmt: skip

    def _postfix(self) -> dict:
        return {key: f"{value:.4f}" if key == "loss" else f"{value:.3f}" for key, value in self._means().items()}

    def _save(self) -> None:
        if self.files is None or self.optimizer.accumulating:
            return
        position = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "history": self.history,
                    "sums": self.sums}  # fmt: skip
        random_state = {"now": capture_random_state(self.generators), "epoch_start": self.epoch_start}
        self.files.write(
            {
                "method": self.method,
                "world_size": self.grid.world_size,
                "module": self.model.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "progress": position,
                "random": random_state,
                "noise": None
                if self.noise is None
                else {"variance": self.noise.variance, "sigma": self.model.likelihood.sigma_value},
            }
        )
        self.saved_step = self.step
