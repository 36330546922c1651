"""Every random generator a training run draws from, captured and restored as plain tensors and numbers.

Torch's global CPU generator (and the CUDA ones, where CUDA is in use), Python's ``random``,
NumPy's global generator, and the generators a data loader shuffles with (the loader's own,
its sampler's, its batch sampler's sampler's). The optimizers' generators live in their own
``state_dict``.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["capture_random_state", "loader_generators", "restore_random_state"]


def loader_generators(loader) -> list[torch.Generator]:
    """The distinct ``torch.Generator``s a ``DataLoader`` (or anything shaped like one) shuffles with."""
    owners = [
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    found: list[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def capture_random_state(generators: list[torch.Generator]) -> dict:
    """The state of the global generators and of ``generators``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict, generators: list[torch.Generator]) -> None:
    """Put the generators back to ``capture_random_state``'s ``state`` (the same loader's generators)."""
    if len(state["generators"]) != len(generators):
        raise ValueError(
            f"the saved random state has {len(state['generators'])} data-loader generator(s), this loader "
            f"{len(generators)}: resume with the same kind of loader"
        )
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
