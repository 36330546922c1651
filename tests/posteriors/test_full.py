"""FullGaussian: one dense block per module, refused above the size limit."""

import pytest
from torch import nn

from bayesso.posteriors import FullGaussian


def test_large_blocks_are_refused_up_front():
    with pytest.raises(ValueError, match="32,896 x 32,896 block for module '0' \\(Linear\\).*KroneckerGaussian"):
        FullGaussian(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 2)))
    assert FullGaussian(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 2)), modules="last_layer").numel == 258
