"""``symmetric_eigh``: float64 and jitter fallbacks, shift removed, non-finite input refused."""

import pytest
import torch

from bayesso.posteriors import eigenbasis
from bayesso.posteriors.eigenbasis import symmetric_eigh


def test_fallbacks_give_the_decomposition_of_the_input(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(6, 2, generator=gen)
    matrix = (root @ root.T).float()  # rank 2
    real_eigh = torch.linalg.eigh
    calls = []

    def failing(m):  # float32 always fails; float64 fails without jitter
        calls.append(m.dtype)
        if m.dtype == torch.float32 or torch.equal(m, matrix.double()):
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(m)

    monkeypatch.setattr(eigenbasis.torch.linalg, "eigh", failing)
    values, vectors = symmetric_eigh(matrix)
    assert values.dtype == vectors.dtype == torch.float32
    assert calls == [torch.float32, torch.float64, torch.float64]  # then float64 with the first jitter
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, matrix, rtol=1e-5, atol=1e-5)
    assert values.min() > -1e-5  # the jitter's shift is taken off again


def test_non_finite_input_is_refused_and_hopeless_input_named(monkeypatch):
    with pytest.raises(FloatingPointError, match=r"cannot decompose a \(2, 2\) statistic with NaN"):
        symmetric_eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))

    def never(m):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(eigenbasis.torch.linalg, "eigh", never)
    with pytest.raises(torch.linalg.LinAlgError, match=r"could not decompose a \(2, 2\) statistic"):
        symmetric_eigh(torch.eye(2))
