"""Capturing and restoring every random generator a run draws from."""

import random

import numpy as np
import pytest
import torch

from bayesso.data import make_loader
from bayesso.random_state import capture_random_state, loader_generators, restore_random_state


def _draw(generators):
    return (torch.rand(3), random.random(), np.random.rand(), [torch.rand(2, generator=g) for g in generators])


def test_restoring_repeats_every_draw():
    loader = make_loader(torch.ones(4, 2), torch.zeros(4), 2, seed=3)
    generators = loader_generators(loader)
    assert generators == [loader.generator]
    state = capture_random_state(generators)
    first = _draw(generators)
    restore_random_state(state, generators)
    second = _draw(generators)
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    assert all(torch.equal(a, b) for a, b in zip(first[3], second[3]))
    with pytest.raises(ValueError, match="1 data-loader generator"):
        restore_random_state(state, [])
