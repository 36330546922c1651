"""The calibration study behind ``bayesso demo`` on a tiny budget: structure, ranges, reproducibility."""

import pytest
import torch

from bayesso.data import load_digits
from bayesso.demo import METHODS, DemoConfig, MethodResult, compare_with_adam, run_demo, small_cnn, split_validation


@pytest.fixture(scope="module")
def study():
    return run_demo(DemoConfig(epochs=1, samples=2, seeds=2), progress=False)


def test_every_method_has_every_metric_for_every_seed(study):
    assert [(r.name, r.key) for r in study.methods] == METHODS
    for result in study.methods:
        assert len(result.runs) == 2
        for run in result.runs:
            assert {"accuracy", "nll", "ece", "brier", "auroc", "fpr_at_95_tpr", "seconds"} <= set(run)
            assert 0 <= run["accuracy"] <= 1 and 0 <= run["ece"] <= 1 and run["nll"] > 0 and run["seconds"] > 0
        assert result.probs.shape == (len(study.targets), 5) and result.ood_probs.shape[1] == 5
        assert result.std("nll") >= 0 and result.mean("nll") == pytest.approx(sum(r["nll"] for r in result.runs) / 2)


def test_temperature_scaling_reuses_the_adam_network(study):
    adam, scaled = study.methods[0], study.methods[1]
    assert adam.runs[0]["accuracy"] == scaled.runs[0]["accuracy"]  # same logits, rescaled
    assert all(note.startswith("T = ") for note in scaled.notes)
    assert scaled.runs[0]["seconds"] >= adam.runs[0]["seconds"]


def test_runs_are_reproducible(study):
    again = run_demo(DemoConfig(epochs=1, samples=2, seeds=1), progress=False)
    for first, second in zip(study.methods, again.methods):
        assert {k: v for k, v in first.runs[0].items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in second.runs[0].items() if k != "seconds"}
        )


def test_validation_split_partitions_the_training_set_and_the_cnn_has_the_documented_size():
    data = load_digits(test_fraction=0.5, in_classes=range(5), seed=0)
    kept, x_val, y_val = split_validation(data, 0.25, seed=0)
    assert len(kept.x_train) + len(x_val) == len(data.x_train) and len(x_val) == round(0.25 * len(data.x_train))
    together = torch.cat([kept.x_train, x_val]).flatten(1)
    for a, b in zip(
        torch.unique(together, dim=0, return_counts=True),
        torch.unique(data.x_train.flatten(1), dim=0, return_counts=True),
    ):
        assert torch.equal(a, b)  # a partition of the training images
    assert torch.equal(torch.cat([kept.y_train, y_val]).bincount(), data.y_train.bincount())
    assert sum(p.numel() for p in small_cnn().parameters()) == 6090
    assert small_cnn(5, width=8)(torch.zeros(2, 1, 8, 8)).shape == (2, 5)


def test_comparison_with_adam_names_every_metric_on_the_right_side():
    adam = MethodResult("Adam (MAP)", "adam", runs=[{"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "auroc": 0.8}])
    other = MethodResult("VOGN", "vogn", runs=[{"accuracy": 0.95, "nll": 0.4, "ece": 0.02, "auroc": 0.8}])
    (line,) = compare_with_adam([adam, other])
    assert line == (
        "VOGN: better than Adam in accuracy 0.95 vs 0.9, ECE 0.02 vs 0.05; "
        "not better in NLL 0.4 vs 0.3, OOD AUROC 0.8 vs 0.8."
    )


def test_a_tie_as_printed_is_not_better():
    adam = MethodResult("Adam (MAP)", "adam", runs=[{"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "auroc": 0.95101}])
    other = MethodResult("Laplace", "laplace", runs=[{"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "auroc": 0.95102}])
    assert compare_with_adam([adam, other]) == [
        "Laplace: better than Adam in nothing measured; not better in accuracy 0.9 vs 0.9, NLL 0.3 vs 0.3, "
        "ECE 0.05 vs 0.05, OOD AUROC 0.951 vs 0.951."
    ]
