"""Structures per module: which entry of a mapping each module takes, and the errors for bad mappings."""

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine, plan_modules
from bayesso.curvature.structures import check_structure, requested_structures, structure_label
from tests.cases import CASES_BY_NAME


class Bias(nn.Module):
    """A module without a curvature rule: "kron" falls back to "diag" for it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x):
        return x + self.bias


class Head(nn.Linear):
    """A Linear subclass: it takes a Linear entry unless it has its own."""


def network() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), Bias(8), nn.Linear(8, 4), Head(4, 3))


def test_a_module_takes_its_name_then_its_nearest_class_then_the_module_default():
    plans = plan_modules(network())
    assert requested_structures(plans, {nn.Conv2d: "kron", nn.Linear: "full", "5": "diag"}) == {
        "0": "kron", "1": "diag", "3": "diag", "4": "full", "5": "diag",
    }  # fmt: skip
    assert requested_structures(plans, {nn.Module: "kron", Head: "full", nn.Linear: "diag"}) == {
        "0": "kron", "1": "kron", "3": "kron", "4": "diag", "5": "full",
    }  # fmt: skip
    assert requested_structures(plans, "full") == dict.fromkeys(["0", "1", "3", "4", "5"], "full")


def test_the_engine_gives_each_module_its_structure_with_kron_diagonal_where_no_rule_exists():
    model = network().double().eval()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    structures = {nn.Conv2d: "kron", nn.BatchNorm2d: "full", Bias: "kron", "4": "full", Head: "full"}
    result = CurvatureEngine(model, "classification", "ggn", structures).compute(x, y)
    assert result.structures == {"0": "kron", "1": "full", "3": "diag", "4": "full", "5": "full"}


@pytest.mark.parametrize(
    "structure, match",
    [
        ("block", "structure must be one of 'diag', 'kron', 'full' or a mapping; got 'block'"),
        ({}, "structure must be 'diag', 'kron', 'full' or a non-empty mapping"),
        (["kron"], "non-empty mapping from module types or names to them, got \\['kron'\\]"),
        ({nn.Linear: "dense"}, "structure\\[Linear\\] must be one of 'diag', 'kron', 'full'; got 'dense'"),
        ({"4": None}, "structure\\['4'\\] must be one of"),
        ({3: "kron"}, "structure has the key 3: keys must be nn.Module subclasses or module names"),
        ({torch.Tensor: "kron"}, "has the key <class 'torch.Tensor'>"),
    ],
)
def test_bad_structures_are_refused_with_the_entry_named(structure, match):
    with pytest.raises(ValueError, match=match):
        check_structure(structure)
    with pytest.raises(ValueError, match=match):
        CurvatureEngine(network(), "classification", "ggn", structure)


def test_a_name_that_is_not_a_block_is_an_error_and_a_type_without_modules_is_not():
    with pytest.raises(ValueError, match=r"structure names 'classifier', which is not a module with a block here"):
        requested_structures(plan_modules(network()), {"classifier": "full", nn.Linear: "kron"})
    with pytest.raises(ValueError, match=r"names '2'"):  # Flatten has no parameters, so no block
        requested_structures(plan_modules(network()), {"2": "full"})
    assert requested_structures(plan_modules(network()), {nn.LSTM: "full"}) == dict.fromkeys(
        ["0", "1", "3", "4", "5"], "diag"
    )


def test_hessian_refuses_a_kron_entry_and_full_entries_are_size_checked():
    model = CASES_BY_NAME["mlp"].build()
    with pytest.raises(ValueError, match=r"got structure='kron' for modules \['2'\]"):
        CurvatureEngine(model, "classification", "hessian", {"0": "full", "2": "kron"})
    big = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    with pytest.raises(
        ValueError, match=r"structure 'full' with kind='ggn' needs a 5,130 x 5,130 block for module '2'"
    ):
        CurvatureEngine(big, "classification", "ggn", {"2": "full"}, max_dense_bytes=2**20)
    CurvatureEngine(big, "classification", "ggn", {"0": "kron", "2": "full"})  # within the default limit


def test_labels():
    assert structure_label("kron") == "kron" and structure_label({nn.Linear: "full"}) == "mixed"
    assert "structure='mixed'" in repr(CurvatureEngine(network(), "classification", "ggn", {nn.Linear: "full"}))
