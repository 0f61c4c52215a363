"""Figure ``compare_dh``.

Claim: Interventions change the predicted batch entropy change of one update in the direction of the
factor they act on (e.g. entropy-shaped advantage and W-REINFORCE differ most from GRPO).

Usage: python analyses/fig_compare_dh.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Interventions change the predicted batch entropy change of one update in the direction of "
    "the factor they act on (e.g. entropy-shaped advantage and W-REINFORCE differ most from "
    "GRPO)."
)

if __name__ == "__main__":
    sys.exit(main("compare_dh", CLAIM))
