"""Temperature scaling recovers a known temperature and never worsens the held-out NLL."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from bayesso.predict.temperature import TemperatureScaling


def _overconfident(n: int, classes: int, factor: float, seed: int):
    """Labels drawn from softmax(z), logits reported as factor * z: the right temperature is ``factor``."""
    gen = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, classes, generator=gen, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
    return factor * z, targets


@pytest.mark.parametrize("factor", [0.5, 2.5])
def test_recovers_the_temperature_of_rescaled_logits(factor):
    logits, targets = _overconfident(20000, 5, factor, seed=0)
    scaler = TemperatureScaling().fit(logits, targets)
    assert scaler.temperature == pytest.approx(factor, rel=0.05)
    assert scaler.nll(logits, targets) <= F.cross_entropy(logits, targets).item()
    torch.testing.assert_close(scaler.probs(logits), torch.softmax(logits / scaler.temperature, -1))


def test_binary_logits_and_the_minimum_is_a_minimum():
    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(5000, generator=gen, dtype=torch.float64)
    targets = (torch.rand(5000, generator=gen, dtype=torch.float64) < torch.sigmoid(z)).long()
    scaler = TemperatureScaling().fit(3 * z, targets)
    assert scaler.temperature == pytest.approx(3.0, rel=0.1)
    best = scaler.nll(3 * z, targets)
    for nearby in (0.9, 1.1):
        assert TemperatureScaling(scaler.temperature * nearby).nll(3 * z, targets) > best
    torch.testing.assert_close(scaler.probs(3 * z), torch.sigmoid(z * 3 / scaler.temperature))


def test_bad_input():
    logits, targets = _overconfident(10, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="temperature must be positive and finite, got -1.0"):
        TemperatureScaling(-1.0)
    with pytest.raises(ValueError, match=r"logits must be \(N, C\) or binary \(N,\) .* got \(10, 3\) and \(9,\)"):
        TemperatureScaling().fit(logits, targets[:9])
    with pytest.raises(ValueError, match="logits contain non-finite values"):
        TemperatureScaling().fit(logits * float("inf"), targets)
    with pytest.raises(ValueError, match="bounds must be"):
        TemperatureScaling().fit(logits, targets, bounds=(2.0, 1.0))
    scaler = TemperatureScaling(2.0)
    with pytest.raises(ValueError):
        scaler.fit(logits[:0], targets[:0])
    assert scaler.temperature == 2.0  # a failed fit changes nothing


def test_warns_at_the_edge_of_the_bounds():
    logits, targets = _overconfident(2000, 3, 50.0, seed=0)
    with pytest.warns(UserWarning, match="at the edge of bounds"):
        TemperatureScaling().fit(logits, targets, bounds=(0.5, 5.0))


def test_a_single_held_out_class_is_warned_about_naming_the_function_and_the_class():
    logits, targets = _overconfident(300, 4, 1.0, seed=2)
    only = targets == 2
    with pytest.warns(UserWarning, match=r"TemperatureScaling.fit: all \d+ held-out labels are class 2"):
        TemperatureScaling().fit(logits[only], targets[only])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*held-out labels are class")
        TemperatureScaling().fit(logits, targets)  # several classes: no such warning
    with pytest.warns(UserWarning, match="held-out labels are class 1"):  # binary logits, one label
        TemperatureScaling().fit(logits[:, 0], torch.ones(300, dtype=torch.long))
