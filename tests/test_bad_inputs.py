"""Bad inputs across the public entry points: each gets a clear error and leaves every state untouched.

Every case snapshots every tensor and attribute of the objects involved (``tests/state.py``)
before the call and compares after. ``python -m tests.test_bad_inputs`` prints the table of
cases and outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesso import BayesianModel
from bayesso.checkpoint import CheckpointError, write_checkpoint
from bayesso.curvature import CurvatureEngine
from bayesso.data import make_loader
from bayesso.distributed import ProcessGrid, init
from bayesso.optim import IVON, VOGN, NoisyKFAC, SecondOrderOptimizer, VIOptimizer
from bayesso.predict.metrics import evaluate
from tests.state import assert_unchanged, snapshot


@dataclass
class BadInput:
    what: str
    build: Callable[[object], tuple[list, Callable[[], object]]]  # tmp_path -> (objects, call)
    error: type[BaseException]
    match: str

    def __repr__(self) -> str:
        return self.what


def _data(n=48, features=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    return x, torch.randint(0, classes, (n,), generator=gen)


def classifier(structure="diag", batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU()] if batchnorm else [nn.Linear(5, 8), nn.Tanh()]
    module = nn.Sequential(*layers, nn.Linear(8, 3))
    return BayesianModel(module, "classification", structure, prior_precision=5.0)


def regression(structure="diag"):
    torch.manual_seed(0)
    return BayesianModel(nn.Linear(3, 1), "regression", structure, prior_precision=1.0, sigma=0.1)


def laplace_classifier(structure="kron"):
    model = classifier(structure)
    x, y = _data()
    model.fit_laplace(make_loader(x, y, 16), progress=False)
    return model


def loader(x=None, y=None, batch_size=16):
    if x is None:
        x, y = _data()
    return make_loader(x, y, batch_size)


def fit_case(what, model_builder, loader_builder, error, match, **options):
    def build(_tmp):
        model = model_builder()
        data = loader_builder()
        return [model], lambda: model.fit(data, progress=False, **{"method": "vogn", **options})

    return BadInput(f"fit: {what}", build, error, match)


def _regression_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen)
    return x, x @ torch.tensor([1.0, -2.0, 0.5])


def _one_shot():
    x, y = _data()
    return ((x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16))


def _nan_first_batch():
    x, y = _data()
    x = x.clone()
    x[0, 0] = float("nan")
    return make_loader(x, y, 16, shuffle=False)


FIT = [
    fit_case("regression targets (N,) for outputs (N, 1)", regression, lambda: make_loader(*_regression_data(), 8),
             ValueError, r"regression targets must have the outputs' shape \(8, 1\), got \(8,\)"),
    fit_case("binary targets {0, 2}", lambda: BayesianModel(nn.Linear(5, 1), "binary", "diag"),
             lambda: loader(_data()[0], 2 * (_data()[1] > 0).float()), ValueError,
             "binary targets must be 0 or 1, got 2"),
    fit_case("float class labels", classifier, lambda: loader(_data()[0], _data()[1].float()), ValueError,
             "integer class indices, got dtype torch.float32"),
    fit_case("dict batches", classifier, lambda: [{"x": _data()[0], "y": _data()[1]}], ValueError,
             r"epoch 1, batch 1: expected \(x, y\) batches, got a dict with keys \['x', 'y'\]", dataset_size=48),
    fit_case("3-tuple batches", classifier, lambda: [(*_data(), torch.ones(48))], ValueError,
             r"got a tuple of 3 \(Tensor, Tensor, Tensor\)", dataset_size=48),
    fit_case("bare tensor batches", classifier, lambda: [_data()[0]], ValueError,
             r"expected \(x, y\) batches, got a torch.float32 tensor of shape \(48, 5\)", dataset_size=48),
    fit_case("an empty DataLoader", classifier,
             lambda: DataLoader(TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)), batch_size=16),
             ValueError, r"loader's dataset is empty \(0 examples\)"),
    fit_case("a one-shot generator with epochs=2", classifier, _one_shot, ValueError,
             "one-shot iterator .* first of 2 passes", epochs=2, dataset_size=48),
    fit_case("a last batch of 1 through batch norm in training mode", lambda: classifier(batchnorm=True),
             lambda: loader(*_data(n=33), batch_size=16), ValueError, "batch 3: .*drop_last=True"),
    fit_case("NaN in the first batch, on a Laplace posterior", laplace_classifier, _nan_first_batch, ValueError,
             r"batch 1: x contains 1 NaN or infinite value\(s\) out of 80", method="noisy_kfac"),
    fit_case("class label C for C classes", classifier, lambda: loader(_data()[0], torch.full((48,), 3)),
             ValueError, r"targets must be in \[0, C\) with C=3, got target 3"),
    fit_case("a negative class label", classifier, lambda: loader(_data()[0], torch.full((48,), -1)), ValueError,
             r"must be in \[0, C\), got target -1"),
    fit_case("x and y of different batch sizes", classifier, lambda: [(_data()[0], _data()[1][:40])], ValueError,
             "batch size mismatch: x has 48 examples and y has 40", dataset_size=48),
    fit_case("epochs=0", classifier, loader, ValueError, "epochs must be a positive integer, got 0", epochs=0),
    fit_case("an unknown method", classifier, loader, ValueError, "method must be one of .* got 'adam'", method="adam"),
    fit_case("a negative lr", classifier, loader, ValueError, "lr must be non-negative and finite, got -0.1", lr=-0.1),
    fit_case("lr = NaN", classifier, loader, ValueError, "lr must be non-negative and finite, got nan", lr=math.nan),
    fit_case("temperature 0", classifier, loader, ValueError, "temperature must be positive", temperature=0.0),
    fit_case("a valid temperature with damping -1", classifier, loader, ValueError,
             "damping must be non-negative", temperature=0.5, damping=-1.0),
    fit_case("a prior for an unknown module", classifier, loader, ValueError,
             r"names modules without a posterior block: \['9'\]", prior_precision={"9": 1.0}),
    fit_case("checkpoint_every=0", classifier, loader, ValueError, "checkpoint_every must be a positive number",
             checkpoint_every=0, checkpoint="unused.pt"),
    fit_case("loader=None", classifier, lambda: None, ValueError, "must be an iterable of \\(x, y\\) batches"),
    fit_case("a tensor as the loader", classifier, lambda: _data()[0], ValueError, "wrap tensors with"),
    fit_case("mc_samples=0", classifier, loader, ValueError, "mc_samples must be a positive integer", mc_samples=0),
    fit_case("schedule='linear'", classifier, loader, ValueError, "schedule must be 'cosine' or None, got 'linear'",
             schedule="linear"),
    fit_case("learn_noise=True for classification", classifier, loader, ValueError,
             r"learn_noise must be True \(regression likelihood only\) or False, got True", learn_noise=True),
    fit_case("learn_prior='layer'", classifier, loader, ValueError,
             "learn_prior must be 'module', 'scalar' or None, got 'layer'", learn_prior="layer"),
    fit_case("kl_clip=-1", regression, lambda: make_loader(_regression_data()[0], _regression_data()[1][:, None], 8),
             ValueError, "kl_clip must be positive and finite, got -1", kl_clip=-1.0),
    fit_case("betas=0.9", classifier, loader, ValueError, "betas must be two numbers", betas=0.9),
    fit_case("NaN regression targets", regression, lambda: loader(_regression_data()[0], torch.full((40, 1), math.nan)),
             ValueError, "regression targets must be finite"),
    fit_case("noisy K-FAC on a diagonal posterior", classifier, loader, ValueError,
             "NoisyKFAC needs a KroneckerGaussian", method="noisy_kfac"),
    fit_case("IVON on a Kronecker posterior", lambda: classifier("kron"), loader, ValueError,
             "IVON needs a DiagonalGaussian posterior", method="ivon"),
    fit_case("seed=1.5", classifier, loader, ValueError, "seed must be an integer, got 1.5", seed=1.5),
    fit_case("kfac_approx='bogus' with a new temperature", classifier, loader, ValueError, "kfac_approx must be one of",
             temperature=0.3, kfac_approx="bogus"),
]  # fmt: skip


def _checkpoint_case(what, prepare, error, match):
    def build(tmp_path):
        path = tmp_path / "run.pt"
        model = classifier()
        data = loader()
        prepare(path, data)
        before_bytes = path.read_bytes() if path.exists() else None

        def call():
            try:
                model.fit(data, "vogn", epochs=2, progress=False, checkpoint=path)
            finally:
                assert (path.read_bytes() if path.exists() else None) == before_bytes  # never overwritten

        return [model], call

    return BadInput(f"fit: {what}", build, error, match)


def _corrupt(path, data):
    classifier().fit(data, "vogn", progress=False, checkpoint=path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))


CHECKPOINTS = [
    _checkpoint_case("resume from a corrupted checkpoint", _corrupt, CheckpointError, "no usable checkpoint to resume"),
    _checkpoint_case("resume a 'noisy_adam' checkpoint as 'vogn'",
                     lambda path, data: classifier().fit(data, "noisy_adam", progress=False, checkpoint=path),
                     ValueError, "the checkpoint is of a 'noisy_adam' run, not 'vogn'"),
    _checkpoint_case("a checkpoint past the requested epochs",
                     lambda path, data: classifier().fit(data, "vogn", epochs=3, progress=False, checkpoint=path),
                     ValueError, "at epoch 3 .* past epochs=2"),
    BadInput("fit: a checkpoint in a missing folder",
             lambda tmp: ([m := classifier()], lambda: m.fit(loader(), progress=False, checkpoint=tmp / "no" / "r.pt")),
             ValueError, "the folder .* does not exist"),
]  # fmt: skip


def predict_case(what, builder, call, error, match):
    def build(_tmp):
        model = builder()
        return [model], lambda: call(model)

    return BadInput(what, build, error, match)


def _nan_input(value):
    x = _data()[0].clone()
    x[3, 2] = value
    return x


PREDICT = [
    predict_case("predict: NaN in x", laplace_classifier, lambda m: m.predict(_nan_input(math.nan)), ValueError,
                 r"x contains 1 NaN or infinite value\(s\) out of 240"),
    predict_case("predict: inf in x", laplace_classifier, lambda m: m.predict(_nan_input(math.inf), method="probit"),
                 ValueError, "NaN or infinite"),
    predict_case("predict: n_samples=0", laplace_classifier, lambda m: m.predict(_data()[0], n_samples=0), ValueError,
                 "n_samples must be a positive integer, got 0"),
    predict_case("predict: 4 features for 5", laplace_classifier, lambda m: m.predict(_data()[0][:, :4]), ValueError,
                 r"x of shape \(48, 4\) does not fit the module"),
    predict_case("predict: method='laplace'", laplace_classifier, lambda m: m.predict(_data()[0], method="laplace"),
                 ValueError, "method must be one of 'mc', 'linearized', 'probit'"),
    predict_case("predict: a list as x", laplace_classifier, lambda m: m.predict([[1.0] * 5]), ValueError,
                 "x must be a non-empty batch tensor"),
    predict_case("predict: chunk_size=0", laplace_classifier, lambda m: m.predict(_data()[0], chunk_size=0),
                 ValueError, "chunk_size must be a positive integer"),
    predict_case("evaluate: dict batches", laplace_classifier, lambda m: evaluate(m, [{"x": _data()[0]}]), ValueError,
                 r"evaluate, test batch 1: expected \(x, y\) batches, got a dict"),
    predict_case("evaluate: regression targets (N,) for means (N, 1)", lambda: _laplace_regression(),
                 lambda m: evaluate(m, make_loader(*_regression_data(), 8)), ValueError,
                 r"regression targets must have the outputs' shape \(8, 1\)"),
    predict_case("evaluate: class label 7 of 3", laplace_classifier,
                 lambda m: evaluate(m, [(_data()[0], torch.full((48,), 7))]), ValueError, "C=3, got target 7"),
    predict_case("evaluate: an OOD loader of strings", laplace_classifier,
                 lambda m: evaluate(m, loader(), ood_loader=["abc"]), ValueError, "got a str"),
]  # fmt: skip


def _laplace_regression():
    model = regression()
    x, y = _regression_data()
    model.fit_laplace([(x, y.unsqueeze(1))], progress=False)
    return model


LAPLACE = [
    predict_case("fit_laplace: an empty loader", classifier, lambda m: m.fit_laplace([], progress=False), ValueError,
                 "the loader yielded no batches"),
    predict_case("fit_laplace: float class labels", classifier,
                 lambda m: m.fit_laplace([(_data()[0], _data()[1].double())], progress=False), ValueError,
                 "batch 1: classification targets must be integer class indices"),
    predict_case("fit_laplace: NaN inputs", classifier,
                 lambda m: m.fit_laplace([(_nan_input(math.nan), _data()[1])], progress=False), ValueError,
                 "x contains 1 NaN"),
    predict_case("fit_laplace: kind='fisher'", classifier, lambda m: m.fit_laplace(loader(), kind="fisher"),
                 ValueError, "kind must be one of"),
    predict_case("fit_laplace: an unknown module", classifier, lambda m: m.fit_laplace(loader(), modules=["nope"]),
                 ValueError, "modules contains 'nope'"),
    predict_case("log_marginal_likelihood before fit_laplace", classifier, lambda m: m.log_marginal_likelihood(),
                 ValueError, "call fit_laplace"),
    predict_case("optimize_prior_precision: grid without val_loader", laplace_classifier,
                 lambda m: m.optimize_prior_precision("grid"), ValueError, "pass val_loader"),
    predict_case("optimize_prior_precision: a negative grid value", laplace_classifier,
                 lambda m: m.optimize_prior_precision("grid", val_loader=loader(), grid=[1.0, -1.0]), ValueError,
                 "grid must hold positive finite prior precisions"),
    predict_case("log_marginal_likelihood: 5 values for 2 blocks", laplace_classifier,
                 lambda m: m.log_marginal_likelihood(torch.ones(5)), ValueError, "one per block"),
]  # fmt: skip


def _optimizer_case(what, build_optimizer, call, error, match):
    def build(_tmp):
        model, optimizer = build_optimizer()
        return [model, optimizer], lambda: call(model, optimizer)

    return BadInput(what, build, error, match)


def _vogn(structure="diag", **options):
    model = classifier(structure)
    optimizer = VOGN(model, dataset_size=48, **options)
    x, y = _data()
    optimizer.step(_closure(model.module, optimizer, x, y))
    return model, optimizer


def _second_order():
    model = classifier()
    optimizer = SecondOrderOptimizer(model.module, "classification")
    x, y = _data()
    optimizer.step(_closure(model.module, optimizer, x, y))
    return model, optimizer


def _second_order_negative_lr():
    model, optimizer = _second_order()
    optimizer.param_groups[0]["lr"] = -1.0
    return model, optimizer


def _closure(module, optimizer, x, y, returns="loss", fail=False):
    def closure():
        optimizer.zero_grad()
        losses = nn.functional.cross_entropy(module(x), y, reduction="none")
        losses.mean().backward()
        if fail:
            raise RuntimeError("the closure failed")
        return {"loss": losses.mean(), "none": None, "per-example": losses.detach()}[returns]

    return closure


def _other_state(kind):
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    if kind == "vi":
        optimizer = VOGN(BayesianModel(module, "classification", "diag", dataset_size=48))
    else:
        optimizer = SecondOrderOptimizer(module, "classification")
    optimizer.step(_closure(module, optimizer, *_data()))
    return optimizer.state_dict()


def _cut_statistic(optimizer):
    state = optimizer.state_dict()
    statistic = state["vi"]["posterior"]["statistic"]
    statistic["0"] = [t[:1] for t in statistic["0"]]
    return state


def _retyped_momentum(optimizer):
    state = optimizer.state_dict()
    state["vi"]["momentum"] = state["vi"]["momentum"].double()
    return state


OPTIMIZERS = [
    _optimizer_case("SecondOrderOptimizer: a closure that returns None", _second_order,
                    lambda m, o: o.step(_closure(m.module, o, *_data(), returns="none")), ValueError,
                    r"the closure must return the batch-mean loss .* got None"),
    _optimizer_case("SecondOrderOptimizer: step() without a closure", _second_order, lambda m, o: o.step(), ValueError,
                    r"step\(\) needs a closure"),
    _optimizer_case("VOGN: a closure returning per-example losses", _vogn,
                    lambda m, o: o.step(_closure(m.module, o, *_data(), returns="per-example")), ValueError,
                    r"got a tensor of shape \(48,\)"),
    _optimizer_case("VOGN: a closure that raises", _vogn,
                    lambda m, o: o.step(_closure(m.module, o, *_data(), fail=True)), RuntimeError,
                    "the closure failed"),
    _optimizer_case("VOGN: load_state_dict from another architecture", _vogn,
                    lambda m, o: o.load_state_dict(_other_state("vi")), ValueError,
                    r"vi\['momentum'\] has shape \(39,\), expected \(75,\)"),
    _optimizer_case("SecondOrderOptimizer: load_state_dict from another architecture", _second_order,
                    lambda m, o: o.load_state_dict(_other_state("second_order")), ValueError,
                    r"second_order\['momentum'\] has shape \(39,\), expected \(75,\)"),
    _optimizer_case("VOGN: load_state_dict with a statistic cut to length 1", _vogn,
                    lambda m, o: o.load_state_dict(_cut_statistic(o)), ValueError,
                    r"\['statistic'\]\['0'\]\[0\] has shape \(1,\), expected \(48,\)"),
    _optimizer_case("VOGN: load_state_dict with a float64 momentum", _vogn,
                    lambda m, o: o.load_state_dict(_retyped_momentum(o)), ValueError,
                    "has dtype torch.float64, expected torch.float32"),
    _optimizer_case("VOGN: load_state_dict of a SecondOrderOptimizer", _vogn,
                    lambda m, o: o.load_state_dict(_second_order()[1].state_dict()), ValueError, "no 'vi' entry"),
    _optimizer_case("SecondOrderOptimizer: lr set to -1 by hand", _second_order_negative_lr,
                    lambda m, o: o.step(_closure(m.module, o, *_data())), ValueError, "lr must be non-negative"),
]  # fmt: skip


def _ivon_diverging():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    model = BayesianModel(module, "classification", "diag", prior_precision=1.0, dataset_size=48)
    optimizer = IVON(model, lr=1e4, kl_clip=None)  # without the trust region, which would keep it finite
    x, y = _data()
    for _ in range(40):  # steps until the candidate is non-finite; each earlier one is whole and finite
        before = snapshot(model, optimizer)
        try:
            optimizer.step(_closure(module, optimizer, x, y))
        except FloatingPointError:
            return [model, optimizer], before
    raise AssertionError("IVON at lr 1e4 did not diverge")


def _ivon_case(_tmp):
    objects, _ = _ivon_diverging()
    model, optimizer = objects
    return objects, lambda: optimizer.step(_closure(model.module, optimizer, *_data()))


def _save_load_case(what, damage, error, match):
    def build(tmp_path):
        model = laplace_classifier()
        path = tmp_path / "model.pt"
        model.save(path)
        target = damage(path, model)
        return [target], lambda: BayesianModel.load(path, target)

    return BadInput(f"BayesianModel.load: {what}", build, error, match)


def _other_architecture(path, model):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))


def _truncate(path, model):
    path.write_bytes(path.read_bytes()[:-300])
    return classifier("kron").module


def _empty(path, model):
    path.write_bytes(b"")
    return classifier("kron").module


def _flip(path, model):
    raw = bytearray(path.read_bytes())
    start = raw.find(model.module[0].weight.detach().numpy().tobytes()[:16])
    for i in range(start, start + 64):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return classifier("kron").module


def _cut_saved_statistic(path, model):
    content = torch.load(path, weights_only=True)["content"]
    content["posterior"]["statistic"]["0"] = [t.reshape(-1)[:1] for t in content["posterior"]["statistic"]["0"]]
    write_checkpoint(path, "model", content)  # valid checksums over a wrong shape
    return classifier("kron").module


def _fit_checkpoint(path, model):
    classifier().fit(loader(), progress=False, checkpoint=path, resume=False)
    return classifier("kron").module


SAVE_LOAD = [
    _save_load_case("a module of another architecture", _other_architecture, CheckpointError,
                    r"model.pt: the module state\['2.weight'\] has shape \(3, 8\), expected \(4, 8\)"),
    _save_load_case("a truncated file", _truncate, CheckpointError, "model.pt: cannot be read as a checkpoint"),
    _save_load_case("an empty file", _empty, CheckpointError, r"model.pt: the file is empty \(0 bytes\)"),
    _save_load_case("64 flipped bytes in a weight", _flip, CheckpointError,
                    r"model.pt: the content is corrupted: entry \['module'\]\['0.weight'\] has changed"),
    _save_load_case("statistic tensors cut to length 1", _cut_saved_statistic, CheckpointError,
                    r"\['statistic'\]\['0'\]\[0\] has shape \(1,\), expected \(1, 6, 6\)"),
    _save_load_case("a fit checkpoint", _fit_checkpoint, CheckpointError, "a 'fit' checkpoint, expected a 'model'"),
    BadInput("BayesianModel.load: a missing file",
             lambda tmp: ([m := classifier().module], lambda: BayesianModel.load(tmp / "none.pt", m)),
             FileNotFoundError, "no checkpoint file at"),
]  # fmt: skip


def _posterior_case(what, call, error, match):
    def build(_tmp):
        model = laplace_classifier()
        return [model], lambda: call(model.posterior)

    return BadInput(f"posterior: {what}", build, error, match)


def _nan_curvature(posterior):
    curvature = posterior.statistic * 1.0
    curvature.blocks["0"].G[0, 0, 0] = math.nan
    return curvature


POSTERIOR = [
    _posterior_case("update_statistic with a NaN curvature", lambda p: p.update_statistic(_nan_curvature(p), 0.5),
                    FloatingPointError, r"block\(s\) \['0'\] has NaN"),
    _posterior_case("set_mean of the wrong length", lambda p: p.set_mean(torch.zeros(3)), ValueError,
                    r"the mean must have shape \(75,\), got \(3,\)"),
    _posterior_case("load_state_dict of a diagonal posterior",
                    lambda p: p.load_state_dict(classifier().posterior.state_dict()), ValueError,
                    "is for a 'diag' posterior, this one is 'kron'"),
    _posterior_case("prior_precision = -1", lambda p: setattr(p, "prior_precision", -1.0), ValueError,
                    "prior_precision must be positive and finite"),
    _posterior_case("sample(n=0)", lambda p: p.sample(0), ValueError, "n must be a positive integer"),
]  # fmt: skip

OTHER = [
    BadInput("IVON: lr 1e4, stepped until the candidate is non-finite", _ivon_case, FloatingPointError,
             "non-finite update of the mean at step"),
    BadInput("distributed.init(timeout=0)", lambda tmp: ([], lambda: init(timeout=0)), ValueError,
             "timeout must be a positive number of seconds"),
    BadInput("ProcessGrid with 4 MC groups in a world of 6",
             lambda tmp: ([], lambda: ProcessGrid(world_size=6, mc_groups=4)), ValueError, "mc_groups must divide"),
    BadInput("CurvatureEngine: structure='dense'",
             lambda tmp: ([m := classifier().module], lambda: CurvatureEngine(m, "classification", "ggn", "dense")),
             ValueError, "structure must be one of"),
    BadInput("VIOptimizer: NoisyKFAC with temperature and a bad curvature",
             lambda tmp: ([m := classifier("kron")], lambda: NoisyKFAC(m, temperature=0.2, curvature="hessian",
                                                                           dataset_size=48)),
             ValueError, "curvature must be one of"),
    BadInput("VIOptimizer: init_precision=0", lambda tmp: ([m := classifier()], lambda: VIOptimizer(
        m, init_precision=0.0, dataset_size=48)), ValueError, "init_precision must be positive"),
    BadInput("DataLoader of dict items without a collate_fn",
             lambda tmp: ([m := classifier()], lambda: m.fit(DataLoader(_DictItems(), batch_size=8), progress=False)),
             ValueError, "got a dict with keys \\['x', 'y'\\]; give the DataLoader a collate_fn"),
]  # fmt: skip


class _DictItems(TensorDataset):
    def __init__(self) -> None:
        super().__init__(*_data(n=16))

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return {"x": x, "y": y}


CASES = FIT + CHECKPOINTS + PREDICT + LAPLACE + OPTIMIZERS + SAVE_LOAD + POSTERIOR + OTHER


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bad_input_raises_a_clear_error_and_changes_nothing(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    objects, call = case.build(tmp_path)
    before = snapshot(*objects)
    with pytest.raises(case.error, match=case.match):
        call()
    assert_unchanged(before, *objects)


def test_ivon_never_writes_a_non_finite_mean():
    (model, optimizer), before = _ivon_diverging()
    assert_unchanged(before, model, optimizer)
    assert torch.isfinite(model.posterior.mean()).all()


def main() -> None:
    """Print the table of cases: the error each gives and whether all state was left untouched."""
    import tempfile
    import warnings
    from pathlib import Path

    warnings.simplefilter("ignore")
    untouched = 0
    print("| # | bad input | outcome | all state untouched |\n|---:|---|---|---|")
    for number, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as folder:
            objects, call = case.build(Path(folder))
            before = snapshot(*objects)
            try:
                call()
                outcome = "no error"
            except BaseException as error:
                outcome = f"{type(error).__name__}: {str(error).splitlines()[0][:110]}"
            try:
                assert_unchanged(before, *objects)
                same = True
            except AssertionError:
                same = False
        untouched += same
        print(f"| {number} | {case.what} | {outcome.replace('|', '/')} | {'yes' if same else 'NO'} |")
    print(f"\n{untouched} of {len(CASES)} calls left all state untouched")


if __name__ == "__main__":
    main()
