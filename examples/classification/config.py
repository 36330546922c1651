"""The JSON configuration of a training run, validated whole before anything runs.

``load_config(path)`` reads a file and ``parse_config(raw)`` checks a dict: every unknown key, wrong type
and bad value is a ``ConfigError`` that names the key's full path and the value, e.g.
``config key 'method.args.lr': expected a number > 0, got -1``. The sections::

    {"description": "...",                          # optional free text: where the settings come from
     "seed": 0, "device": "auto",                   # "auto": CUDA when available
     "data": {"name": "digits", "batch_size": 64, "test_batch_size": 1000, "augment": false, "workers": 0},
     "model": {"name": "mlp", "args": {"hidden": [256, 256]}},
     "method": {"name": "vogn", "posterior": "diag", "args": {"lr": 0.03}},
     "schedule": {"epochs": 20, "lr": "cosine", "warmup_epochs": 0},
     "mc_samples": {"train": 1, "test": 32},        # weight samples per step / per prediction (0: at the mean)
     "checkpoint": {"dir": null, "interval": 1, "resume": true},
     "distributed": {"mc_groups": 1, "timeout": 600}}

The arguments a network or method accepts are listed in ``MODEL_ARGS`` and ``METHOD_ARGS``; the others
keep the defaults of ``networks.py`` and of the optimizers (bayesso's presets, ``torch.optim.Adam``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checks import (
    REQUIRED,
    ConfigError,
    Validator,
    args,
    below_one,
    boolean,
    choice,
    fail,
    increasing_integers,
    integer,
    number,
    optional,
    pair,
    section,
    sizes,
    text,
)

__all__ = ["DATA_SETS", "METHODS", "METHOD_ARGS", "MODEL_ARGS", "Config", "ConfigError", "load_config", "parse_config"]

DATA_SETS = ("digits", "mnist", "fashion_mnist", "cifar10")
METHODS = ("adam", "kfac", "vogn", "noisy_kfac", "ivon")
DETERMINISTIC = ("adam", "kfac")
POSTERIORS = {"vogn": ("diag", "kron"), "noisy_kfac": ("kron",), "ivon": ("diag",)}  # the first is the default
LR_SCHEDULES = ("constant", "cosine", "step", "exponential")


MODEL_ARGS: dict[str, dict[str, Validator]] = {
    "mlp": {"hidden": sizes},
    "lenet5": {"batchnorm": boolean},
    "alexnet": {"width": number(0.0, open_low=True)},
    "vgg": {"depth": choice(11, 13, 16, 19), "width": integer(1), "batchnorm": boolean},
    "resnet18": {},
}
_VI_ARGS: dict[str, Validator] = {
    "lr": number(0.0, open_low=True),
    "betas": pair(below_one, below_one),
    "damping": number(0.0),
    "prior_precision": number(0.0, open_low=True),
    "temperature": number(0.0, open_low=True),
    "temperature_warmup": pair(number(0.0, open_low=True), integer(1)),
    "augmentation_factor": number(0.0, open_low=True),
    "kl_clip": optional(number(0.0, open_low=True)),
    "deterministic_batchnorm": boolean,
    "curv_interval": integer(1),
    "inv_interval": integer(1),
    "learn_prior": optional(choice("module", "scalar")),
}
_NATURAL_GRADIENT_ARGS: dict[str, Validator] = {
    "curvature": choice("fisher_emp", "fisher_mc", "ggn"),
    "momentum": choice("raw", "adam"),
    "init_precision": optional(number(0.0, open_low=True)),
}
METHOD_ARGS: dict[str, dict[str, Validator]] = {
    "adam": {
        "lr": number(0.0, open_low=True),
        "betas": pair(below_one, below_one),
        "eps": number(0.0, open_low=True),
        "weight_decay": number(0.0),
    },
    "kfac": {
        "lr": number(0.0, open_low=True),
        "damping": number(0.0),
        "beta": below_one,
        "momentum": below_one,
        "weight_decay": number(0.0),
        "decoupled_weight_decay": number(0.0),
        "kl_clip": optional(number(0.0, open_low=True)),
        "curv_interval": integer(1),
        "inv_interval": integer(1),
        "kind": choice("fisher_mc", "fisher_emp", "ggn"),
        "structure": choice("kron", "diag", "full"),
        "kfac_damping": choice("factored", "exact"),
    },
    "vogn": {**_VI_ARGS, **_NATURAL_GRADIENT_ARGS},
    "noisy_kfac": {**_VI_ARGS, **_NATURAL_GRADIENT_ARGS},
    "ivon": {**_VI_ARGS, "hess_init": number(0.0, open_low=True), "clip_radius": number(0.0, open_low=True)},
}


@dataclass(frozen=True)
class Data:
    name: str
    batch_size: int
    test_batch_size: int
    augment: bool
    workers: int


@dataclass(frozen=True)
class Model:
    name: str
    args: dict


@dataclass(frozen=True)
class Method:
    name: str
    posterior: str | dict[str, str] | None  # the VI methods' structure (or one per module); None for adam and kfac
    args: dict

    @property
    def bayesian(self) -> bool:
        return self.name not in DETERMINISTIC


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: str
    warmup_epochs: float
    milestones: tuple[int, ...]
    gamma: float


@dataclass(frozen=True)
class Samples:
    train: int
    test: int


@dataclass(frozen=True)
class Checkpoint:
    dir: str | None
    interval: int
    resume: bool


@dataclass(frozen=True)
class Distributed:
    mc_groups: int
    timeout: float


@dataclass(frozen=True)
class Config:
    """A validated configuration; ``raw`` is the JSON object it came from (written next to the results)."""

    description: str | None
    seed: int
    device: str
    data: Data
    model: Model
    method: Method
    schedule: Schedule
    mc_samples: Samples
    checkpoint: Checkpoint
    distributed: Distributed
    raw: dict


def _model(where: str, value: Any) -> Model:
    found = section(where, value, {"name": (choice(*MODEL_ARGS), REQUIRED), "args": (lambda w, v: v, {})})
    name = found["name"]
    return Model(name, args(f"{where}.args", found["args"], MODEL_ARGS[name], f"model {name!r}"))


def _method(where: str, value: Any) -> Method:
    spec = {
        "name": (choice(*METHODS), REQUIRED),
        "posterior": (optional(_posterior), None),
        "args": (lambda w, v: v, {}),
    }
    found = section(where, value, spec)
    name, posterior = found["name"], found["posterior"]
    if name in DETERMINISTIC:
        if posterior is not None:
            raise ConfigError(f"config key '{where}.posterior': {name} has no posterior, got {json.dumps(posterior)}")
    elif isinstance(posterior, dict):
        posterior = _per_module(f"{where}.posterior", posterior, name)
    else:
        posterior = choice(*POSTERIORS[name])(f"{where}.posterior", posterior or POSTERIORS[name][0])
    return Method(name, posterior, args(f"{where}.args", found["args"], METHOD_ARGS[name], f"method {name!r}"))


def _posterior(where: str, value: Any) -> str | dict:
    """A structure's name, or an object of them per module (checked against the method in ``_method``)."""
    return value if isinstance(value, dict) else text(where, value)


def _per_module(where: str, value: dict, method: str) -> dict[str, str]:
    """Structures per module: keys are ``torch.nn`` class names ("Linear", "Conv2d", "Module" for the default) or
    module names, values the method's structures (``bayesso.curvature.structures`` resolves them)."""
    if method == "ivon" or not value:
        fail(where, f"{'one structure' if method == 'ivon' else 'a non-empty object'} for {method}", value)
    allowed = ("diag", "kron") if method == "vogn" else POSTERIORS[method] + ("diag",)
    return {key: choice(*allowed)(f"{where}.{key}", structure) for key, structure in value.items()}


def _schedule(where: str, value: Any) -> Schedule:
    spec = {
        "epochs": (integer(1), REQUIRED),
        "lr": (choice(*LR_SCHEDULES), "cosine"),
        "warmup_epochs": (number(0.0), 0.0),
        "milestones": (increasing_integers, None),
        "gamma": (number(0.0, 1.0, open_low=True), None),
    }
    found = section(where, value, spec)
    kind = found["lr"]
    if found["warmup_epochs"] >= found["epochs"]:
        fail(f"{where}.warmup_epochs", f"fewer epochs than the run's {found['epochs']}", found["warmup_epochs"])
    if (found["milestones"] is None) == (kind == "step"):
        raise ConfigError(f"config key '{where}.milestones': needed with lr 'step' and only there (lr is {kind!r})")
    if (found["gamma"] is None) == (kind in ("step", "exponential")):
        raise ConfigError(
            f"config key '{where}.gamma': needed with lr 'step' or 'exponential' and only there (lr is {kind!r})"
        )
    return Schedule(found["epochs"], kind, found["warmup_epochs"], found["milestones"] or (), found["gamma"])


def parse_config(raw: Any) -> Config:
    """Check a configuration (the parsed JSON) whole; ``ConfigError`` names the first bad key and its value."""
    spec = {
        "description": (optional(text), None),
        "seed": (integer(0), 0),
        "device": (choice("auto", "cpu", "cuda"), "auto"),
        "data": (lambda w, v: v, REQUIRED),
        "model": (lambda w, v: v, REQUIRED),
        "method": (lambda w, v: v, REQUIRED),
        "schedule": (lambda w, v: v, REQUIRED),
        "mc_samples": (lambda w, v: v, {}),
        "checkpoint": (lambda w, v: v, {}),
        "distributed": (lambda w, v: v, {}),
    }
    top = section("", raw, spec)
    data_spec = {
        "name": (choice(*DATA_SETS), REQUIRED),
        "batch_size": (integer(1), REQUIRED),
        "test_batch_size": (integer(1), 1000),
        "augment": (boolean, False),
        "workers": (integer(0), 0),
    }
    data = Data(**section("data", top["data"], data_spec))
    if data.augment and data.name == "digits":
        raise ConfigError("config key 'data.augment': digits is not augmented (no crops of 8 x 8 images), got true")
    method = _method("method", top["method"])
    samples = Samples(**section("mc_samples", top["mc_samples"], {"train": (integer(1), 1), "test": (integer(0), 0)}))
    distributed_spec = {"mc_groups": (integer(1), 1), "timeout": (number(0.0, open_low=True), 600.0)}
    distributed = Distributed(**section("distributed", top["distributed"], distributed_spec))
    if not method.bayesian:
        for key, value, expected in (("mc_samples.train", samples.train, 1), ("mc_samples.test", samples.test, 0),
                                     ("distributed.mc_groups", distributed.mc_groups, 1)):  # fmt: skip
            if value != expected:
                raise ConfigError(
                    f"config key {key!r}: {method.name} trains one deterministic network, so it must be {expected}, "
                    f"got {value}"
                )
    checkpoint_spec = {"dir": (optional(text), None), "interval": (integer(1), 1), "resume": (boolean, True)}
    return Config(
        description=top["description"],
        seed=top["seed"],
        device=top["device"],
        data=data,
        model=_model("model", top["model"]),
        method=method,
        schedule=_schedule("schedule", top["schedule"]),
        mc_samples=samples,
        checkpoint=Checkpoint(**section("checkpoint", top["checkpoint"], checkpoint_spec)),
        distributed=distributed,
        raw=raw,
    )


def load_config(path: str | Path, epochs: int | None = None) -> Config:
    """Read and check the JSON file at ``path``; ``epochs`` replaces ``schedule.epochs`` before the check."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if epochs is not None and isinstance(raw, dict) and isinstance(raw.get("schedule"), dict):
        raw["schedule"]["epochs"] = epochs
    try:
        return parse_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
