"""Figure ``weight_dist``.

Claim: Methods differ in how many tokens they reweight and how far: Fork-tokens and Clip-Cov zero a
subset, W-REINFORCE scales all positive samples, STEER down-weights smoothly within [λ_min, 1].

Usage: python analyses/fig_weight_dist.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Methods differ in how many tokens they reweight and how far: Fork-tokens and Clip-Cov zero "
    "a subset, W-REINFORCE scales all positive samples, STEER down-weights smoothly within "
    "[λ_min, 1]."
)

if __name__ == "__main__":
    sys.exit(main("weight_dist", CLAIM))
