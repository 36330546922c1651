"""Snapshots of every tensor and attribute reachable from some objects, to prove that a failing call changed nothing.

Modules are recorded by their state (parameters and buffers), train/eval modes and hooks;
generators by their state; other objects by their attributes, recursively. Left out: derived
caches that read-only calls may fill (decompositions, damped eigenvalues, warned-about
names), recomputed from the state they derive from, and the count of calls a process grid
has seen (every call counts there, refused or not, so that ranks stay in step).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORED = {"_damped_cache", "_flat_damping_cache", "_bases", "_inverses", "_warned", "_recent", "_position", "_what"}


def snapshot(*objects) -> list:
    seen: set[int] = set()
    return [_record(obj, seen) for obj in objects]


def assert_unchanged(before: list, *objects) -> None:
    after = snapshot(*objects)
    difference = _first_difference(before, after, "")
    assert difference is None, f"state changed at {difference}"


def _record(value, seen: set[int]):
    if isinstance(value, Tensor):
        return ("tensor", value.detach().clone(), value.requires_grad)
    if isinstance(value, torch.Generator):
        return ("generator", value.get_state())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, (list, tuple)):
        return [_record(v, seen) for v in value]
    if isinstance(value, (set, frozenset)):
        return ("set", sorted(map(repr, value)))
    if isinstance(value, dict):
        return {repr(k): _record(v, seen) for k, v in value.items() if k not in IGNORED}
    if id(value) in seen:
        return ("seen", type(value).__name__)
    seen.add(id(value))
    if isinstance(value, nn.Module):
        modules = list(value.modules())
        return (
            "module",
            {k: _record(v, seen) for k, v in value.state_dict(keep_vars=True).items()},
            [m.training for m in modules],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in modules],
        )
    if callable(value) and not hasattr(value, "__dict__"):
        return ("callable", type(value).__name__)
    if hasattr(value, "__dict__"):
        attributes = {
            k: v for k, v in vars(value).items() if k not in IGNORED and (not callable(v) or isinstance(v, nn.Module))
        }
        return (type(value).__name__, {k: _record(v, seen) for k, v in attributes.items()})
    return ("object", type(value).__name__)


def _first_difference(a, b, where: str) -> str | None:
    if type(a) is not type(b):
        return f"{where} ({type(a).__name__} -> {type(b).__name__})"
    if isinstance(a, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
            return where
        return None if torch.equal(a.nan_to_num(), b.nan_to_num()) else where
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{where} (keys {sorted(set(a) ^ set(b))})"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{where}.{k}")) is not None), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length {len(a)} -> {len(b)})"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where} ({a!r} -> {b!r})"


def posterior_tensors(posterior) -> dict[str, Tensor]:
    """Every tensor a posterior holds, by name: statistic blocks, eigenbases (cached inverses too), prior precision."""
    out = {"prior": posterior._prior}
    for name, block in posterior.statistic.blocks.items():
        out.update({f"statistic {name} {i}": t for i, t in enumerate(block.tensors())})
    for name, basis in posterior._bases.items():
        for key, value in vars(basis).items():
            values = value if isinstance(value, tuple) else (value,)
            out.update({f"basis {name} {key} {i}": t for i, t in enumerate(values) if isinstance(t, Tensor)})
    return out
