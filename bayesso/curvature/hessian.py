"""Exact Hessian blocks of the summed NLL by double backpropagation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bayesso.likelihoods import Likelihood

__all__ = ["hessian_blocks"]


def hessian_blocks(
    module: nn.Module,
    likelihood: Likelihood,
    inputs: tuple[Tensor, ...],
    targets: Tensor,
    blocks: dict[str, list[str]],
    diagonal_only: bool,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Per block (name -> parameter names) the exact Hessian block of sum_i l_i, or its diagonal.

    Each block costs one Hessian-vector product per parameter, one backward pass
    each (batched ``is_grads_batched`` products are no faster here and hit missing
    batching rules, e.g. for group norm's double backward); the forward runs in ``dtype`` on copies of the module's
    parameters and buffers where their dtype differs, so low-precision models work.
    """
    own = {
        name: module.get_parameter(name).detach().to(dtype).requires_grad_()
        for names in blocks.values()
        for name in names
    }
    overrides = {
        name: t.detach().to(dtype)
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_floating_point() and t.dtype != dtype and name not in own
    }
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    with torch.enable_grad():
        outputs = functional_call(module, {**overrides, **own}, inputs)
        likelihood.check(outputs, targets)
        loss = likelihood.nll(outputs, targets)
        grads = torch.autograd.grad(loss, list(own.values()), create_graph=True, allow_unused=True)
    first = {name: g if g is not None else torch.zeros_like(own[name]) for name, g in zip(own, grads)}
    result = {}
    for block, names in blocks.items():
        params = [own[name] for name in names]
        flat = torch.cat([first[name].reshape(-1) for name in names])
        size = flat.numel()
        out = flat.new_zeros(size) if diagonal_only else flat.new_zeros(size, size)
        unit = torch.zeros(size, dtype=dtype, device=flat.device)
        for i in range(size if flat.requires_grad else 0):
            unit[i] = 1.0
            cols = torch.autograd.grad(flat, params, grad_outputs=unit, retain_graph=True, allow_unused=True)
            unit[i] = 0.0
            row = torch.cat([(c if c is not None else torch.zeros_like(p)).reshape(-1) for c, p in zip(cols, params)])
            if diagonal_only:
                out[i] = row[i]
            else:
                out[i] = row
        result[block] = out
    return result
