"""``Predictive`` and the running average of draws."""

import pytest
import torch

from bayesso.likelihoods import Binary, Classification, Regression
from bayesso.predict.predictive import DrawAverage, Predictive


def test_average_over_chunks_equals_the_average_of_all_draws():
    draws = torch.randn(10, 4, 3, generator=torch.Generator().manual_seed(0))
    for likelihood, transform in [
        (Classification(), lambda f: torch.softmax(f, -1)),
        (Binary(), lambda f: torch.sigmoid(f[..., 0])),
    ]:
        average = DrawAverage(likelihood, keep_samples=True)
        for chunk in draws[:, :, : 3 if isinstance(likelihood, Classification) else 1].split(3):
            average.add(chunk)
        result = average.result()
        expected = transform(draws[:, :, : 3 if isinstance(likelihood, Classification) else 1])
        torch.testing.assert_close(result.probs, expected.mean(0))
        torch.testing.assert_close(result.samples, expected)
    average = DrawAverage(Regression(sigma=0.5), keep_samples=False)
    for chunk in draws.split(4):
        average.add(chunk)
    result = average.result()
    torch.testing.assert_close(result.mean, draws.mean(0))
    torch.testing.assert_close(result.epistemic, draws.var(0, unbiased=False))
    torch.testing.assert_close(result.aleatoric, torch.full((4, 3), 0.25))
    assert result.samples is None


def test_variance_is_for_regression_only():
    with pytest.raises(ValueError, match="variance is defined for regression"):
        _ = Predictive(probs=torch.ones(2, 2) / 2).variance
