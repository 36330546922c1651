"""The shared checks of loaders, batches, inputs and targets."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from bayesso.batches import (
    check_batch,
    check_inputs,
    check_loader,
    checked_batch,
    checked_inputs,
    describe,
    forward,
    located,
    split_batch,
    transfer,
)
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


class RecordedTo(torch.Tensor):
    """A tensor that records its ``.to`` calls; with ``fake`` it only records, returning a CPU tensor."""

    calls: ClassVar[list] = []
    fake = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.calls.append((args[1:], kwargs))
            if cls.fake:
                return torch.zeros(args[0].shape)
        return super().__torch_function__(func, types, args, kwargs)


def test_transfer_is_non_blocking_except_from_an_accelerator_into_the_cpu(monkeypatch):
    monkeypatch.setattr(RecordedTo, "calls", [])
    x = torch.randn(3, 2, dtype=torch.float64).as_subclass(RecordedTo)
    moved = transfer(x, torch.device("meta"), torch.float32)  # meta stands in for an accelerator
    assert moved.device.type == "meta" and moved.dtype == torch.float32
    labels = transfer(torch.arange(3).as_subclass(RecordedTo), torch.device("meta"), torch.float32)
    assert labels.dtype == torch.int64  # integer tensors keep their dtype
    assert RecordedTo.calls == [
        ((torch.device("meta"), torch.float32), {"non_blocking": True}),
        ((torch.device("meta"),), {"non_blocking": True}),
    ]
    RecordedTo.calls.clear()
    monkeypatch.setattr(RecordedTo, "fake", True)
    on_device = torch.empty(3, 2, device="meta").as_subclass(RecordedTo)
    transfer(on_device, torch.device("cpu"), None)  # the CPU reads it next: the copy must have finished
    assert RecordedTo.calls == [((torch.device("cpu"),), {"non_blocking": False})]


def test_checked_batch_takes_the_module_device_and_floating_dtype():
    module = nn.Linear(3, 2).double()
    x, y = checked_batch(module, Regression(), (torch.randn(4, 3), torch.randn(4, 2)))
    assert x.dtype == y.dtype == torch.float64
    x, y = checked_batch(module, Classification(), (torch.randn(4, 3, dtype=torch.float16), torch.tensor([0, 1, 1, 0])))
    assert x.dtype == torch.float64 and y.dtype == torch.int64
    assert checked_inputs(nn.Embedding(5, 2), torch.tensor([[1, 4]])).dtype == torch.int64  # token ids are kept


def test_complex_inputs_and_non_tensors_are_named():
    module = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="x is a torch.complex64 tensor and the module computes in torch.float32"):
        checked_inputs(module, torch.randn(4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="y is a torch.complex64 tensor"):
        checked_batch(module, Regression(), (torch.randn(4, 3), torch.randn(4, 2, dtype=torch.complex64)))
    with pytest.raises(ValueError, match="x must be a non-empty batch tensor .* got a list"):
        checked_inputs(module, [[1.0, 2.0, 3.0]])
