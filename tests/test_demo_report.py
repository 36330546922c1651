"""``write_report``: metrics.json, report.md and PNG figures."""

import builtins
import json

import pytest

from bayesso.demo import DemoConfig, run_demo
from bayesso.demo_report import write_report


@pytest.fixture(scope="module")
def study():
    return run_demo(DemoConfig(epochs=1, samples=2, seeds=2), progress=False)


def test_writes_json_markdown_and_figures(study, tmp_path):
    written = write_report(study, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["metrics.json", "report.md", "ood_scores.png"] + [f"reliability_{r.key}.png" for r in study.methods]
    )
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    vogn = record["methods"]["vogn"]
    assert vogn["mean"]["nll"] == pytest.approx(study.methods[2].mean("nll"))
    assert len(vogn["runs"]) == 2 and record["config"]["seeds"] == 2 and record["n_test"] == len(study.targets)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| noisy K-FAC |" in report and " ± " in report and "![ood scores](ood_scores.png)" in report
    assert "T = " in report


def test_without_matplotlib_the_figures_are_skipped_with_a_warning(study, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        written = write_report(study, tmp_path)
    assert sorted(p.name for p in written) == ["metrics.json", "report.md"]
    assert "Reliability diagrams" not in (tmp_path / "report.md").read_text()
