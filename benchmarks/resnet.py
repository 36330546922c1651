"""ResNet-18 for 3 x 32 x 32 inputs: the classification example's (examples/classification/networks.py), reused here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "classification"))

from networks import resnet18

__all__ = ["resnet18"]
