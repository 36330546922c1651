"""What the VI optimizers are built on: a ``BayesianModel``, or, for IVON's drop-in form, torch parameters.

``IVON(net.parameters(), lr, ess=N)`` and param groups ``IVON([{"params": ..., "weight_decay": ...}, ...],
ess=N)`` build a ``ParameterModel``: a container module whose child ``str(i)`` holds the parameters of
group i (the same ``Parameter`` objects: the posterior mean IS them), and a ``DiagonalGaussian`` over it
with one block per group. ivon-opt's weight decay is δ/N, so group i's prior precision is
δ_i = weight_decay_i · ess and its λ_i = τ δ_i / N + γ = τ · weight_decay_i (+ γ); the group's lr
multiplies the step of its block. The other optimizers need per-example quantities that the curvature
engine records on the module's layers, which parameters alone cannot give: ``require_bayesian_model``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from bayesso.optim.accumulation import check_non_negative, check_positive
from bayesso.posteriors import DiagonalGaussian, Posterior

__all__ = ["ParameterGroups", "ParameterModel", "parameter_model", "require_bayesian_model"]

# Options shared by all groups (IVON's arguments); a group setting one of them is refused.
SHARED_OPTIONS = ("ess", "hess_init", "beta1", "beta2", "betas", "mc_samples", "clip_radius")


class ParameterGroups(nn.Module):
    """A container (no forward) whose child ``str(i)`` holds the parameters of param group i, uncopied."""

    def __init__(self, groups: list[list[nn.Parameter]]) -> None:
        super().__init__()
        for index, params in enumerate(groups):
            child = nn.Module()
            for position, param in enumerate(params):
                child.register_parameter(f"p{position}", param)
            self.add_module(str(index), child)


@dataclass(frozen=True)
class ParameterModel:
    """What ``VIOptimizer`` needs of a model when it is given parameters: the container module, the
    diagonal posterior over it (block i = group i) and torch's param groups (with each group's weight decay)."""

    module: ParameterGroups
    posterior: DiagonalGaussian
    param_groups: list[dict]


def parameter_model(params: Iterable, ess: float, weight_decay: float | None) -> ParameterModel:
    """A ``ParameterModel`` over ``params`` (parameters or param-group dicts), with N = ``ess``.

    ``weight_decay`` (ivon-opt's δ/N, a group's own value first) gives δ = weight_decay · ess per
    group; None: δ = 1, the prior N(0, I) of ``BayesianModel``. Nothing is changed if it raises.
    """
    check_positive("ess", ess)
    if weight_decay is not None:
        check_positive("weight_decay", weight_decay)
    groups = _groups(params)
    seen: set[int] = set()
    for index, group in enumerate(groups):
        where = f"param group {index}"
        for key in SHARED_OPTIONS:
            if key in group:
                raise ValueError(f"{where} sets {key!r}, which all groups share here: pass it to IVON(...) instead")
        if "lr" in group:
            check_non_negative(f"{where}: lr", group["lr"])
        if group.get("weight_decay") is not None:
            check_positive(f"{where}: weight_decay", group["weight_decay"])
        _check_parameters(group["params"], where, seen)
    first = groups[0]["params"][0]
    for index, group in enumerate(groups):
        for param in group["params"]:
            if param.device != first.device or param.dtype != first.dtype:
                raise ValueError(
                    f"the parameters must share one device and dtype: param group {index} has one on "
                    f"{param.device} ({param.dtype}), the first is on {first.device} ({first.dtype})"
                )
    decays = [group.get("weight_decay") or weight_decay or 1.0 / ess for group in groups]
    module = ParameterGroups([group["params"] for group in groups])
    posterior = DiagonalGaussian(
        module, prior_precision={str(i): decay * ess for i, decay in enumerate(decays)}, dataset_size=ess
    )
    param_groups = [{**group, "weight_decay": decay} for group, decay in zip(groups, decays)]
    return ParameterModel(module, posterior, param_groups)


def _groups(params) -> list[dict]:
    """``params`` as a list of group dicts, each with a list of tensors under "params"."""
    if isinstance(params, (Tensor, set)) or not isinstance(params, Iterable):
        raise ValueError(
            f"params must be an ordered iterable of parameters or of param-group dicts (as net.parameters() "
            f"gives), got {type(params).__name__}"
        )
    items = list(params)
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters")
    if not all(isinstance(item, dict) for item in items):
        items = [{"params": items}]
    groups = []
    for index, group in enumerate(items):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"param group {index} must be a dict with a 'params' entry, got {group!r}")
        members = group["params"]
        if isinstance(members, set) or not isinstance(members, (Tensor, Iterable)):
            raise ValueError(f"param group {index}'s params must be a tensor or an ordered iterable of them")
        groups.append({**group, "params": [members] if isinstance(members, Tensor) else list(members)})
    return groups


def _check_parameters(params: list, where: str, seen: set[int]) -> None:
    if not params:
        raise ValueError(f"{where} has no parameters")
    for position, param in enumerate(params):
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"{where}: entry {position} must be an nn.Parameter, got {type(param).__name__}")
        if not param.requires_grad:
            raise ValueError(
                f"{where}: parameter {position} (shape {tuple(param.shape)}) does not require grad; leave it "
                "out, e.g. [p for p in net.parameters() if p.requires_grad]"
            )
        if id(param) in seen:
            raise ValueError(f"{where}: parameter {position} (shape {tuple(param.shape)}) appears more than once")
        seen.add(id(param))


def require_bayesian_model(model, optimizer: str) -> None:
    """ValueError, naming the right constructor, unless ``model`` has a posterior (a ``BayesianModel``)."""
    if isinstance(getattr(model, "posterior", None), Posterior):
        return
    if isinstance(model, nn.Module):
        what = f"an nn.Module ({type(model).__name__})"
    elif isinstance(model, (Tensor, Iterable)):
        what = f"parameters ({type(model).__name__})"
    else:
        what = type(model).__name__
    raise ValueError(
        f"{optimizer} needs a BayesianModel, got {what}: its curvature statistic comes from per-example "
        "quantities that the curvature engine records with hooks on the module's layers while step(closure) "
        "runs, which a closure-free step after a plain backward cannot provide. Use "
        f'{optimizer}(BayesianModel(net, "classification"), ...) with your likelihood, or '
        "IVON(net.parameters(), lr=..., ess=N) for an optimizer that drops into a torch training loop"
    )
