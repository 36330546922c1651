"""One optimizer step, all or nothing: it completes, or it changes nothing.

Shared by ``VIOptimizer`` and ``SecondOrderOptimizer``. The step's local work (the closure
at each weight sample, the curvature capture) runs inside the grid's ``lockstep``, so that a
failure on one rank raises on every rank. Everything the step may change (the posterior,
step counters, momentum, accumulated micro-batches, random generators) is kept before it
starts and put back if anything raises, and candidate values (the reduced loss, gradient
and curvature, then the new statistic and mean) are checked to be finite before they are
written. A non-finite candidate raises ``FloatingPointError``, or with ``skip_nonfinite``
is counted in ``skipped_steps`` (the random generators then move on, so that the next step
draws new samples).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from bayesso.distributed import reduce_step
from bayesso.optim.accumulation import nonfinite_part
from bayesso.posteriors import Posterior

__all__ = ["NonFiniteError", "atomic_step"]

FIELDS = ("_step", "skipped_steps", "_momentum", "_sums", "_stale")


class NonFiniteError(Exception):
    """A step's candidate holds NaN or infinite values; the text says which part."""


class StepState:
    """What one step of ``optimizer`` may change, kept for ``restore``."""

    def __init__(self, optimizer, posterior: Posterior, generators: list[torch.Generator]) -> None:
        self.optimizer, self.posterior, self.generators = optimizer, posterior, generators
        # Steps replace these rather than modify them, except the accumulated sums, which get a shallow copy.
        self.fields = {name: getattr(optimizer, name) for name in FIELDS if hasattr(optimizer, name)}
        self.fields["_sums"] = copy.copy(optimizer._sums)
        self.posterior_state = posterior.snapshot()
        self.generator_states = [g.get_state() for g in generators]

    def restore(self, generators: bool = True) -> None:
        for name, value in self.fields.items():
            setattr(self.optimizer, name, value)
        self.posterior.restore(self.posterior_state)
        if generators:
            for generator, state in zip(self.generators, self.generator_states):
                generator.set_state(state)


def atomic_step(
    optimizer,
    posterior: Posterior,
    generators: list[torch.Generator],
    evaluate: Callable[[], tuple],
    unchanged: str,
    advice: str,
) -> Tensor:
    """Run one step of ``optimizer``; ``evaluate()`` gives (loss, grad, curvature, estimate, batch size).

    ``optimizer`` has ``grid``, ``_sums``, ``accumulation_steps``, ``skip_nonfinite``,
    ``_step``, ``skipped_steps`` and ``_update(grad, curvature, estimate)``, which raises
    ``NonFiniteError`` for a non-finite candidate before writing it. ``unchanged`` and ``advice``
    complete the ``FloatingPointError`` message.
    """
    saved = StepState(optimizer, posterior, generators)
    grid, loss = optimizer.grid, None
    try:
        with grid.lockstep("optimizer step") as shared:
            loss, grad, curvature, estimate, size = evaluate()
            shared.values = [float(loss)] if grid.active else []  # no host read without other ranks
        if grid.active:
            loss = shared.totals[0] / grid.world_size
        grad, curvature, estimate = reduce_step(grid, loss, grad, curvature, estimate)
        bad = nonfinite_part(loss, grad, curvature, estimate)
        if bad:
            raise NonFiniteError(bad)
        sums = optimizer._sums
        sums.add(grad, curvature, estimate, size)
        if sums.count == optimizer.accumulation_steps:
            if sums.uneven():
                warnings.warn(
                    f"micro-batches of sizes {sums.sizes} were accumulated into one update; each closure returns "
                    "its batch mean, so the examples of smaller micro-batches weigh more. Use micro-batches of "
                    "equal size (drop_last=True)",
                    stacklevel=3,
                )
            optimizer._update(*sums.mean())
            optimizer._step += 1
        return loss
    except NonFiniteError as rejected:
        saved.restore(generators=not optimizer.skip_nonfinite)
        if optimizer.skip_nonfinite:
            optimizer.skipped_steps += 1
            return loss
        raise FloatingPointError(
            f"non-finite {rejected} at step {optimizer._step}: {unchanged} are unchanged; pass skip_nonfinite=True "
            f"to skip such steps. {advice}"
        ) from None
    except BaseException:
        saved.restore()
        raise


def check_candidate(value: Tensor, what: str) -> None:
    """``NonFiniteError`` naming ``what`` unless every entry of ``value`` is finite (by its sum, as elsewhere)."""
    if not bool(torch.isfinite(value.sum())):
        raise NonFiniteError(what)
