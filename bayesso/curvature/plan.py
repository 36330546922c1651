"""Which modules form which curvature blocks: shared by the engine and the posteriors.

A block is a module's own trainable parameters (``parameters(recurse=False)``) in
``module.parameters()`` order, so each block covers a contiguous slice of the flat
parameter vector. A parameter registered in several modules (tied weights) belongs
to the first; such modules get no rule (the generic fallback is exact for them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bayesso.curvature.blocks import AffineLayout, Block, DenseBlock, DiagBlock, KronBlock
from bayesso.curvature.curvature import Curvature
from bayesso.curvature.modules import AffineRule, ModuleRule, rule_for

__all__ = ["ModulePlan", "plan_modules", "trainable_parameters", "zero_curvature"]


@dataclass
class ModulePlan:
    """A module's trainable parameters that form one block, and the rule that computes it."""

    name: str
    module: nn.Module
    rule: ModuleRule | None  # None: generic torch.func fallback
    local: tuple[str, ...]  # parameter names within the module
    shapes: tuple[torch.Size, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Qualified parameter names."""
        return tuple(f"{self.name}.{n}" if self.name else n for n in self.local)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [getattr(self.module, n) for n in self.local]

    def label(self) -> str:
        return f"{self.name or '(root)'!r} ({type(self.module).__name__})"

    def structure(self, requested: str) -> str:
        """The structure this block gets: K-FAC only where the rule has one, else diagonal."""
        if requested == "kron" and not (self.rule is not None and self.rule.has_kron):
            return "diag"
        return requested

    def layout(self) -> AffineLayout:
        """K-FAC layout of an affine module's trainable parameters."""
        if not isinstance(self.rule, AffineRule):
            raise ValueError(f"module {self.label()} has no K-FAC layout")
        return self.rule.layout(self.module, self.local)


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter in ``module.parameters()`` order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def plan_modules(
    module: nn.Module, modules: Iterable[str | nn.Module] | str | None = None, use_rules: bool = True
) -> list[ModulePlan]:
    """One plan per selected module with trainable parameters of its own, in module order.

    ``modules``: None (all), "last_layer" (the last module in registration order with
    trainable parameters) or an iterable of names or module objects.
    """
    selected = _selected(module, modules)
    owner: dict[int, str] = {}
    users: dict[int, set[int]] = {}
    for name, sub in module.named_modules():
        for p in sub.parameters(recurse=False):
            owner.setdefault(id(p), name)
            users.setdefault(id(p), set()).add(id(sub))
    plans = []
    for name, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if p.requires_grad and owner[id(p)] == name]
        if name not in selected or not own:
            continue
        shared = any(len(users[id(p)]) > 1 for p in sub.parameters(recurse=False))
        rule = rule_for(sub) if use_rules and not shared else None
        plans.append(ModulePlan(name, sub, rule, tuple(n for n, _ in own), tuple(p.shape for _, p in own)))
    if not plans:
        raise ValueError("the selected modules have no trainable parameters")
    return plans


def _selected(module: nn.Module, modules) -> set[str]:
    names = {id(m): n for n, m in module.named_modules()}
    if modules is None:
        return set(names.values())
    if modules == "last_layer":
        with_params = [n for n, m in module.named_modules() if any(p.requires_grad for p in m.parameters(False))]
        return {with_params[-1]} if with_params else set()
    if isinstance(modules, str):
        raise ValueError(f"modules must be None, 'last_layer' or an iterable of names/modules, got {modules!r}")
    selected = set()
    known = set(names.values())
    for item in modules:
        name = names.get(id(item)) if isinstance(item, nn.Module) else item
        if name not in known:
            raise ValueError(f"modules contains {item!r}, which is not a submodule of the model")
        selected.add(name)
    return selected


def zero_curvature(
    module: nn.Module, plans: list[ModulePlan], structures: dict[str, str], dtype: torch.dtype
) -> Curvature:
    """A curvature of zeros with the block structures ``plans`` get under the requested ``structures`` (by name)."""
    device = plans[0].parameters[0].device
    blocks: dict[str, Block] = {}
    for plan in plans:
        kind = plan.structure(structures[plan.name])
        if kind == "kron":
            layout = plan.layout()
            A = torch.zeros(layout.groups, layout.input_dim, layout.input_dim, dtype=dtype, device=device)
            G = torch.zeros(layout.groups, layout.out_features, layout.out_features, dtype=dtype, device=device)
            blocks[plan.name] = KronBlock(plan.names, plan.shapes, A, G, 0.0, layout)
        elif kind == "diag":
            blocks[plan.name] = DiagBlock(plan.names, plan.shapes, torch.zeros(plan.numel, dtype=dtype, device=device))
        else:
            zeros = torch.zeros(plan.numel, plan.numel, dtype=dtype, device=device)
            blocks[plan.name] = DenseBlock(plan.names, plan.shapes, zeros)
    trainable = trainable_parameters(module)
    return Curvature(blocks, tuple(n for n, _ in trainable), tuple(p.shape for _, p in trainable), "none", 0)
