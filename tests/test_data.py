"""Bundled digits data, OOD split and loaders."""

import sys

import pytest
import torch

from bayesso.data import load_digits, make_loader, torchvision_dataset


def test_digits_split_is_stratified_standardised_and_reproducible():
    data = load_digits(test_fraction=0.3, seed=1)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.n_classes == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    counts = torch.bincount(data.y_test, minlength=10)
    assert counts.min() >= 52 and counts.max() <= 56  # 30% of 174..183 images per class
    assert abs(data.x_train.mean().item()) < 1e-5 and abs(data.x_train.std().item() - 1) < 1e-5
    again = load_digits(test_fraction=0.3, seed=1)
    assert torch.equal(data.x_train, again.x_train) and data.x_ood is None


def test_held_out_classes_form_the_ood_set():
    data = load_digits(in_classes=range(5), flatten=True)
    assert data.x_train.shape[1] == 64 and data.n_classes == 5
    assert set(data.y_test.tolist()) == set(range(5))
    assert set(data.y_ood.tolist()) == set(range(5, 10))
    assert len(data.x_train) + len(data.x_test) + len(data.x_ood) == 1797


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(test_fraction=1.0), "test_fraction must be in \\(0, 1\\), got 1.0"),
        (dict(in_classes=[3, 12]), "got \\[3, 12\\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


def test_loader_is_reproducible():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    first = [b[1].tolist() for b in make_loader(x, y, batch_size=4, seed=3)]
    second = [b[1].tolist() for b in make_loader(x, y, batch_size=4, seed=3)]
    assert first == second and sorted(i for batch in first for i in batch) == list(range(10))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        make_loader(x, y, batch_size=0)


def test_torchvision_loader_explains_a_missing_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="loading mnist needs a torchvision"):
        torchvision_dataset("mnist", "/tmp/none")
    with pytest.raises(ValueError, match="'svhn'"):
        torchvision_dataset("svhn", "/tmp/none")


def test_every_split_is_shuffled_so_that_any_slice_mixes_the_classes():
    data = load_digits(test_fraction=0.5, in_classes=range(5), seed=0)
    for labels in (data.y_train, data.y_test, data.y_ood):
        changes = int((labels[1:] != labels[:-1]).sum())
        assert changes > len(labels) // 2  # ordered by class, there would be 4 changes
        assert len(set(labels[:40].tolist())) == 5  # a slice as a validation set holds every class
    again = load_digits(test_fraction=0.5, in_classes=range(5), seed=0)
    assert torch.equal(data.x_test, again.x_test) and torch.equal(data.y_ood, again.y_ood)
    other = load_digits(test_fraction=0.5, in_classes=range(5), seed=1)
    assert not torch.equal(data.y_test, other.y_test)
