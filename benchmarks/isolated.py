"""One benchmark case per fresh subprocess, so that its peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def peak_rss_mib() -> float:
    """The process's maximum resident set so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, *arguments: str) -> dict:
    """Run ``script --worker *arguments`` in a new interpreter and return the JSON it prints."""
    command = [sys.executable, script, "--worker", *arguments]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
