"""The documentation in docs/: citations of it resolve, nothing cites the old design notes, the site builds cleanly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SKIPPED_DIRS = {".git", ".venv", "site", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "runs",
                "bayesso-demo", "suite-results"}  # fmt: skip
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".txt", ".cfg", ".ipynb", ".sh", ""}
CITATION = re.compile(r"docs/([\w/-]+\.md)(?:\s*(?:§|section\s+)(\d+))?")
OLD_NOTES = "ALGORITHMS" + ".md"  # split, so that this file does not cite them itself


def _text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2**21:
                yield path


def _citations() -> list[tuple[str, str, str | None]]:
    """(citing file, cited page, cited section or None) for every docs/<page>.md in code, tests and README."""
    sources = [ROOT / "README.md", *ROOT.glob("bayesso/**/*.py"), *ROOT.glob("tests/**/*.py"),
               *ROOT.glob("examples/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]  # fmt: skip
    found = []
    for path in sources:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(ROOT)), match.group(1), match.group(2)))
    return found


def test_nothing_cites_the_design_notes_outside_the_repository():
    citing = [str(p.relative_to(ROOT)) for p in _text_files() if OLD_NOTES in p.read_text(errors="ignore")]
    assert citing == [], f"these files cite {OLD_NOTES}, which is not in the repository; cite docs/ instead"


def test_every_cited_page_and_section_exists():
    citations = _citations()
    assert any(source.startswith("bayesso/") for source, _, _ in citations)  # the scan finds the docstrings' citations
    missing = []
    for source, page, section in citations:
        target = ROOT / "docs" / page
        if not target.is_file():
            missing.append(f"{source}: docs/{page} does not exist")
        elif section is not None and not re.search(rf"^#+ {section}\. ", target.read_text(), re.M):
            missing.append(f"{source}: docs/{page} has no section {section} (a heading '## {section}. ...')")
    assert missing == []


def test_citation_pattern_reads_both_forms():
    text = "see docs/vi.md §1 and docs/curvature.md section 3, or docs/metrics.md."
    assert CITATION.findall(text) == [("vi.md", "1"), ("curvature.md", "3"), ("metrics.md", "")]


@pytest.mark.slow
def test_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
               "--site-dir", str(tmp_path / "site")]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "api" / "model" / "index.html").is_file()
