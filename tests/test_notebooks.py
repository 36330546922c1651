"""The notebooks' stored outputs: produced by the current cells, in order, without errors, figures present.

Nothing is executed here except the runner's own small check; CI executes the notebooks with
``python notebooks/execute.py``, and ``notebooks/execute.py --write`` stores what is checked here.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = [
    "01_quickstart",
    "02_calibration_under_shift",
    "03_out_of_distribution",
    "04_laplace_and_marginal_likelihood",
    "05_second_order_optimization",
    "06_regression_uncertainty",
    "07_scaling_out",
]
MAX_BYTES = 1_500_000
# A code cell draws a figure when a line at the top level (not inside a function or loop body) creates one.
DRAWS = re.compile(
    r"^(?:\S.*)?\b(?:plt\.(?:subplots|figure|subplot_mosaic)|reliability_diagram|confidence_histogram|ood_histogram)\(",
    re.MULTILINE,
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _runner():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _runner()


def load(name: str) -> dict:
    path = NOTEBOOKS / f"{name}.ipynb"
    if not path.is_file():
        pytest.fail(f"notebooks/{name}.ipynb is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_the_folder_holds_exactly_the_expected_notebooks():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_code_cells_unchanged_since_execution(name):
    notebook = load(name)
    stored = notebook["metadata"].get("bayesso", {}).get("cells_sha256")
    rerun = f"re-run: python notebooks/execute.py --write notebooks/{name}.ipynb"
    assert stored == runner.cells_sha256(notebook), rerun


@pytest.mark.parametrize("name", NAMES)
def test_execution_counts_are_1_to_n_in_order(name):
    counts = [cell["execution_count"] for cell in code_cells(load(name))]
    assert counts == list(range(1, len(counts) + 1))


@pytest.mark.parametrize("name", NAMES)
def test_no_error_outputs(name):
    errors = [
        f"cell {index}: {output.get('ename')}: {output.get('evalue')}"
        for index, cell in enumerate(load(name)["cells"])
        for output in cell.get("outputs", [])
        if output["output_type"] == "error"
    ]
    assert errors == []


@pytest.mark.parametrize("name", NAMES)
def test_no_output_points_into_installed_or_library_code(name):
    """A stored warning attributed to a file under site-packages or bayesso/ is noise the library should not make
    (tqdm's "IProgress not found", a warning with a stacklevel short of the user's line)."""
    for cell in code_cells(load(name)):
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            text = text if isinstance(text, str) else "".join(text)
            assert "site-packages/" not in text and "/bayesso/" not in text, text[:300]


@pytest.mark.parametrize("name", NAMES)
def test_opens_with_a_title_and_closes_with_prose(name):
    cells = load(name)["cells"]
    assert cells[0]["cell_type"] == "markdown" and source(cells[0]).startswith("# ")
    assert len(source(cells[0]).strip().splitlines()) > 1, "the title cell should say what the notebook shows"
    assert cells[-1]["cell_type"] == "markdown"


@pytest.mark.parametrize("name", NAMES)
def test_cells_that_draw_show_their_figure(name):
    cells = code_cells(load(name))
    drawing = [index for index, cell in enumerate(cells) if DRAWS.search(source(cell))]
    assert drawing, "a notebook should draw at least one figure"
    for index in drawing:
        outputs = cells[index]["outputs"]
        images = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
        assert images, f"code cell {index} draws a figure but stored no image/png output"
        for image in images:
            payload = image if isinstance(image, str) else "".join(image)
            assert base64.b64decode(payload).startswith(PNG_SIGNATURE), f"code cell {index} stored an empty image"


@pytest.mark.parametrize("name", NAMES)
def test_stored_size_is_under_the_limit(name):
    load(name)
    assert (NOTEBOOKS / f"{name}.ipynb").stat().st_size < MAX_BYTES


@pytest.mark.parametrize("name", NAMES)
def test_readme_links_the_notebook(name):
    link = f"notebooks/{name}.ipynb"
    linked = link in (ROOT / "README.md").read_text(encoding="utf-8")
    assert linked, f"README.md does not link {link}"


def test_cells_sha256_covers_code_cells_only():
    code, markdown = {"cell_type": "code", "source": "x = 1"}, {"cell_type": "markdown", "source": "# t"}
    reference = runner.cells_sha256({"cells": [code, {"cell_type": "code", "source": ["y = ", "2"]}]})
    assert runner.cells_sha256({"cells": [markdown, code, {"cell_type": "code", "source": "y = 2"}]}) == reference
    assert runner.cells_sha256({"cells": [code, {"cell_type": "code", "source": "y = 3"}]}) != reference
    assert reference == hashlib.sha256(b"x = 1\n\x00\ny = 2").hexdigest()  # sources joined by "\n\x00\n"


def test_draw_rule_sees_top_level_figures_only():
    assert DRAWS.search("fig, axes = plt.subplots(1, 2)\n")
    assert DRAWS.search("reliability_diagram(probs, y, ax=ax)\n")
    assert not DRAWS.search("def show(ax):\n    fig = plt.figure()\n")
    assert not DRAWS.search("from bayesso.predict.plots import reliability_diagram\nplt.rcParams['figure.dpi'] = 80\n")


@pytest.mark.slow
def test_runner_reports_the_failing_cell_and_writes_the_hash(tmp_path, capsys):
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), good)
    nbformat.write(nbformat.v4.new_notebook(cells=[*cells, nbformat.v4.new_code_cell("1 / 0")]), bad)
    assert runner.main([str(good), str(bad), "--write"]) == 1
    out = capsys.readouterr().out
    assert "good.ipynb: ok in" in out
    assert "bad.ipynb: FAILED after" in out and "cell 2 raised ZeroDivisionError" in out
    written = json.loads(good.read_text())
    assert written["metadata"]["bayesso"]["cells_sha256"] == runner.cells_sha256(written)
    assert [cell.get("execution_count") for cell in written["cells"]] == [None, 1]
    assert "bayesso" not in json.loads(bad.read_text())["metadata"], "a failing notebook is not written"
    assert runner.main([str(good), "--max-seconds", "0.001"]) == 1
    assert "good.ipynb: FAILED after" in capsys.readouterr().out


def test_runner_refuses_bad_arguments(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a notebook")
    for argv, message in [
        ([str(tmp_path / "notes.txt")], "notes.txt is not a notebook file (.ipynb)"),
        ([str(tmp_path / "missing.ipynb")], "missing.ipynb is not a notebook file (.ipynb)"),
        (["--max-seconds", "0"], "--max-seconds must be positive, got 0.0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            runner.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
