"""Generic fallback: exact per-example gradients of any parameters through ``torch.func``.

Used for modules without a rule, for modules whose parameters are used outside
their own forward (functional calls such as ``F.linear(x, self.fc.weight)``), and
for parameters shared between modules. The per-example gradient of <f_i, v_i> is
obtained by ``vjp`` of the whole model on example i (via ``functional_call``),
vectorised over examples with ``vmap``; no Jacobian is formed. The results are plain
tensors: no autograd graph through the module's parameters is kept alive by them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

__all__ = ["per_example_gradients"]


def per_example_gradients(
    module: nn.Module, inputs: tuple[Tensor, ...], names: list[str], vectors: Tensor, index: slice
) -> Tensor:
    """Per-example gradients (b, K, P) of <f_i, v_ik> w.r.t. the parameters ``names``.

    ``inputs`` are the model's inputs (batch in dimension 0), ``vectors`` (K, B, *out)
    the backward vectors; P is the total size of ``names``, flattened row-major in order.
    Random layers (dropout in training mode) draw fresh randomness per example.
    """
    params = {name: module.get_parameter(name).detach() for name in names}
    others = {name: p.detach() for name, p in module.named_parameters() if name not in params}

    def one_example(xs: tuple[Tensor, ...], v: Tensor) -> Tensor:
        def output(p: dict[str, Tensor]) -> Tensor:
            return functional_call(module, {**others, **p}, tuple(x.unsqueeze(0) for x in xs)).squeeze(0)

        _, pullback = vjp(output, params)
        # A loop over vectors, not a nested vmap: nested vmap misses batching rules (PReLU).
        rows = [pullback(vector)[0] for vector in v]
        return torch.stack([torch.cat([row[name].reshape(-1) for name in names]) for row in rows])

    batch = tuple(x[index].detach() for x in inputs)
    try:
        with torch.no_grad():  # torch.func differentiates inside; nothing joins an outer autograd graph
            return vmap(one_example, in_dims=(0, 1), randomness="different")(batch, vectors[:, index].detach())
    except RuntimeError as error:
        raise RuntimeError(
            f"the generic curvature fallback for parameters {names} needs per-example gradients of the model "
            f"through torch.func.vmap, which failed: {error}. Models with data-dependent control flow or "
            "batch-norm layers in training mode cannot be vmapped; put such layers in eval mode or "
            "exclude the parameters with modules=..."
        ) from error
