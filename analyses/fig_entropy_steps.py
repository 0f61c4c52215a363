"""Figure ``entropy_steps``.

Claim: Under GRPO the token entropy collapses over training; entropy interventions slow the
collapse, in the normal and the extreme (clipping off) setting.

Usage: python analyses/fig_entropy_steps.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Under GRPO the token entropy collapses over training; entropy interventions slow the "
    "collapse, in the normal and the extreme (clipping off) setting."
)

if __name__ == "__main__":
    sys.exit(main("entropy_steps", CLAIM))
