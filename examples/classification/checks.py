"""Checks of JSON values for the configuration: each names the key's full path and the value it refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import pairwise
from typing import Any, NoReturn

__all__ = [
    "REQUIRED",
    "ConfigError",
    "Validator",
    "args",
    "below_one",
    "boolean",
    "choice",
    "fail",
    "increasing_integers",
    "integer",
    "number",
    "optional",
    "pair",
    "section",
    "sizes",
    "text",
]

Validator = Callable[[str, Any], Any]  # (the key's path, the value) -> the checked value, or ConfigError
REQUIRED = object()


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the key (its full path) and the value."""


def fail(where: str, expected: str, value: Any) -> NoReturn:
    """Raise the ``ConfigError`` for the key at ``where`` holding ``value`` where ``expected`` was wanted."""
    raise ConfigError(f"config key {where!r}: expected {expected}, got {json.dumps(value)}")


def number(low: float | None = None, high: float | None = None, open_low: bool = False) -> Validator:
    """A real number (not a bool) in [low, high], or in (low, high] with ``open_low``; either bound may be None."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    expected = " ".join(["a number", " and ".join(bounds)]).strip()

    def check(where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, expected, value)
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            fail(where, expected, value)
        return float(value)

    return check


def below_one(where: str, value: Any) -> float:
    """A number in [0, 1): a decay, the weight of the old value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        fail(where, "a number in [0, 1) (the weight of the old value)", value)
    return float(value)


def integer(low: int) -> Validator:
    """An integer (not a bool) >= ``low``."""

    def check(where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            fail(where, f"an integer >= {low}", value)
        return value

    return check


def boolean(where: str, value: Any) -> bool:
    """JSON's true or false."""
    if not isinstance(value, bool):
        fail(where, "true or false", value)
    return value


def choice(*options: Any) -> Validator:
    """One of ``options``."""

    def check(where: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in options:
            fail(where, "one of " + ", ".join(json.dumps(o) for o in options), value)
        return value

    return check


def optional(validator: Validator) -> Validator:
    """null, or what ``validator`` accepts."""
    return lambda where, value: None if value is None else validator(where, value)


def text(where: str, value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        fail(where, "a non-empty string", value)
    return value


def pair(first: Validator, second: Validator) -> Validator:
    """A list of two values, checked by ``first`` and ``second``; returned as a tuple."""

    def check(where: str, value: Any) -> tuple:
        if not isinstance(value, list) or len(value) != 2:
            fail(where, "a list of two values", value)
        return first(f"{where}[0]", value[0]), second(f"{where}[1]", value[1])

    return check


def increasing_integers(where: str, value: Any) -> tuple[int, ...]:
    """A non-empty list of strictly increasing positive integers (lr milestones)."""
    if not isinstance(value, list) or not value:
        fail(where, "a non-empty list of increasing positive integers", value)
    items = tuple(integer(1)(f"{where}[{i}]", item) for i, item in enumerate(value))
    if any(b <= a for a, b in pairwise(items)):
        fail(where, "a non-empty list of increasing positive integers", value)
    return items


def sizes(where: str, value: Any) -> tuple[int, ...]:
    """A list of positive integers (layer widths), possibly empty."""
    if not isinstance(value, list):
        fail(where, "a list of positive integers", value)
    return tuple(integer(1)(f"{where}[{i}]", item) for i, item in enumerate(value))


def section(where: str, value: Any, spec: dict[str, tuple[Validator, Any]]) -> dict:
    """``value`` checked as a JSON object with the keys of ``spec`` ({key: (validator, default or REQUIRED)})."""
    if not isinstance(value, dict):
        if not where:
            raise ConfigError(f"the config must be a JSON object, got {json.dumps(value)}")
        fail(where, "a JSON object", value)
    unknown = sorted(set(value) - set(spec))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"config key {key!r} is unknown; {where or 'the config'} takes {', '.join(spec)}")
    out = {}
    for key, (validator, default) in spec.items():
        path = f"{where}.{key}" if where else key
        if key in value:
            out[key] = validator(path, value[key])
        elif default is REQUIRED:
            raise ConfigError(f"config key {path!r} is missing (required)")
        else:
            out[key] = default
    return out


def args(where: str, value: Any, allowed: dict[str, Validator], owner: str) -> dict:
    """The ``args`` object of a model or method: only the keys of ``allowed``, each checked."""
    if not isinstance(value, dict):
        fail(where, "a JSON object", value)
    for key in value:
        if key not in allowed:
            known = ", ".join(allowed) or "no arguments"
            raise ConfigError(f"config key {f'{where}.{key}'!r} is unknown: {owner} takes {known}")
    return {key: allowed[key](f"{where}.{key}", item) for key, item in value.items()}
