"""Do bayesso's CurvatureEngine and curvlinops' KFACLinearOperator compute the same exact K-FAC factors?

Both factorise the summed NLL's GGN block of each Linear / Conv2d module as G ⊗ A with KFAC-expand for
convolutions, A the input-side factor with the bias as a trailing 1 in the input (curvlinops'
``separate_weight_and_bias=False``) and G the output-gradient factor. Their conventions coincide with
curvlinops' loss reduction "sum": A is the mean of a aᵀ over the examples and a convolution's output
positions, G the sum of g gᵀ (so that G ⊗ A is the summed NLL's block). With the exact (type-2 / ggn) kind the
factors are deterministic, and the check compares them entry for entry, in float64 on one batch; MC factors
differ by their sampled labels (each library draws its own), so only their cost is compared.
"""

from __future__ import annotations

import warnings

import torch
from step_cases import affine_modules, curvlinops_operator
from torch import Tensor, nn

from bayesso.curvature import CurvatureEngine


def factor_differences(module: nn.Module, x: Tensor, y: Tensor) -> list[tuple[str, str, float, float]]:
    """(module name, type, ||ΔA|| / ||A||, ||ΔG|| / ||G||) per Linear / Conv2d module, bayesso vs curvlinops."""
    module, x = module.double(), x.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = CurvatureEngine(module, "classification", "ggn", "kron", modules=affine_modules(module))
    blocks = engine.compute(x, y).blocks
    operator = curvlinops_operator(module, x, y, "type-2")
    operator.compute_kronecker_factors()
    rows = []
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            a, g = blocks[name].A[0], blocks[name].G[0]
            da = (a - operator._input_covariances[name]).norm() / a.norm()
            dg = (g - operator._gradient_covariances[name]).norm() / g.norm()
            rows.append((name, type(layer).__name__, float(da), float(dg)))
    return rows


def report(module: nn.Module, x: Tensor, y: Tensor) -> str:
    """A markdown table of ``factor_differences``."""
    lines = ["| module | type | A: relative difference | G: relative difference |", "|---|---|---:|---:|"]
    lines += [f"| {n} | {kind} | {da:.1e} | {dg:.1e} |" for n, kind, da, dg in factor_differences(module, x, y)]
    return "\n".join(lines)


if __name__ == "__main__":
    from models import STEP_TIME_MODELS

    torch.manual_seed(0)
    print(report(STEP_TIME_MODELS["cnn"](), torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))))
