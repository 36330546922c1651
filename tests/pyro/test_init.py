"""Without Pyro, bayesso imports and bayesso.pyro names the extra to install."""

import subprocess
import sys

CODE = """
import sys
sys.modules["pyro"] = None  # a None entry makes `import pyro` raise ImportError
import bayesso, bayesso.posteriors, bayesso.optim
print("bayesso imported")
try:
    import bayesso.pyro
except ImportError as error:
    print(error)
"""


def test_bayesso_imports_without_pyro_and_bayesso_pyro_names_the_extra():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "bayesso imported",
        "bayesso.pyro needs Pyro: pip install 'bayesso[pyro]' (or pip install pyro-ppl)",
    ]
