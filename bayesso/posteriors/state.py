"""The ``state_dict`` format of a posterior: statistic, stale decomposition, hyperparameters, structure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from bayesso.curvature import Curvature

if TYPE_CHECKING:
    from bayesso.posteriors.base import Posterior

__all__ = ["load_posterior_state", "posterior_state"]


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


def load_posterior_state(posterior: Posterior, state: dict) -> None:
    """Restore ``posterior_state`` output into a posterior over the same modules."""
    if state.get("structure") != posterior.structure:
        raise ValueError(f"state is for a {state.get('structure')!r} posterior, this one is {posterior.structure!r}")
    if set(state["statistic"]) != set(posterior.statistic.blocks):
        raise ValueError("state covers different modules than this posterior")
    for name, kind in state["blocks"].items():
        block = posterior.statistic.blocks[name]
        if block.structure != kind:  # a block that became diagonal when it was fitted
            posterior.statistic.blocks[name] = block.as_diagonal()
    _load_tensors(posterior.statistic, state["statistic"])
    posterior._decomposed = None
    if state["decomposed"] is not None:
        posterior._decomposed = posterior.statistic.clone()
        _load_tensors(posterior._decomposed, state["decomposed"])
    posterior.initialized = state["initialized"]
    posterior.prior_precision = state["prior_precision"]
    posterior.dataset_size = state["dataset_size"]
    posterior.temperature = state["temperature"]
    posterior.damping = state["damping"]
    posterior.deterministic = set(state["deterministic"])
    posterior._bases.clear()
    posterior._revision += 1


def _tensors(curvature: Curvature) -> dict[str, list[Tensor]]:
    return {name: [t.clone() for t in block.tensors()] for name, block in curvature.blocks.items()}


def _load_tensors(curvature: Curvature, saved: dict[str, list[Tensor]]) -> None:
    for name, block in curvature.blocks.items():
        for mine, value in zip(block.tensors(), saved[name]):
            mine.copy_(value)
