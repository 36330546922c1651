"""The shared checks of loaders, batches, inputs and targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayesso.batches import check_batch, check_inputs, check_loader, describe, forward, located, split_batch
from bayesso.data import make_loader
from bayesso.likelihoods import Binary, Classification, Regression


def test_split_batch_takes_pairs_and_names_anything_else():
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert split_batch((x, y))[0] is x and split_batch([x, y])[1] is y
    for batch, what in [
        ({"x": x}, "a dict with keys \\['x'\\]"),
        ((x, y, y), "a tuple of 3"),
        (x, "a torch.float32 tensor"),
    ]:
        with pytest.raises(ValueError, match=f"expected \\(x, y\\) batches, got {what}.*collate_fn"):
            split_batch(batch)


def test_check_loader():
    x, y = torch.ones(4, 3), torch.zeros(4, dtype=torch.long)
    check_loader(make_loader(x, y, 2), passes=3)
    check_loader([(x, y)], passes=3)
    with pytest.raises(ValueError, match="one-shot iterator"):
        check_loader(iter([(x, y)]), passes=2)
    check_loader(iter([(x, y)]), passes=1)
    with pytest.raises(ValueError, match="dataset is empty"):
        check_loader(make_loader(x[:0], y[:0], 2, shuffle=False))
    with pytest.raises(ValueError, match="wrap tensors with bayesso.data.make_loader"):
        check_loader(x)


def test_inputs_and_targets():
    x = torch.randn(4, 3)
    check_inputs(x)
    check_inputs(torch.randint(0, 5, (4, 2)))  # token ids: nothing to check for finiteness
    bad = x.clone()
    bad[1, 1], bad[2, 0] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"x contains 2 NaN or infinite value\(s\) out of 12"):
        check_inputs(bad)
    with pytest.raises(ValueError, match="non-empty batch tensor"):
        check_inputs(x[:0])
    check_batch(Classification(), x, torch.tensor([0, 2, 1, 0]))
    with pytest.raises(ValueError, match="integer class indices"):
        check_batch(Classification(), x, torch.zeros(4))
    with pytest.raises(ValueError, match="batch size mismatch: x has 4 examples and y has 3"):
        check_batch(Classification(), x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="binary targets must be 0 or 1"):
        check_batch(Binary(), x, torch.tensor([0.0, 1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="regression targets must be finite"):
        check_batch(Regression(), x, torch.tensor([[0.0], [float("nan")], [1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"outputs' shape \(4, 1\), got \(4,\) \(add the output dimension"):
        Regression().check(torch.zeros(4, 1), torch.zeros(4))


def test_located_prefixes_once_and_forward_advises_drop_last():
    with pytest.raises(ValueError, match="^fit, batch 2: bad$"), located("fit, batch 2"), located("fit, batch 2"):
        raise ValueError("bad")
    norm = nn.BatchNorm1d(3).train()
    with pytest.raises(ValueError, match="batch of 1 example.*drop_last=True"):
        forward(norm, torch.randn(1, 3))
    assert describe(None) == "a NoneType" and describe([1, "a"]) == "a list of 2 (int, str)"
