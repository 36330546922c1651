"""Hyperparameters: the per-parameter damping vectors follow every change of δ, N, τ, γ and the deterministic set."""

import torch
from torch import nn

from bayesso.posteriors import DiagonalGaussian


def _expected(delta, n, tau, gamma, deterministic=()):
    """λ = τδ/N + γ for the Linear(3, 2) block "0" (8 parameters) and the Linear(2, 1) block "1" (3), as (λ, λ - γ)."""
    prior = [0.0 if name in deterministic else tau * d / n for name, d in zip("01", delta)]
    lam = torch.tensor([prior[0]] * 8 + [prior[1]] * 3, dtype=torch.float64) + gamma
    return lam, lam - gamma


def test_flat_damping_follows_every_hyperparameter_change():
    module = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)).double()
    posterior = DiagonalGaussian(module, prior_precision={"0": 2.0, "1": 5.0}, dataset_size=10)
    changes = [
        ((2.0, 5.0), 10, 1.0, 0.0, (), lambda: None),
        ((2.0, 5.0), 10, 0.5, 0.0, (), lambda: setattr(posterior, "temperature", 0.5)),
        ((2.0, 5.0), 20, 0.5, 0.0, (), lambda: setattr(posterior, "dataset_size", 20)),
        ((2.0, 5.0), 20, 0.5, 0.1, (), lambda: setattr(posterior, "damping", 0.1)),
        ((3.0, 4.0), 20, 0.5, 0.1, (), lambda: setattr(posterior, "prior_precision", {"0": 3.0, "1": 4.0})),
        ((7.0, 4.0), 20, 0.5, 0.1, (), lambda: posterior._prior.__setitem__(0, 7.0)),  # in place
        ((7.0, 4.0), 20, 0.5, 0.1, ("1",), lambda: posterior.deterministic.add("1")),
    ]
    for delta, n, tau, gamma, deterministic, change in changes:
        change()
        lam, prior = _expected(delta, n, tau, gamma, deterministic)
        for got, want in zip(posterior.flat_damping(), (lam, prior)):
            torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
