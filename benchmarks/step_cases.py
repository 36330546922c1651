"""The (optimizer) cases of benchmarks/step_time.py: how each builds one training step on a model and batch.

Every case is a function ``build(module, x, y) -> step`` where ``step()`` runs one whole training step on
``module`` (forward, backward, update; or the curvature computation alone for the factor cases), with
the batch-mean cross-entropy as the loss. ``Case.period`` is the number of steps in one cycle of the
case's refresh schedule: timings take whole cycles, so that the steps that refresh curvature count.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from bayesso import BayesianModel
from bayesso.curvature import CurvatureEngine
from bayesso.optim import IVON, PRESETS, SecondOrderOptimizer

Step = Callable[[], object]
DATASET_SIZE = 1437  # the digits data set, the N of the VI presets and of ess
IVON_LR, IVON_H0, IVON_BETA2, IVON_WD = 0.2, 0.5, 0.999, 1e-4  # bayesso IVON's preset; ivon-opt's weight decay


def _closure_step(optimizer, module: nn.Module, x: Tensor, y: Tensor) -> Step:
    def closure():
        optimizer.zero_grad()
        loss = cross_entropy(module(x), y)
        loss.backward()
        return loss

    return lambda: optimizer.step(closure)


def adam(module, x, y) -> Step:
    return _closure_step(torch.optim.Adam(module.parameters(), lr=1e-3), module, x, y)


def sgd(module, x, y) -> Step:
    return _closure_step(torch.optim.SGD(module.parameters(), lr=1e-2, momentum=0.9), module, x, y)


def preset(name: str) -> Callable[..., Step]:
    """A VI preset at its defaults on a BayesianModel (small-data recipe: prior precision 50, temperature 0.01)."""

    def build(module, x, y) -> Step:
        structure = "kron" if name == "noisy_kfac" else "diag"
        model = BayesianModel(
            module, "classification", posterior=structure, dataset_size=DATASET_SIZE, prior_precision=50.0,
            temperature=0.01,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _closure_step(PRESETS[name](model), module, x, y)

    return build


def _sampled_step(optimizer, module: nn.Module, x: Tensor, y: Tensor) -> Step:
    """ivon-opt's loop: one sampled forward + backward inside ``sampled_params(train=True)``, then ``step()``."""

    def step():
        optimizer.zero_grad()
        with optimizer.sampled_params(train=True):
            cross_entropy(module(x), y).backward()
        optimizer.step()

    return step


def ivon_dropin(module, x, y) -> Step:
    """bayesso IVON in its drop-in form, with the hyperparameters ivon_opt maps onto ivon-opt."""
    optimizer = IVON(
        module.parameters(), lr=IVON_LR, ess=DATASET_SIZE, weight_decay=IVON_WD, hess_init=IVON_H0,
        beta2=IVON_BETA2, kl_clip=None,
    )  # fmt: skip
    return _sampled_step(optimizer, module, x, y)


def ivon_opt(module, x, y) -> Step:
    """The peer ivon-opt with ivon_dropin's hyperparameters: its lr ℓ = α / (h0 + weight decay)."""
    import ivon

    optimizer = ivon.IVON(
        module.parameters(), lr=IVON_LR / (IVON_H0 + IVON_WD), ess=DATASET_SIZE, hess_init=IVON_H0, beta1=0.9,
        beta2=IVON_BETA2, weight_decay=IVON_WD,
    )  # fmt: skip
    return _sampled_step(optimizer, module, x, y)


def second_order(interval: int) -> Callable[..., Step]:
    """SecondOrderOptimizer (MC Fisher K-FAC) with curvature and inverses every ``interval`` steps."""

    def build(module, x, y) -> Step:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = SecondOrderOptimizer(
                module, "classification", lr=1e-2, curv_interval=interval, inv_interval=interval
            )
        return _closure_step(optimizer, module, x, y)

    return build


def affine_modules(module: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d modules: the ones both K-FAC implementations factorise."""
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def engine_factors(kind: str) -> Callable[..., Step]:
    """CurvatureEngine K-FAC factors (kron, KFAC-expand) of the Linear and Conv2d modules for one batch."""

    def build(module, x, y) -> Step:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = CurvatureEngine(module, "classification", kind, "kron", modules=affine_modules(module))
        engine.warn_training_batchnorm = False
        generator = torch.Generator().manual_seed(0)
        return lambda: engine.compute(x, y, generator=generator)

    return build


def curvlinops_operator(module: nn.Module, x: Tensor, y: Tensor, fisher_type: str):
    """curvlinops' KFACLinearOperator for the summed NLL of one batch, weight and bias in one factor as bayesso."""
    from curvlinops import KFACLinearOperator

    params = [p for m in affine_modules(module) for p in m.parameters() if p.requires_grad]
    return KFACLinearOperator(
        module, nn.CrossEntropyLoss(reduction="sum"), params, [(x, y)], check_deterministic=False,
        fisher_type=fisher_type, kfac_approx="expand", num_per_example_loss_terms=1, separate_weight_and_bias=False,
        num_data=len(y),
    )  # fmt: skip


def curvlinops_factors(fisher_type: str) -> Callable[..., Step]:
    """curvlinops' K-FAC factors of the same modules and batch (the peer of engine_factors)."""

    def build(module, x, y) -> Step:
        operator = curvlinops_operator(module, x, y, fisher_type)
        return operator.compute_kronecker_factors

    return build


@dataclass(frozen=True)
class Case:
    label: str
    build: Callable[..., Step]
    baselines: tuple[str, ...] = ("adam",)
    period: int = 1
    needs: str | None = None  # a module that must be importable


BASELINES = {"adam": adam, "sgd": sgd}
NOISY_KFAC_PERIOD = max(PRESETS["noisy_kfac"].preset.get(k, 1) for k in ("curv_interval", "inv_interval"))
CASES = {
    "vogn": Case("bayesso VOGN", preset("vogn")),
    "noisy_adam": Case("bayesso noisy Adam", preset("noisy_adam")),
    "noisy_kfac": Case("bayesso noisy K-FAC (default intervals)", preset("noisy_kfac"), period=NOISY_KFAC_PERIOD),
    "ivon": Case("bayesso IVON", preset("ivon")),
    "ivon_dropin": Case("bayesso IVON, drop-in form (ivon-opt's loop and hyperparameters)", ivon_dropin),
    "ivon_opt": Case("ivon-opt (peer)", ivon_opt, needs="ivon"),
    "kfac10": Case("bayesso `SecondOrderOptimizer`, intervals 10", second_order(10), ("sgd", "adam"), period=10),
    "kfac1": Case("bayesso `SecondOrderOptimizer`, everything every step", second_order(1), ("sgd", "adam")),
    "engine_mc": Case("bayesso engine K-FAC factors, MC", engine_factors("fisher_mc")),
    "curvlinops_mc": Case("curvlinops K-FAC factors, MC (peer)", curvlinops_factors("mc"), needs="curvlinops"),
    "engine_exact": Case("bayesso engine K-FAC factors, exact (ggn)", engine_factors("ggn")),
    "curvlinops_exact": Case(
        "curvlinops K-FAC factors, exact (type-2) (peer)", curvlinops_factors("type-2"), needs="curvlinops"
    ),
}
INSTALL = {
    "ivon": "pip install 'bayesso[bench]' (or pip install ivon-opt)",
    "curvlinops": "pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einops einconv unfoldNd "
    "linear_operator",
}


def available(name: str) -> bool:
    """Whether the case can run here (its peer library, if any, is importable)."""
    needs = CASES[name].needs
    return needs is None or importlib.util.find_spec(needs) is not None
