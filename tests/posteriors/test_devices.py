"""Posteriors follow their module's device and dtype: Posterior.to, follow_module, all or nothing."""

from functools import partial

import pytest
import torch

from bayesso.curvature import CurvatureEngine
from bayesso.posteriors import DiagonalGaussian, FullGaussian, KroneckerGaussian, MixedGaussian
from tests.cases import CASES_BY_NAME
from tests.state import assert_unchanged, posterior_tensors, snapshot

FAMILIES = {
    "diag": (DiagonalGaussian, {}),
    "kron": (KroneckerGaussian, {}),
    "kron_factored": (KroneckerGaussian, {"kfac_damping": "factored"}),
    "full": (FullGaussian, {}),
    "mixed": (partial(MixedGaussian, structures={"0": "full", "2": "kron"}), {"kfac_damping": "factored"}),
}


def fitted32(family: str, **options):
    """A float32 posterior on the zoo MLP whose statistic is a GGN, decomposed, with its batch."""
    cls, defaults = FAMILIES[family]
    case = CASES_BY_NAME["mlp"]
    module, x, y = case.data(batch_size=8)
    module, x = module.float(), x.float()
    posterior = cls(module, prior_precision=2.0, dataset_size=40, damping=1e-3, **defaults, **options)
    engine = CurvatureEngine(module, case.likelihood, "ggn", posterior.curvature_structure)
    posterior.update_statistic(engine.compute(x, y) * 0.125)
    posterior.precondition(torch.ones(posterior.numel))  # decompositions and factored inverses in place
    return posterior


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cast_module_is_followed_at_the_next_use_exactly_and_back(family):
    posterior = fitted32(family)
    before = {key: t.clone() for key, t in posterior_tensors(posterior).items()}
    precision32 = posterior.precision_dense()
    posterior.module.double()
    assert posterior.dtype == torch.float64  # the first use converts
    after = posterior_tensors(posterior)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.dtype == torch.float64 and torch.equal(value, before[key].double()), key  # converted, not redone
    scale = float(precision32.abs().max())  # the float32 one agrees to float32 precision, relative to its size
    torch.testing.assert_close(posterior.precision_dense(), precision32.double(), rtol=0, atol=1e-6 * scale)
    posterior.module.float()
    posterior.precondition(torch.ones(posterior.numel))
    for key, value in posterior_tensors(posterior).items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key]), key
    assert torch.equal(posterior.precision_dense(), precision32)


def test_to_moves_the_module_and_keeps_a_stale_decomposition():
    posterior = fitted32("kron")
    decomposed = {name: b.A.clone() for name, b in posterior.statistic.blocks.items()}
    posterior.update_statistic(posterior.statistic * 3.0, refresh=False)  # sampling keeps the old bases
    variance = posterior.variance()
    assert posterior.to(torch.float64) is posterior
    assert all(p.dtype == torch.float64 for p in posterior.module.parameters())
    assert all(torch.equal(posterior._decomposed.blocks[n].A, a.double()) for n, a in decomposed.items())
    torch.testing.assert_close(posterior.variance(), variance.double(), rtol=1e-6, atol=0)
    posterior.refresh()
    assert posterior._decomposed is None


def test_to_meta_puts_every_tensor_there_and_noise_from_a_cpu_generator_follows():
    posterior = fitted32("kron_factored")
    posterior.to("meta")
    tensors = [*posterior_tensors(posterior).values(), *posterior.module.parameters(), *posterior.module.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert posterior.device.type == "meta"
    noise, eps = posterior.sample_noise(2, torch.Generator().manual_seed(0))
    assert noise.device.type == "meta" and eps.device.type == "meta" and noise.shape == (2, posterior.numel)


def test_a_move_the_posterior_cannot_hold_changes_nothing():
    posterior = fitted32("full", max_dense_bytes=24**2 * 4)  # the 24 x 24 block fits in float32, not in float64
    parameters = list(posterior.module.parameters())
    bases = dict(posterior._bases)
    before = snapshot(posterior)
    with pytest.raises(ValueError, match=r"24 x 24 block .* in torch.float64, above max_dense_bytes"):
        posterior.to(torch.float64)
    assert_unchanged(before, posterior)
    assert all(a is b for a, b in zip(parameters, posterior.module.parameters()))
    assert posterior._bases == bases
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64, got torch.float16"):
        posterior.to(torch.float16)
    assert_unchanged(before, posterior)
    posterior.module.double()  # moved by hand: the posterior refuses to follow, and stays as it was
    with pytest.raises(ValueError, match="above max_dense_bytes"):
        posterior.variance()
    posterior.module.float()
    assert_unchanged(before, posterior)
