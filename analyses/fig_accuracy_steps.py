"""Figure ``accuracy_steps``.

Claim: Slowing entropy collapse does not cost accuracy over training (normal and extreme setting).

Usage: python analyses/fig_accuracy_steps.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = "Slowing entropy collapse does not cost accuracy over training (normal and extreme setting)."

if __name__ == "__main__":
    sys.exit(main("accuracy_steps", CLAIM))
