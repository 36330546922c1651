"""The hyperparameters of a posterior, validated whenever they are set: δ per block, N, τ and γ.

Per block m the precision is (N/τ)(S_m + λ_m I) with λ_m = τ δ_m / N + γ (``block_damping``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Hyperparameters", "same_key"]


class Hyperparameters:
    """Mixin of ``Posterior``: needs ``plans``, ``dtype``, ``deterministic``, ``follow_module``, an initial
    ``_prior`` tensor and ``_flat_damping_cache`` (None at first)."""

    @property
    def prior_precision(self) -> Tensor:
        """δ per module block, shape (n_blocks,)."""
        self.follow_module()
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | dict[str, float] | Tensor) -> None:
        names = [p.name for p in self.plans]
        if isinstance(value, dict):
            unknown = set(value) - set(names)
            if unknown:
                raise ValueError(f"prior_precision names modules without a posterior block: {sorted(unknown)}")
            values = torch.stack([torch.as_tensor(value.get(n, 1.0), dtype=self.dtype) for n in names])
        else:
            values = torch.as_tensor(value, dtype=self.dtype).reshape(-1).expand(len(names))
        if not torch.isfinite(values).all() or (values <= 0).any():
            raise ValueError(f"prior_precision must be positive and finite, got {_describe(value)}")
        self._prior = values.to(self._prior.device).clone()

    @property
    def dataset_size(self) -> int | None:
        """N, the number of training examples (times any data-augmentation factor)."""
        return self._dataset_size

    @dataset_size.setter
    def dataset_size(self, value: float | None) -> None:
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            raise ValueError(f"dataset_size must be a positive number, got {value!r}")
        self._dataset_size = value

    @property
    def temperature(self) -> float:
        """τ > 0, the weight of the KL (1 is the Bayesian posterior)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature must be positive and finite, got {value!r}")
        self._temperature = float(value)

    @property
    def damping(self) -> float:
        """γ >= 0, external damping added to the per-example statistic."""
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"damping must be non-negative and finite, got {value!r}")
        self._damping = float(value)

    def _scale(self) -> float:
        """N / τ: the factor from the per-example statistic to the posterior precision."""
        if self._dataset_size is None:
            raise ValueError("dataset_size is unknown: pass dataset_size=N (the number of training examples)")
        return self._dataset_size / self._temperature

    def block_damping(self) -> Tensor:
        """λ_m = τ δ_m / N + γ per block (no prior term for deterministic blocks)."""
        self.follow_module()
        has_prior = torch.tensor([p.name not in self.deterministic for p in self.plans], device=self._prior.device)
        return self._prior * has_prior / self._scale() + self._damping

    def _cache_key(self) -> tuple:
        """What every value derived from the hyperparameters depends on: δ (the tensor itself, not its id,
        which a later tensor can reuse, and its in-place version), N, τ, γ and the deterministic blocks.
        Compare keys with ``same_key``."""
        prior, deterministic = self._prior, frozenset(self.deterministic)
        return prior, prior._version, self._dataset_size, self._temperature, self._damping, deterministic

    def flat_damping(self) -> tuple[Tensor, Tensor]:
        """(λ, λ - γ) per parameter, two flat (P,) vectors of ``block_damping`` values, kept until ``_cache_key``
        changes (recomputed every call while δ requires grad)."""
        self.follow_module()
        key, cached = self._cache_key(), self._flat_damping_cache
        if cached is not None and not self._prior.requires_grad and same_key(cached[0], key):
            return cached[1]
        damping = self.block_damping()
        sizes = [plan.numel for plan in self.plans]
        flat = tuple(
            torch.cat([value.expand(size) for value, size in zip(values, sizes)])
            for values in (damping, damping - self._damping)
        )
        self._flat_damping_cache = (key, flat)
        return flat


def same_key(a: tuple, b: tuple) -> bool:
    """Whether two cache keys are equal: tensors by identity, everything else by value."""
    return len(a) == len(b) and all(
        x is y if isinstance(x, Tensor) or isinstance(y, Tensor) else x == y for x, y in zip(a, b)
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor {value.tolist()}"
    return repr(value)
