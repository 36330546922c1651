"""Where a posterior's tensors live: on the device of the module's parameters, in their dtype.

The statistic, its decompositions and the prior precision are float64 for float64
parameters and float32 otherwise (``bayesso.placement.state_dtype``). ``to`` moves the
module (the mean) and the posterior together. After the module is moved on its own
(``net.to("cuda")``, ``net.double()``) the posterior converts its tensors at its next use
(every method calls ``follow_module``), so it never computes in a stale dtype or device.
"""

from __future__ import annotations

import torch

from bayesso.placement import converted, module_moved, parse_placement, state_dtype

__all__ = ["Devices"]


class Devices:
    """Mixin of ``Posterior``: needs ``module``, ``plans``, ``statistic``, ``_decomposed``, ``_bases``, ``_prior``,
    ``_dtype``, ``_check_plans``, ``_damped_cache`` and ``_revision``."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the statistic, decompositions and flat vectors: float64 for float64 parameters, else float32."""
        self.follow_module()
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of the posterior's tensors: that of the module's (first covered) parameter."""
        self.follow_module()
        return self._prior.device

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) the posterior's tensors belong in, given where the module's parameters are now."""
        plan = self.plans[0]
        first = getattr(plan.module, plan.local[0])  # plan.parameters[0] without listing the rest (called often)
        return first.device, state_dtype(first.dtype)

    def follow_module(self) -> None:
        """Convert the statistic, decompositions and prior precision to ``placement()`` if the module was moved.

        Called at every use, so that a posterior follows ``net.to(...)``; all or nothing (the new
        tensors are made before any is installed). Converting float32 -> float64 -> float32 is exact.
        """
        device, dtype = self.placement()
        if device == self._prior.device and dtype == self._dtype:
            return
        self._check_plans(dtype)
        statistic = converted(self.statistic, device, dtype)
        decomposed = None if self._decomposed is None else converted(self._decomposed, device, dtype)
        bases = {name: basis.to(device, dtype) for name, basis in self._bases.items()}
        prior = self._prior.to(device, dtype)
        self.statistic, self._decomposed, self._bases, self._prior, self._dtype = (
            statistic, decomposed, bases, prior, dtype
        )  # fmt: skip
        self._damped_cache = None
        self._revision += 1

    def to(
        self, device: str | torch.device | int | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> Devices:
        """Move the module (the mean) and the posterior to ``device`` and/or ``dtype`` (float32 or float64).

        Called like ``nn.Module.to``: ``to("cuda")``, ``to(torch.float64)``, ``to(device, dtype)``.
        All or nothing: a ValueError naming an unknown or unavailable device or another dtype comes
        before anything moves, and if the move fails later the module and posterior are as before.
        Returns the posterior. Optimizer state follows at the optimizer's next step.
        """
        device, dtype = parse_placement(device, dtype)
        with module_moved(self.module, device, dtype):
            self.follow_module()
        return self
