"""Structures per module: which block structure ("diag", "kron", "full") each module's block gets.

A structure is one name for every module, or a mapping from module types and module names to
names, as PyTorch-SSO's ``curv_shapes``: ``{nn.Conv2d: "kron", nn.BatchNorm2d: "diag",
"classifier": "full"}``. A module takes the entry of its own name first, else the entry of the
nearest class in its type's method resolution order (so an ``nn.Module`` entry is the default for
every module), else "diag". "kron" falls back to "diag" for modules without a K-FAC rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from bayesso.curvature.plan import ModulePlan

__all__ = ["STRUCTURES", "Structure", "check_structure", "requested_structures", "structure_label"]

STRUCTURES = ("diag", "kron", "full")
FALLBACK = "diag"  # for modules that no entry of a mapping matches
Structure = str | Mapping[type[nn.Module] | str, str]


def check_structure(structure: Structure, argument: str = "structure") -> None:
    """Refuse anything but one of ``STRUCTURES`` or a non-empty mapping from module types or names to them."""
    if isinstance(structure, str):
        if structure not in STRUCTURES:
            raise ValueError(
                f"{argument} must be one of {', '.join(map(repr, STRUCTURES))} or a mapping; got {structure!r}"
            )
        return
    if not isinstance(structure, Mapping) or not structure:
        raise ValueError(
            f"{argument} must be 'diag', 'kron', 'full' or a non-empty mapping from module types or names to them, "
            f"got {structure!r}"
        )
    for key, value in structure.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise ValueError(f"{argument} has the key {key!r}: keys must be nn.Module subclasses or module names")
        if value not in STRUCTURES:
            raise ValueError(
                f"{argument}[{_key_label(key)}] must be one of {', '.join(map(repr, STRUCTURES))}; got {value!r}"
            )


def requested_structures(plans: Sequence[ModulePlan], structure: Structure) -> dict[str, str]:
    """The structure requested for each plan's block, by plan name (before the K-FAC fallback to "diag").

    A module name in the mapping that names none of ``plans`` is an error (a typo would otherwise
    silently leave that module diagonal); a type that matches no module is not.
    """
    check_structure(structure)
    if isinstance(structure, str):
        return {plan.name: structure for plan in plans}
    names = {key for key in structure if isinstance(key, str)}
    unknown = names - {plan.name for plan in plans}
    if unknown:
        known = ", ".join(repr(plan.name) for plan in plans)
        raise ValueError(
            f"structure names {', '.join(map(repr, sorted(unknown)))}, which is not a module with a block here "
            f"(modules with blocks: {known})"
        )
    return {plan.name: _lookup(plan, structure) for plan in plans}


def structure_label(structure: Structure) -> str:
    """ "diag", "kron" or "full" for one structure, "mixed" for a mapping (reprs, progress bars, state)."""
    return structure if isinstance(structure, str) else "mixed"


def _lookup(plan: ModulePlan, structure: Mapping) -> str:
    if plan.name in structure:
        return structure[plan.name]
    for cls in type(plan.module).__mro__:
        if cls in structure:
            return structure[cls]
    return FALLBACK


def _key_label(key) -> str:
    return repr(key) if isinstance(key, str) else key.__name__
