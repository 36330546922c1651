"""Curvature statistics from backward vectors: per-module sums over vectors and examples.

Every kind is a sum over backward vectors v_k at the model output of per-example
outer products of the gradients of <f_i, v_ik>: the output gradient for
``fisher_emp``, gradients of sampled labels' NLL for ``fisher_mc``, the columns of
a square root of the loss Hessian for ``ggn``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bayesso.curvature.blocks import Block, DenseBlock, DiagBlock, KronBlock
from bayesso.curvature.fallback import per_example_gradients
from bayesso.curvature.modules import AffineRule
from bayesso.curvature.plan import ModulePlan
from bayesso.curvature.recorder import CallRecorder
from bayesso.likelihoods import Likelihood

__all__ = ["StatisticAccumulator", "backward_vectors", "dense_or_diag_block", "fallback_blocks"]


def backward_vectors(
    likelihood: Likelihood, kind: str, outputs: Tensor, targets: Tensor | None, generator, mc_samples: int
) -> Tensor:
    """Vectors v_k (K, *outputs.shape) whose per-example outer products sum to the curvature."""
    if kind == "fisher_emp":
        return likelihood.gradient(outputs, targets).unsqueeze(0)
    if kind == "fisher_mc":
        draws = [likelihood.gradient(outputs, likelihood.sample(outputs, generator)) for _ in range(mc_samples)]
        return torch.stack(draws) / math.sqrt(mc_samples)
    root = likelihood.hessian_sqrt(outputs)  # (B, O, K)
    return root.permute(2, 0, 1).reshape(root.shape[2], *outputs.shape)


def dense_or_diag_block(plan: ModulePlan, value: Tensor) -> Block:
    cls = DiagBlock if value.ndim == 1 else DenseBlock
    return cls(plan.names, plan.shapes, value)


class StatisticAccumulator:
    """Sums the statistics of modules with rules over backward vectors.

    After each backward pass, ``add`` takes the output gradients the recorder
    captured (times ``scale``) and adds their contribution: the output factor G for
    K-FAC, the diagonal, or the dense block.
    """

    def __init__(
        self,
        plans: list[ModulePlan],
        recorder: CallRecorder,
        structures: dict[str, str],
        kfac_approx: str,
        dtype: torch.dtype,
    ) -> None:
        self.plans, self.kfac_approx, self.dtype = plans, kfac_approx, dtype
        self.structures = {plan.name: plan.structure(structures[plan.name]) for plan in plans}
        self.prepared = {p.name: p.rule.prepare(p.module, recorder.inputs(p.name), p.local, dtype) for p in plans}
        self.totals: dict[str, Tensor] = {}

    def add(self, recorder: CallRecorder, scale: float = 1.0) -> None:
        for plan in self.plans:
            grads = plan.rule.output_gradients(plan.module, recorder.take_grads(plan.name), self.dtype)
            if scale != 1.0:
                grads = grads * scale
            total = self._contribution(plan, self.prepared[plan.name], grads)
            self.totals[plan.name] = total if plan.name not in self.totals else self.totals[plan.name].add_(total)

    def _contribution(self, plan: ModulePlan, prepared, grads) -> Tensor:
        structure = self.structures[plan.name]
        if structure == "kron":
            return AffineRule.output_factor(grads, self.kfac_approx)
        if structure == "diag":
            fast = plan.rule.diagonal(prepared, grads)
            if fast is not None:
                return fast
        total = None
        for index in _chunks(len(grads), plan.numel):
            parts = plan.rule.per_example_gradients(prepared, grads, index)
            if structure == "diag":
                part = torch.cat([p.square().sum(dim=0) for p in parts])
            else:
                per_example = torch.cat(parts, dim=1)
                part = per_example.T @ per_example
            total = part if total is None else total.add_(part)
        return total

    def blocks(self, n_examples: int) -> dict[str, Block]:
        blocks = {}
        for plan in self.plans:
            if self.structures[plan.name] == "kron":
                prepared = self.prepared[plan.name]
                A = AffineRule.input_factor(prepared, self.kfac_approx)
                blocks[plan.name] = KronBlock(
                    plan.names, plan.shapes, A, self.totals[plan.name], n_examples, prepared[1]
                )
            else:
                blocks[plan.name] = dense_or_diag_block(plan, self.totals[plan.name])
        return blocks


def fallback_blocks(
    module: nn.Module,
    plans: list[ModulePlan],
    inputs: tuple[Tensor, ...],
    vectors: Tensor,
    structures: dict[str, str],
    dtype: torch.dtype,
) -> dict[str, Block]:
    """Diagonal (or, for ``full`` in ``structures``, dense) blocks from per-example gradients through torch.func."""
    if not plans:
        return {}
    names = [n for p in plans for n in p.names]
    sizes = [p.numel for p in plans]
    totals: list[Tensor | None] = [None] * len(plans)
    for index in _chunks(vectors.shape[1], sum(sizes) * vectors.shape[0]):
        per_example = per_example_gradients(module, inputs, names, vectors, index).to(dtype)
        per_example = per_example.reshape(-1, per_example.shape[-1])
        for i, part in enumerate(per_example.split(sizes, dim=1)):
            value = part.T @ part if structures[plans[i].name] == "full" else part.square().sum(0)
            totals[i] = value if totals[i] is None else totals[i].add_(value)
    return {p.name: dense_or_diag_block(p, total) for p, total in zip(plans, totals)}


def _chunks(batch_size: int, numel_per_example: int, budget: int = 2**21):
    """Slices of examples whose per-example gradients hold about ``budget`` numbers.

    Chunks of a few MiB are reused by the allocator; larger fresh buffers are
    page-fault bound on CPU (measured 3.6x slower at 64 MiB than at 8 MiB).
    """
    step = max(1, budget // max(1, numel_per_example))
    return [slice(start, min(start + step, batch_size)) for start in range(0, batch_size, step)]
