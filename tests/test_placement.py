"""bayesso.placement: parsing to()'s arguments, converting state, moving a module all or nothing."""

import pytest
import torch
from torch import nn

from bayesso.curvature import CurvatureEngine
from bayesso.optim.accumulation import MicroBatchSums
from bayesso.placement import (
    converted,
    converted_sums,
    module_moved,
    module_placement,
    moved_generator,
    parse_placement,
    state_dtype,
)
from tests.cases import CASES_BY_NAME


def test_parse_placement_reads_arguments_as_module_to_does():
    assert parse_placement() == (None, None)
    assert parse_placement(torch.float64) == (None, torch.float64)
    assert parse_placement("cpu") == (torch.device("cpu"), None)
    assert parse_placement("cpu", torch.float32) == (torch.device("cpu"), torch.float32)
    assert parse_placement(torch.device("meta"), dtype=torch.float64) == (torch.device("meta"), torch.float64)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.float16,), "dtype must be torch.float32 or torch.float64, got torch.float16"),
        ((None, torch.int64), "dtype must be torch.float32 or torch.float64, got torch.int64"),
        ((torch.float32, torch.float64), "two dtypes, torch.float32 and torch.float64"),
        (("gpu",), "device must be a torch.device, a device string or index, got 'gpu'"),
        (("cuda:99",), "device 'cuda:99' is not available"),
    ],
)
def test_parse_placement_names_the_value_it_refuses(args, message):
    with pytest.raises(ValueError, match=message):
        parse_placement(*args)


def test_state_dtype_is_float64_only_for_float64_parameters():
    assert [state_dtype(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)] == [
        torch.float64,
        torch.float32,
        torch.float32,
        torch.float32,
    ]


def test_module_placement_is_the_first_parameter_device_and_floating_dtype():
    embedding = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)).double()
    assert module_placement(embedding) == (torch.device("cpu"), torch.float64)
    assert module_placement(nn.Linear(2, 2, device="meta")) == (torch.device("meta"), torch.float32)
    assert module_placement(nn.ReLU()) == (None, None)


def test_converted_casts_floating_tensors_keeps_integer_ones_and_leaves_the_input_alone():
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data()
    curvature = CurvatureEngine(module, case.likelihood, "ggn", "kron").compute(x, y)
    value = {"c": curvature, "pair": (x, y), "n": 3}
    out = converted(value, torch.device("cpu"), torch.float32)
    assert out["n"] == 3 and out["pair"][0].dtype == torch.float32 and out["pair"][1].dtype == torch.int64
    for name, block in curvature.blocks.items():
        for old, new in zip(block.tensors(), out["c"].blocks[name].tensors()):
            assert old.dtype == torch.float64 and new.dtype == torch.float32
            assert torch.equal(new, old.float())
    assert converted(x, torch.device("cpu"), torch.float64) is x  # already in place: the tensor itself


def test_converted_sums_copies_the_sums_and_keeps_the_original():
    sums = MicroBatchSums()
    sums.add(torch.ones(3), None, None, 4)
    moved = converted_sums(sums, torch.device("cpu"), torch.float64)
    assert moved is not sums and moved.count == 1 and moved.sizes == [4]
    assert moved.grad.dtype == torch.float64 and sums.grad.dtype == torch.float32


def test_moved_generator_keeps_a_generator_on_its_device_and_refuses_a_device_without_generators():
    generator = torch.Generator().manual_seed(3)
    assert moved_generator(generator, torch.device("cpu")) is generator
    state = generator.get_state()
    with pytest.raises(ValueError, match="device 'meta' cannot hold the optimizer's random generator"):
        moved_generator(generator, torch.device("meta"))
    assert torch.equal(generator.get_state(), state)


def test_module_moved_converts_and_puts_everything_back_when_the_body_fails():
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    module[1].register_buffer("extra", torch.arange(3.0, dtype=torch.float64))  # a buffer of another dtype
    module(torch.randn(4, 3)).sum().backward()
    parameters = list(module.parameters())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    grads = [p.grad.clone() for p in parameters]
    with pytest.raises(RuntimeError, match="later"), module_moved(module, None, torch.float64):
        assert all(p.dtype == torch.float64 and p.grad.dtype == torch.float64 for p in module.parameters())
        raise RuntimeError("later")
    assert all(a is b for a, b in zip(parameters, module.parameters()))
    for key, value in module.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert all(p.grad.dtype == torch.float32 and torch.equal(p.grad, g) for p, g in zip(parameters, grads))


def test_module_moved_puts_back_parameters_that_a_move_to_meta_replaced():
    module = nn.Linear(3, 2)
    weight = module.weight
    with pytest.raises(RuntimeError, match="later"), module_moved(module, torch.device("meta"), None):
        assert module.weight is not weight and module.weight.device.type == "meta"
        raise RuntimeError("later")
    assert module.weight is weight and weight.device.type == "cpu"
