"""J Σ Jᵀ for Kronecker and diagonal blocks of ``nn.Linear`` layers from their inputs and output gradients.

For a Linear layer called once on (B, d_in) inputs, the Jacobian of output k of example i
with respect to its [W | b] is the outer product g_ik ãᵢᵀ (g_ik = ∂f_ik/∂hᵢ for the layer's
output h, ã = [a, 1]). In the block's eigenbasis Q_G ⊗ Q_A with precision eigenvalues
p_oj, its contribution to the output covariance is

    (J Σ Jᵀ)_kl = Σ_o ĝ_ko ĝ_lo Σ_j â_j² / p_oj,     ĝ = Q_Gᵀ g,  â = Q_Aᵀ ã,

which costs O(C d_out² + d_in² + d_out d_in) per example instead of rotating the full
d_out x d_in Jacobian of every output (O(C d_out d_in (d_out + d_in))). A diagonal block is
the case Q = I. Other blocks go through the general per-example Jacobians of ``linearized.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayesso.curvature.modules import AffineRule
from bayesso.posteriors import Posterior
from bayesso.posteriors.diagonal import DiagonalBasis
from bayesso.posteriors.kronecker import KroneckerBasis

__all__ = ["linear_kronecker_covariance"]


def linear_kronecker_covariance(
    module: nn.Module, posterior: Posterior, x: Tensor
) -> tuple[Tensor, Tensor | None, set[str]]:
    """One forward of ``x``: (outputs, Σ over eligible blocks of J_b Σ_b J_bᵀ as (B, O, O) or None, their names).

    Eligible: Kronecker or diagonal blocks of ``nn.Linear`` modules called exactly once, on 2-D input.
    """
    layouts = {
        plan.name: plan.layout()
        for plan in posterior.plans
        if isinstance(plan.module, nn.Linear)
        and isinstance(plan.rule, AffineRule)  # not a Linear whose weight is tied elsewhere
        and isinstance(posterior.precision_eigenbasis(plan.name)[0], (KroneckerBasis, DiagonalBasis))
    }
    candidates = {plan.name: plan.module for plan in posterior.plans if plan.name in layouts}
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in candidates}

    def recorder(name: str):
        def record(_module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            records[name].append((args[0].detach(), output))
            return output.clone()  # a later in-place op changes the clone, not the recorded output

        return record

    handles = [m.register_forward_hook(recorder(name)) for name, m in candidates.items()]
    try:
        with torch.enable_grad():
            outputs = module(x)
    finally:
        for handle in handles:
            handle.remove()
    eligible = {
        name: calls[0]
        for name, calls in records.items()
        if len(calls) == 1 and calls[0][0].ndim == 2 and calls[0][1].requires_grad
    }
    if not eligible:
        return outputs.detach(), None, set()
    names = list(eligible)
    with torch.enable_grad():
        flat = outputs.reshape(len(outputs), -1)
        per_output = [
            torch.autograd.grad(flat[:, k].sum(), [eligible[n][1] for n in names], retain_graph=k + 1 < flat.shape[1])
            for k in range(flat.shape[1])
        ]
    covariance = None
    for index, name in enumerate(names):
        basis, values = posterior.precision_eigenbasis(name)
        if values is None:  # a deterministic block adds no variance
            continue
        inputs = eligible[name][0].to(posterior.dtype)
        layout = layouts[name]
        parts = ([inputs] if layout.has_weight else []) + ([torch.ones_like(inputs[:, :1])] if layout.has_bias else [])
        a_hat = torch.cat(parts, dim=1)  # (B, input_dim)
        g_hat = torch.stack([grads[index] for grads in per_output], dim=1).to(posterior.dtype)  # (B, O, d_out)
        if isinstance(basis, KroneckerBasis):
            a_hat, g_hat = a_hat @ basis.QA[0], g_hat @ basis.QG[0]
            precision = values.reshape(layout.out_features, layout.input_dim)
        else:  # flat order: W row-major, then b
            size = layout.out_features * layout.in_features if layout.has_weight else 0
            columns = [values[:size].reshape(layout.out_features, -1)] if layout.has_weight else []
            precision = torch.cat(columns + ([values[size:].unsqueeze(1)] if layout.has_bias else []), dim=1)
        weights = a_hat.square() @ (1 / precision).T  # (B, d_out)
        part = torch.einsum("bko,bo,blo->bkl", g_hat, weights, g_hat)
        covariance = part if covariance is None else covariance + part
    return outputs.detach(), covariance, set(eligible)
