"""The bayesso command: help, argument errors, and the demo's table."""

import subprocess
import sys

import pytest
import torch

from bayesso.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "curvature" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["demo", "--epochs", "0"], ["demo", "--samples", "x"], ["demo", "--seeds", "-1"], ["curvature", "--examples", "x"],
     ["curvature", "--threads", "0"], ["fly"]],
)  # fmt: skip
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_demo_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--out", str(tmp_path / "taken")])
    assert exit_info.value.code == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_prints_the_table_and_writes_the_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bayesso.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 7  # header and one row per method
    assert [line.split("|")[1].strip() for line in lines[1:]] == [
        "Adam (MAP)", "Adam + temperature scaling", "VOGN", "noisy K-FAC", "IVON", "Bayes by Backprop (Pyro)",
        "Laplace (last layer)",
    ]  # fmt: skip
    verdicts = [line for line in result.stdout.splitlines() if "than Adam in" in line]
    assert len(verdicts) == 6 and all(line.endswith(".") for line in verdicts)  # one per method but Adam
    assert {p.name for p in (tmp_path / "demo").iterdir()} >= {"report.md", "metrics.json", "reliability_vogn.png"}


@pytest.mark.slow
def test_quick_curvature_comparison_prints_its_table():
    result = subprocess.run(
        [sys.executable, "-m", "bayesso.cli", "curvature", "--quick", "--examples", "24"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 9  # header and one row per kind x structure, the exact Hessian's left out by --quick
    assert "exact-Hessian rows are left out" in result.stdout
    ggn_full = next(line for line in lines if line.startswith("| ggn | full |"))
    assert ggn_full.split("|")[5].strip() == "0.000"  # the reference compared with itself


def test_the_command_runs_on_the_threads_asked_for_and_restores_torch_s(monkeypatch):
    seen = []
    monkeypatch.setattr("bayesso.cli._curvature", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["curvature", "--threads", "3"]) == 0 and main(["curvature"]) == 0
    assert seen == [3, 1] and torch.get_num_threads() == before
