"""Execute the notebooks of this folder from a clean kernel; fail on any error (what CI runs).

    python notebooks/execute.py                      # every notebook here, sorted; files untouched
    python notebooks/execute.py notebooks/01_quickstart.ipynb --write

Each notebook runs top to bottom in a fresh "python3" kernel with nbclient, in this folder, with a
per-cell timeout of 300 s. One line per notebook gives its wall time and the kernel's CPU time
(on a busy machine the wall time can be several times the CPU time). The exit status is 1 if any
cell raised (the notebook and the cell's error are named) or a notebook took longer than
``--max-seconds``. With ``--write`` each notebook that passed is saved with its outputs and the
top-level metadata ``"bayesso": {"cells_sha256": ...}`` (``cells_sha256``), from which
``tests/test_notebooks.py`` tells whether a code cell was edited after execution.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
KERNEL = "python3"
CELL_TIMEOUT = 300


def cells_sha256(notebook: Mapping) -> str:
    """SHA-256 (hex) of the code cells' sources in order, joined by "\\n\\x00\\n" (markdown cells do not count)."""
    sources = []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = cell["source"]
            sources.append(source if isinstance(source, str) else "".join(source))
    return hashlib.sha256("\n\x00\n".join(sources).encode("utf-8")).hexdigest()


def failing_cell(notebook: nbformat.NotebookNode) -> int | None:
    """Index of the first cell with an "error" output, or None."""
    for index, cell in enumerate(notebook.cells):
        if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            return index
    return None


def execute(path: Path, max_seconds: float, write: bool) -> str | None:
    """Run one notebook; return None if it passed, else why it failed. Saves it when ``write`` and it passed."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL,
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    start, cpu = time.perf_counter(), children_cpu_seconds()
    try:
        client.execute()
    except CellExecutionError as error:
        seconds = time.perf_counter() - start
        index = failing_cell(notebook)
        where = f"cell {index}" if index is not None else "a cell"
        return f"{seconds:.1f} s, {where} raised {error.ename}: {error.evalue}"
    seconds, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if seconds > max_seconds:
        return f"{seconds:.1f} s ({cpu:.1f} s CPU), longer than --max-seconds {max_seconds:g}"
    if write:
        notebook.metadata["bayesso"] = {"cells_sha256": cells_sha256(notebook)}
        nbformat.write(notebook, path)
    print(f"{path.name}: ok in {seconds:.1f} s ({cpu:.1f} s CPU)" + (", written" if write else ""), flush=True)
    return None


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes (the kernels); 0 where the OS does not say."""
    times = os.times()
    return times.children_user + times.children_system


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every *.ipynb here)")
    parser.add_argument("--write", action="store_true", help="store the outputs and the cells' hash in the files")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="fail a notebook that takes longer")
    args = parser.parse_args(argv)
    if not args.max_seconds > 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"{path} is not a notebook file (.ipynb)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    if not paths:
        print(f"no notebooks in {HERE}", file=sys.stderr)
        return 1
    failures = []
    for path in paths:
        reason = execute(path.resolve(), args.max_seconds, args.write)
        if reason is not None:
            print(f"{path.name}: FAILED after {reason}", flush=True)
            failures.append(path.name)
    if failures:
        print(f"{len(failures)} of {len(paths)} notebooks failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
