"""The classification example (examples/classification): every config parses, every non-digits config's network and
method take two steps on random images of its data set's shape, bad configs are refused naming the key, and a
digits config runs end to end (and resumes from its checkpoint bit for bit)."""

import copy
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "classification"
CONFIGS = sorted((EXAMPLE / "configs").glob("*.json"))
sys.path.insert(0, str(EXAMPLE))

import data_sources  # noqa: E402
import networks  # noqa: E402
import train  # noqa: E402
from checks import ConfigError  # noqa: E402
from config import DATA_SETS, METHOD_ARGS, METHODS, MODEL_ARGS, load_config, parse_config  # noqa: E402
from methods import build_learner  # noqa: E402
from schedule import lr_factor  # noqa: E402

from bayesso.distributed import ProcessGrid  # noqa: E402
from bayesso.optim import IVON, SecondOrderOptimizer, VIOptimizer  # noqa: E402

TRAIN_SIZES = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
SLOW = {"cifar10_ivon", "fashion_mnist_kfac", "fashion_mnist_noisy_kfac"}  # 3-8 s on a loaded 2-core machine


def _raw(name: str) -> dict:
    return json.loads((EXAMPLE / "configs" / f"{name}.json").read_text())


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_there_is_one_config_per_data_set_and_method():
    assert sorted(path.stem for path in CONFIGS) == sorted(f"{d}_{m}" for d, m in itertools.product(DATA_SETS, METHODS))


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_parses_and_is_named_after_its_data_set_and_method(path):
    config = load_config(path)
    assert path.stem == f"{config.data.name}_{config.method.name}"
    assert config.raw == json.loads(path.read_text())
    assert config.description  # every shipped config says where its settings come from
    if config.data.name == "digits":  # CI runs them: no files, no checkpoints, one process
        assert config.checkpoint.dir is None and config.distributed.mc_groups == 1


TWO_STEP = [
    pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if path.stem in SLOW else [])
    for path in CONFIGS
    if not path.stem.startswith("digits")
]


@pytest.mark.parametrize("path", TWO_STEP)
def test_every_other_config_builds_and_takes_two_steps_on_random_images(path):
    config = load_config(path)
    shape, size = data_sources.SHAPES[config.data.name], TRAIN_SIZES[config.data.name]
    learner = build_learner(
        config, shape, data_sources.CLASSES[config.data.name], size, ProcessGrid(), torch.device("cpu")
    )
    before = [p.detach().clone() for p in learner.module.parameters()]
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *shape, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    for step in range(2):
        factor = lr_factor(config.schedule, step, size // config.data.batch_size)
        for group, base in zip(learner.optimizer.param_groups, learner.base_lrs):
            group["lr"] = base * factor
        assert math.isfinite(learner.step(x, y))
    changed = [not torch.equal(a, b) for a, b in zip(before, learner.module.parameters())]
    assert sum(changed) >= len(changed) // 2, f"{sum(changed)} of {len(changed)} parameters moved"
    if config.method.bayesian:
        posterior = learner.model.posterior
        factor = config.method.args.get("augmentation_factor", 1.0)
        assert posterior.dataset_size == size * factor and learner.optimizer.mc_samples == config.mc_samples.train


REMOVED = object()
BAD = [  # (key path, value: REMOVED deletes the key), the start of the error
    ("optimiser", "adam", "config key 'optimiser' is unknown; the config takes description, seed, device, data"),
    ("schedule", REMOVED, "config key 'schedule' is missing (required)"),
    ("seed", "0", "config key 'seed': expected an integer >= 0, got \"0\""),
    (
        "data.name",
        "svhn",
        'config key \'data.name\': expected one of "digits", "mnist", "fashion_mnist", "cifar10", got',
    ),
    ("data.augment", True, "config key 'data.augment': digits is not augmented"),
    ("model.args.hidden", [128, 0], "config key 'model.args.hidden[1]': expected an integer >= 1, got 0"),
    ("model.args.depth", 11, "config key 'model.args.depth' is unknown: model 'mlp' takes hidden"),
    ("method.args.lr", -1, "config key 'method.args.lr': expected a number > 0, got -1"),
    ("method.args.learning_rate", 0.1, "config key 'method.args.learning_rate' is unknown: method 'ivon' takes lr,"),
    ("method.args.betas", [0.9, 1.0], "config key 'method.args.betas[1]': expected a number in [0, 1)"),
    ("method.posterior", "kron", 'config key \'method.posterior\': expected one of "diag", got "kron"'),
    ("schedule.lr", "step", "config key 'schedule.milestones': needed with lr 'step' and only there"),
    ("schedule.gamma", 0.5, "config key 'schedule.gamma': needed with lr 'step' or 'exponential' and only there"),
    ("schedule.warmup_epochs", 20, "config key 'schedule.warmup_epochs': expected fewer epochs than the run's 20"),
    ("mc_samples.test", -1, "config key 'mc_samples.test': expected an integer >= 0, got -1"),
    ("checkpoint.interval", 0, "config key 'checkpoint.interval': expected an integer >= 1, got 0"),
    ("distributed.mc_groups", True, "config key 'distributed.mc_groups': expected an integer >= 1, got true"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[key for key, _, _ in BAD])
def test_bad_keys_and_values_are_refused_naming_the_key_and_the_value(key, value, message):
    raw = _raw("digits_ivon")
    *parents, last = key.split(".")
    section = raw
    for parent in parents:
        section = section[parent]
    if value is REMOVED:
        del section[last]
    else:
        section[last] = value
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        parse_config(raw)


def test_a_posterior_per_module_takes_nn_class_names_and_module_names():
    raw = _raw("digits_vogn")
    raw["method"]["posterior"] = {"Linear": "kron", "5": "diag"}  # the MLP's layers 1, 3 and its head 5
    config = parse_config(raw)
    learner = build_learner(config, data_sources.SHAPES["digits"], 10, 1437, ProcessGrid(), torch.device("cpu"))
    assert learner.model.posterior.statistic.structures == {"1": "kron", "3": "kron", "5": "diag"}
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *data_sources.SHAPES["digits"], generator=generator), torch.tensor([0, 1, 2, 3])
    assert math.isfinite(learner.step(x, y))


@pytest.mark.parametrize(
    ("config", "posterior", "message"),
    [
        ("digits_ivon", {"Linear": "diag"}, "config key 'method.posterior': expected one structure for ivon, got"),
        ("digits_vogn", {}, "config key 'method.posterior': expected a non-empty object for vogn, got {}"),
        ("digits_vogn", {"Linear": "full"}, 'config key \'method.posterior.Linear\': expected one of "diag", "kron"'),
        (
            "digits_noisy_kfac",
            {"Conv2d": "full"},
            'config key \'method.posterior.Conv2d\': expected one of "kron", "diag"',
        ),
        ("digits_vogn", 3, "config key 'method.posterior': expected a non-empty string, got 3"),
    ],
)
def test_bad_per_module_posteriors_are_refused_naming_the_key(config, posterior, message):
    raw = _raw(config)
    raw["method"]["posterior"] = posterior
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        parse_config(raw)


def test_a_module_name_that_is_not_in_the_network_is_a_config_error():
    raw = _raw("digits_vogn")
    raw["method"]["posterior"] = {"classifier": "kron"}
    message = "config key 'method.posterior': vogn refused it: structure names 'classifier', which is not a module"
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_learner(parse_config(raw), data_sources.SHAPES["digits"], 10, 1437, ProcessGrid(), torch.device("cpu"))


def test_files_that_are_no_config_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1]")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: the config must be a JSON object, got [1]")):
        load_config(path)
    path.write_text('{"seed": 0,}')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid JSON")):
        load_config(path)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'missing.json'}: no such config file")):
        load_config(tmp_path / "missing.json")


def test_deterministic_methods_refuse_weight_samples_and_posteriors():
    raw = _raw("digits_adam")
    raw["mc_samples"]["test"] = 8
    with pytest.raises(ConfigError, match=re.escape("config key 'mc_samples.test': adam trains one deterministic")):
        parse_config(raw)
    raw = _raw("digits_kfac")
    raw["method"]["posterior"] = "kron"
    with pytest.raises(ConfigError, match=re.escape("config key 'method.posterior': kfac has no posterior")):
        parse_config(raw)


def test_the_command_line_stops_with_the_message_and_no_traceback(tmp_path):
    raw = _raw("digits_vogn")
    raw["method"]["args"]["damping"] = "0.01"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert (
        stopped.value.code
        == f"train.py: {path}: config key 'method.args.damping': expected a number >= 0, got \"0.01\""
    )
    assert not (tmp_path / "out").exists()


def test_mc_groups_must_divide_the_processes():
    raw = _raw("digits_vogn")
    raw["distributed"]["mc_groups"] = 2  # one process here
    with pytest.raises(ConfigError, match=re.escape("config key 'distributed.mc_groups': mc_groups must divide")):
        train.run(parse_config(raw), "x", "data", Path("unused"), progress=False)


def test_torchvision_data_sets_need_their_files_and_torchvision_and_never_download(tmp_path, monkeypatch):
    with pytest.raises(data_sources.DataUnavailableError) as missing:
        data_sources.load_data("mnist", tmp_path)
    assert f"{tmp_path / 'MNIST/raw/train-images-idx3-ubyte'}" in str(missing.value)
    assert "this script never downloads" in str(missing.value)
    for name in data_sources.FILES["cifar10"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # an environment without torchvision
    with pytest.raises(data_sources.DataUnavailableError, match="install the torchvision build that matches torch"):
        data_sources.load_data("cifar10", tmp_path)


class _FakeTorchvisionSet(torch.utils.data.Dataset):
    """Stands in for torchvision's MNIST, FashionMNIST and CIFAR10 classes: 40 training or 20 test images in [0, 1]."""

    shape = (1, 28, 28)
    made: ClassVar[list[tuple[str, bool, bool]]] = []

    def __init__(self, root: str, train: bool, download: bool, transform) -> None:
        self.made.append((root, train, download))
        count = 40 if train else 20
        self.images = torch.rand(count, *self.shape, generator=torch.Generator().manual_seed(int(train)))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), index % 10


def _fake_torchvision() -> types.SimpleNamespace:
    def normalize(mean, std):
        return lambda x: (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    def compose(steps):
        def apply(x):
            for step in steps:
                x = step(x)
            return x

        return apply

    transforms = types.SimpleNamespace(ToTensor=lambda: lambda x: x, Normalize=normalize, Compose=compose)
    datasets = types.SimpleNamespace(MNIST=_FakeTorchvisionSet)
    return types.SimpleNamespace(datasets=datasets, transforms=transforms)


@pytest.mark.slow
def test_mnist_runs_through_torchvision_from_the_files_on_disk(tmp_path, monkeypatch):
    for name in data_sources.FILES["mnist"]:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
    fake = _fake_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", fake.transforms)
    monkeypatch.setattr(_FakeTorchvisionSet, "made", [])
    raw = _raw("mnist_vogn")
    raw["data"].update(batch_size=8, workers=0)
    raw["schedule"]["epochs"] = 1
    raw["checkpoint"]["dir"] = None
    train.run(parse_config(raw), "mnist_vogn", tmp_path / "data", tmp_path / "out", progress=False)
    assert _FakeTorchvisionSet.made == [(str(tmp_path / "data"), True, False), (str(tmp_path / "data"), False, False)]
    (record,) = _records(tmp_path / "out" / "metrics.jsonl")
    assert record["epoch"] == 1 and math.isfinite(record["test_nll"])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_test"] == 20


@pytest.mark.parametrize("name", sorted(networks.NETWORKS))
@pytest.mark.parametrize("data_set", DATA_SETS)
def test_every_network_fits_every_data_set(name, data_set):
    shape = data_sources.SHAPES[data_set]
    net = networks.build_network(name, shape, 10)
    assert net(torch.zeros(2, *shape)).shape == (2, 10)


def test_resnet18_is_the_one_the_benchmarks_use():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import resnet
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert resnet.resnet18 is networks.resnet18
    assert sum(p.numel() for p in networks.resnet18(10).parameters()) == 11_173_962


def test_config_arguments_are_arguments_of_the_builders_and_optimizers():
    for name, allowed in MODEL_ARGS.items():
        assert set(allowed) <= set(inspect.signature(networks.NETWORKS[name]).parameters), name
    owners = {"adam": [torch.optim.Adam], "kfac": [SecondOrderOptimizer], "vogn": [VIOptimizer],
              "noisy_kfac": [VIOptimizer], "ivon": [IVON, VIOptimizer]}  # fmt: skip
    for name, allowed in METHOD_ARGS.items():
        accepted = {p for owner in owners[name] for p in inspect.signature(owner).parameters}
        assert set(allowed) <= accepted, (name, set(allowed) - accepted)


def test_lr_schedules():
    config = parse_config(_raw("digits_adam"))  # 20 epochs, cosine
    assert lr_factor(config.schedule, 0, 10) == 1.0 and lr_factor(config.schedule, 100, 10) == pytest.approx(0.5)
    raw = _raw("digits_adam")
    raw["schedule"] = {"epochs": 6, "lr": "step", "milestones": [2, 4], "gamma": 0.1, "warmup_epochs": 1}
    step = parse_config(raw).schedule
    assert [lr_factor(step, s, 10) for s in (0, 4, 9, 10, 19, 20, 40)] == pytest.approx([0.1, 0.5, 1, 1, 1, 0.1, 0.01])
    raw["schedule"] = {"epochs": 6, "lr": "exponential", "gamma": 0.5}
    assert lr_factor(parse_config(raw).schedule, 25, 10) == 0.25


@pytest.mark.slow
def test_a_digits_config_runs_end_to_end(tmp_path):
    config = str(EXAMPLE / "configs" / "digits_vogn.json")
    train.main(["--config", config, "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    (record,) = _records(tmp_path / "metrics.jsonl")
    assert set(record) == {"epoch", "train_loss", "test_accuracy", "test_nll", "test_ece", "lr", "wall_time"}
    assert record["epoch"] == 1 and 0.5 < record["test_accuracy"] <= 1 and 0 < record["test_ece"] < 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["history"] == [record] and metrics["config"]["schedule"]["epochs"] == 1
    assert metrics["final"]["accuracy"] == record["test_accuracy"] and 0 <= metrics["final"]["auroc"] <= 1
    assert metrics["n_test"] == 539 and metrics["n_ood"] == 539
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# digits_vogn: VOGN, mlp on digits") and "| method | accuracy (%) | NLL |" in report
    assert f"| {100 * record['test_accuracy']:.1f} |" in report
    for figure in ("reliability.png", "ood_scores.png"):
        assert (tmp_path / figure).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    raw = _raw("digits_ivon")
    raw["schedule"]["epochs"] = 3
    raw["checkpoint"] = {"dir": "checkpoints", "interval": 1, "resume": True}
    config = parse_config(raw)
    train.run(config, "ivon", "data", tmp_path, progress=False)
    finished = _records(tmp_path / "metrics.jsonl")
    (tmp_path / "checkpoints" / "ivon.pt").unlink()  # killed before epoch 3's checkpoint: .previous holds epoch 2
    train.run(parse_config(copy.deepcopy(raw)), "ivon", "data", tmp_path, progress=False)
    resumed = _records(tmp_path / "metrics.jsonl")
    assert resumed[:2] == finished[:2]  # read back from the checkpoint
    assert {k: v for k, v in resumed[2].items() if k != "wall_time"} == {
        k: v for k, v in finished[2].items() if k != "wall_time"
    }
    raw["method"] = {"name": "vogn", "args": {}}
    with pytest.raises(ConfigError, match="is a checkpoint of a ivon run on 1 process"):
        train.run(parse_config(raw), "ivon", "data", tmp_path, progress=False)


@pytest.mark.slow
def test_two_processes_under_torchrun_share_the_work_as_the_config_lays_it_out(tmp_path):
    raw = _raw("digits_vogn")
    raw["distributed"]["mc_groups"] = 2  # 2 processes: 1 data shard x 2 MC-sample groups
    raw["checkpoint"]["dir"] = "checkpoints"
    path = tmp_path / "digits_vogn.json"
    path.write_text(json.dumps(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLE / "train.py"), "--config", str(path), "--epochs", "1", "--out", str(tmp_path / "out"),
               "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = _records(tmp_path / "out" / "metrics.jsonl")
    assert record["epoch"] == 1 and 0.3 < record["test_accuracy"] <= 1
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["digits_vogn.rank0.pt", "digits_vogn.rank1.pt"]
