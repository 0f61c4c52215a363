"""Figure ``quadrants``.

Claim: Entropy falls through Q1 (rewarded likely tokens) and Q3 and rises through Q2 and Q4; the
token shares show which dominate the batch.

Usage: python analyses/fig_quadrants.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Entropy falls through Q1 (rewarded likely tokens) and Q3 and rises through Q2 and Q4; the "
    "token shares show which dominate the batch."
)

if __name__ == "__main__":
    sys.exit(main("quadrants", CLAIM))
