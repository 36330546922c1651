"""The README's quick start runs as written."""

import re
from pathlib import Path


def test_quick_start_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([1, 289, 289]) torch.Size([1, 10, 10])" in capsys.readouterr().out
