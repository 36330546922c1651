"""MixedGaussian: per-module structures (its algebra runs with every family in tests/posteriors/test_base.py)."""

import pytest
import torch
from torch import nn

from bayesso import BayesianModel
from bayesso.posteriors import KroneckerGaussian, MixedGaussian, build_posterior
from tests.posteriors.test_base import MIXED, fitted


def test_each_block_has_its_mapped_structure_and_full_blocks_set_the_refresh_interval():
    posterior, _ = fitted("mixed")
    assert posterior.statistic.structures == {"0": "kron", "1": "full", "3": "full", "4": "diag", "6": "kron"}
    assert posterior.requested == {"0": "kron", "1": "full", "3": "full", "4": "diag", "6": "kron"}
    assert posterior.structure == "mixed" and posterior.curvature_structure == MIXED
    assert posterior.default_inv_interval == 10
    no_full = MixedGaussian(posterior.module, {nn.Module: "kron", nn.LayerNorm: "diag"})
    assert no_full.default_inv_interval == 1


def test_a_mapping_of_one_structure_is_that_structure_bit_for_bit():
    posterior, _ = fitted("kron")
    mixed = MixedGaussian(posterior.module, {nn.Module: "kron"}, prior_precision=2.0, dataset_size=60, temperature=0.7)
    kron = KroneckerGaussian(posterior.module, prior_precision=2.0, dataset_size=60, temperature=0.7)
    for p in (mixed, kron):
        p.damping = posterior.damping
        p.update_statistic(posterior.statistic)
    v = torch.randn(2, kron.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed.precondition(v), kron.precondition(v))
    assert torch.equal(
        mixed.sample(3, torch.Generator().manual_seed(1)), kron.sample(3, torch.Generator().manual_seed(1))
    )
    assert torch.equal(mixed.log_det_precision(), kron.log_det_precision())


@pytest.mark.parametrize(
    "structures, options, match",
    [
        ("kron", {}, "structures must be a mapping .* got 'kron': for one structure everywhere use the posterior"),
        ({nn.Linear: "block"}, {}, r"structures\[Linear\] must be one of 'diag', 'kron', 'full'; got 'block'"),
        ({"fc": "full"}, {}, "structure names 'fc', which is not a module with a block here"),
        (
            {nn.Linear: "kron"},
            {"kfac_damping": "tikhonov"},
            "kfac_damping must be 'exact' or 'factored', got 'tikhonov'",
        ),
        ({"6": "full"}, {"max_dense_bytes": 100}, r"MixedGaussian needs a 21 x 21 block for module '6' \(Linear\)"),
    ],
)
def test_bad_construction_is_refused_and_leaves_the_module_untouched(structures, options, match):
    posterior, _ = fitted("diag")
    before = {k: v.clone() for k, v in posterior.module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        MixedGaussian(posterior.module, structures, **options)
    assert all(torch.equal(before[k], v) for k, v in posterior.module.state_dict().items())


def test_build_posterior_and_bayesian_model_take_a_mapping():
    posterior, _ = fitted("diag")
    built = build_posterior(posterior.module, {nn.Linear: "full"}, max_dense_bytes=2**20)
    assert isinstance(built, MixedGaussian) and built.max_dense_bytes == 2**20
    model = BayesianModel(posterior.module, "classification", posterior={nn.Conv1d: "kron"}, kfac_damping="factored")
    assert isinstance(model.posterior, MixedGaussian) and model.posterior.kfac_damping == "factored"
    assert model.posterior.statistic.structures["0"] == "kron"
    with pytest.raises(ValueError, match=r"posterior\[Linear\] must be one of"):
        BayesianModel(posterior.module, "classification", posterior={nn.Linear: "dense"})
