"""PyTorch Lightning: bayesso's optimizers under ``Trainer``, and calibration at every validation epoch.

Lightning's automatic optimization calls ``optimizer.step(closure)``. Its closure runs
``training_step``, zeroes the gradients, calls ``backward`` on the loss returned (then the
``on_before_optimizer_step`` hooks and gradient clipping) and returns the loss: the contract of
bayesso's optimizers, which call the closure once per weight sample with the sample in the
module (VI) or once per step (``SecondOrderOptimizer``). So ``configure_optimizers`` returns
``VOGN``, ``NoisyKFAC``, ``IVON`` or a ``SecondOrderOptimizer`` as they are, with learning rate
schedulers if wanted. ``training_step`` returns the batch MEAN of the NLL, as ``fit``'s closure
does. Build the ``BayesianModel`` in ``configure_optimizers``, which Lightning calls after moving
the module to its device. Accumulate micro-batches with the optimizer's ``accumulation_steps``,
not the Trainer's ``accumulate_grad_batches``, whose extra backward passes run outside the step,
at the mean. Lightning stops an epoch after ``len(loader)`` batches without exhausting the
loader, so torch's ``RandomSampler`` (which draws once more when exhausted) shuffles later epochs
differently from ``BayesianModel.fit``; with the same batches the two take identical steps.

``CalibrationCallback`` scores the predictive at the end of every validation epoch. This module
needs the ``lightning`` extra; ``import bayesso`` never imports it.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as error:
    raise ImportError(
        "bayesso.lightning needs PyTorch Lightning: pip install 'bayesso[lightning]' (or lightning>=2.2)"
    ) from error

from collections.abc import Iterable

import torch

from bayesso.ensemble import ENSEMBLE_PREDICTIVES, Ensemble
from bayesso.model import BayesianModel
from bayesso.optim import VIOptimizer
from bayesso.predict.metrics import evaluate
from bayesso.predict.predictive import check_n_samples

__all__ = ["CalibrationCallback"]


class CalibrationCallback(pl.Callback):
    """ECE and NLL (with every other metric of ``evaluate``) of the predictive, at each validation epoch's end.

    Args:
        model: the ``BayesianModel`` (or ``Ensemble``) to score; None: the one that the trainer's VI
            optimizer trains (its ``model``).
        loader: (x, y) batches; None: the trainer's validation loader.
        method: None (``predict``'s default: probit for classes), "mc", "linearized", "probit", or "map"
            (the module's own weights, no sampling: a network trained by ``SecondOrderOptimizer``).
        n_samples: weight samples per prediction, as in ``evaluate``.
        n_bins: ECE bins, as in ``evaluate``.
        seed: each evaluation draws its weight samples from a generator seeded with ``seed``, so
            epochs are compared on the same noise.
        prefix: the logged names are ``prefix`` + "ece", "nll", "accuracy", "brier", ... (regression:
            "rmse", "nll").

    The values are logged with ``pl_module.log`` (per epoch) and kept in ``history``, one dict per
    validation epoch with its "epoch". The sanity check before training is not scored. The
    LightningModule needs a ``validation_step`` (without one, Lightning runs no validation epochs).
    """

    def __init__(
        self,
        model: BayesianModel | Ensemble | None = None,
        loader: Iterable | None = None,
        method: str | None = None,
        n_samples: int = 32,
        n_bins: int = 15,
        seed: int = 0,
        prefix: str = "val_",
    ) -> None:
        if model is not None and not isinstance(model, (BayesianModel, Ensemble)):
            raise ValueError(f"model must be a BayesianModel, an Ensemble or None, got {type(model).__name__}")
        if method is not None and method not in ENSEMBLE_PREDICTIVES:
            raise ValueError(f"method must be one of {', '.join(map(repr, ENSEMBLE_PREDICTIVES))}; got {method!r}")
        check_n_samples(n_samples)
        check_n_samples(n_bins, "n_bins")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        self.model, self.loader, self.method = model, loader, method
        self.n_samples, self.n_bins, self.seed, self.prefix = n_samples, n_bins, seed, prefix
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"CalibrationCallback scores the model at the end of validation epochs, and "
                f"{type(pl_module).__name__} has no validation_step, so Lightning runs none: define one"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        model = self.model if self.model is not None else _trained_model(trainer)
        if self.method == "map" and isinstance(model, BayesianModel):
            model = Ensemble([model])  # the one-member mixture at the mean is the network's own predictive
        loader = self.loader if self.loader is not None else _validation_loader(trainer)
        first = model.members[0] if isinstance(model, Ensemble) else model
        generator = torch.Generator(device=next(first.module.parameters()).device).manual_seed(self.seed)
        metrics = evaluate(
            model, loader, self.method, self.n_samples, n_bins=self.n_bins, generator=generator, progress=False
        )
        for name, value in metrics.items():
            pl_module.log(self.prefix + name, value, on_step=False, on_epoch=True)
        self.history.append({"epoch": trainer.current_epoch, **metrics})


def _trained_model(trainer: pl.Trainer) -> BayesianModel:
    models = [optimizer.model for optimizer in trainer.optimizers if isinstance(optimizer, VIOptimizer)]
    if len(models) != 1:
        raise ValueError(
            f"CalibrationCallback(model=None) scores the BayesianModel of the trainer's VI optimizer, and the trainer "
            f"has {len(models)} VI optimizers: pass model="
        )
    return models[0]


def _validation_loader(trainer: pl.Trainer) -> Iterable:
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            raise ValueError(f"the trainer has {len(loaders)} validation loaders: pass CalibrationCallback(loader=)")
        loaders = loaders[0]
    if loaders is None:
        raise ValueError("the trainer has no validation loader: pass CalibrationCallback(loader=)")
    return loaders
