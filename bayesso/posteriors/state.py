"""The ``state_dict`` format of a posterior: statistic, stale decomposition, hyperparameters, structure.

Loading is all or nothing: the whole state is checked against the posterior (structure,
modules, block kinds, every tensor's shape and dtype, hyperparameter values) before
anything is written, and the statistic is replaced by new blocks, never copied into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from bayesso.curvature import Block, Curvature
from bayesso.saved_state import check_keys, check_tensor

if TYPE_CHECKING:
    from bayesso.posteriors.base import Posterior

__all__ = ["check_posterior_state", "load_posterior_state", "posterior_state"]

KEYS = (
    "structure",
    "blocks",
    "statistic",
    "decomposed",
    "initialized",
    "prior_precision",
    "dataset_size",
    "temperature",
    "damping",
    "deterministic",
)


def posterior_state(posterior: Posterior) -> dict:
    """Plain tensors and numbers; the mean is not included (it lives in the module's state_dict)."""
    return {
        "structure": posterior.structure,
        "blocks": {name: block.structure for name, block in posterior.statistic.blocks.items()},
        "statistic": _tensors(posterior.statistic),
        "decomposed": None if posterior._decomposed is None else _tensors(posterior._decomposed),
        "initialized": posterior.initialized,
        "prior_precision": posterior.prior_precision.clone(),
        "dataset_size": posterior.dataset_size,
        "temperature": posterior.temperature,
        "damping": posterior.damping,
        "deterministic": sorted(posterior.deterministic),
    }


def check_posterior_state(posterior: Posterior, state, where: str = "posterior state") -> dict[str, Block]:
    """ValueError naming the first entry of ``state`` that does not fit ``posterior``; else the block templates.

    A template is the posterior's block in the kind the state gives (a block that became
    diagonal when it was fitted is diagonal in the state).
    """
    check_keys(state, KEYS, where)
    if state["structure"] != posterior.structure:
        raise ValueError(f"{where} is for a {state['structure']!r} posterior, this one is {posterior.structure!r}")
    names = list(posterior.statistic.blocks)
    check_keys(state["blocks"], names, f"{where}['blocks'] (the posterior's modules)")
    templates = {}
    for name in names:
        block, kind = posterior.statistic.blocks[name], state["blocks"][name]
        if kind not in (block.structure, "diag"):
            raise ValueError(f"{where}['blocks'][{name!r}] is {kind!r}; block {name!r} is {block.structure!r}")
        templates[name] = block if kind == block.structure else block.as_diagonal()
    for part in ("statistic", "decomposed"):
        if part == "decomposed" and state[part] is None:
            continue
        check_keys(state[part], names, f"{where}[{part!r}]")
        for name, template in templates.items():
            saved, own = state[part][name], template.tensors()
            if not isinstance(saved, (list, tuple)) or len(saved) != len(own):
                raise ValueError(f"{where}[{part!r}][{name!r}] must be a list of {len(own)} tensors")
            for i, (value, like) in enumerate(zip(saved, own)):
                check_tensor(value, like, f"{where}[{part!r}][{name!r}][{i}]")
                if not bool(value.isfinite().all()):
                    raise ValueError(f"{where}[{part!r}][{name!r}][{i}] has NaN or infinite entries")
    if not isinstance(state["initialized"], bool):
        raise ValueError(f"{where}['initialized'] must be True or False, got {state['initialized']!r}")
    check_tensor(state["prior_precision"], posterior.prior_precision, f"{where}['prior_precision']")
    unknown = set(state["deterministic"]) - set(names)
    if unknown:
        raise ValueError(f"{where}['deterministic'] names modules without a block: {sorted(unknown)}")
    saved = posterior.snapshot()
    try:  # the hyperparameter setters' own checks, undone right after
        _set_hyperparameters(posterior, state)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    finally:
        posterior.restore(saved)
    return templates


def load_posterior_state(posterior: Posterior, state: dict) -> None:
    """Restore ``posterior_state`` output into a posterior over the same modules (checked first)."""
    templates = check_posterior_state(posterior, state)
    with posterior.atomic():
        statistic = _blocks(posterior.statistic, templates, state["statistic"])
        saved = state["decomposed"]
        decomposed = None if saved is None else _blocks(posterior.statistic, templates, saved)
        _set_hyperparameters(posterior, state)
        source = statistic if decomposed is None else decomposed
        posterior._bases = {name: posterior._eigenbasis(block) for name, block in source.blocks.items()}
        posterior.statistic, posterior._decomposed = statistic, decomposed
        posterior.initialized = state["initialized"]
        posterior._revision += 1


def _set_hyperparameters(posterior: Posterior, state: dict) -> None:
    posterior.prior_precision = state["prior_precision"]
    posterior.dataset_size = state["dataset_size"]
    posterior.temperature = state["temperature"]
    posterior.damping = state["damping"]
    posterior.deterministic = set(state["deterministic"])


def _tensors(curvature: Curvature) -> dict[str, list[Tensor]]:
    return {name: [t.clone() for t in block.tensors()] for name, block in curvature.blocks.items()}


def _blocks(like: Curvature, templates: dict[str, Block], saved: dict[str, list[Tensor]]) -> Curvature:
    blocks = {}
    for name, template in templates.items():
        own = template.tensors()
        blocks[name] = template.with_tensors([t.to(o.device, copy=True) for t, o in zip(saved[name], own)])
    return like.with_blocks(blocks)
