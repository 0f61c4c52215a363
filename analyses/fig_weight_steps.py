"""Figure ``weight_steps``.

Claim: STEER's token weights stay within [λ_min, 1] and their mean and spread evolve smoothly over
training.

Usage: python analyses/fig_weight_steps.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = "STEER's token weights stay within [λ_min, 1] and their mean and spread evolve smoothly over training."

if __name__ == "__main__":
    sys.exit(main("weight_steps", CLAIM))
