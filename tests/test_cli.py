"""The bayesso command: help, argument errors, and the demo's table."""

import subprocess
import sys

import pytest

from bayesso.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--examples", "x"], ["fly"]])
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_prints_the_comparison_table():
    result = subprocess.run(
        [sys.executable, "-m", "bayesso.cli", "demo", "--quick", "--examples", "24"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 11  # header and one row per kind x structure
    ggn_full = next(line for line in lines if line.startswith("| ggn | full |"))
    assert ggn_full.split("|")[5].strip() == "0.000"  # the reference compared with itself
