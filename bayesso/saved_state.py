"""Checks of saved state against the live object it is about to be loaded into.

Every ``load_state_dict`` in bayesso checks everything first and changes state only
after all checks pass, so that state from another architecture, dtype or version is
refused whole. Each check raises ``ValueError`` naming the first mismatch by its path in
the saved state (e.g. ``vi.posterior.statistic['0'][1]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

__all__ = ["check_count", "check_entries", "check_keys", "check_tensor"]


def check_keys(state, expected: Iterable[str], where: str) -> None:
    """``state`` is a mapping with exactly the keys ``expected``."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
    expected = list(expected)
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"{where} lacks the entry {missing[0]!r}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(f"{where} has an unexpected entry {unexpected[0]!r}")


def check_tensor(value, like: Tensor, where: str) -> None:
    """``value`` is a tensor of ``like``'s shape and dtype."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    if value.dtype != like.dtype:
        raise ValueError(f"{where} has dtype {value.dtype}, expected {like.dtype}")


def check_entries(state: Mapping, like: Mapping[str, Tensor], where: str) -> None:
    """``state`` holds exactly ``like``'s keys, each a tensor of the same shape and dtype."""
    check_keys(state, like.keys(), where)
    for key, tensor in like.items():
        check_tensor(state[key], tensor, f"{where}[{key!r}]")


def check_count(value, where: str) -> None:
    """``value`` is a non-negative integer (a step or a counter)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {value!r}")
