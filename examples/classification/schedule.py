"""The learning rate over a run: a factor of the configured lr for every optimizer step, set before each step.

The factor is a pure function of the step, so a resumed run continues the schedule from the checkpoint's
step with nothing else to restore. ``cosine`` decays to 0 over the run (as ``BayesianModel.fit``'s default),
``step`` multiplies by ``gamma`` at each milestone epoch (torch's ``MultiStepLR``), ``exponential`` by
``gamma`` every epoch (``ExponentialLR``), ``constant`` keeps the lr. A linear warm-up over
``warmup_epochs`` multiplies any of them.
"""

from __future__ import annotations

import bisect
import math

import torch
from config import Schedule

__all__ = ["lr_factor", "set_lr"]


def lr_factor(schedule: Schedule, step: int, steps_per_epoch: int) -> float:
    """The factor of the base lr at optimizer step ``step`` (0-based) with ``steps_per_epoch`` steps an epoch."""
    total = schedule.epochs * steps_per_epoch
    epoch = step // steps_per_epoch
    if schedule.lr == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(step, total - 1) / total))
    elif schedule.lr == "step":
        factor = schedule.gamma ** bisect.bisect_right(schedule.milestones, epoch)
    elif schedule.lr == "exponential":
        factor = schedule.gamma**epoch
    else:
        factor = 1.0
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        factor *= (step + 1) / warmup
    return factor


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Set every param group's lr to its base lr times ``factor``."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
