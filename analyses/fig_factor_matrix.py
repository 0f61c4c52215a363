"""Figure ``factor_matrix``.

Claim: Each entropy intervention acts on a subset of the four factors of the first-order entropy
change (clip, advantage, probability, entropy); only STEER acts on all four.

Usage: python analyses/fig_factor_matrix.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Each entropy intervention acts on a subset of the four factors of the first-order entropy "
    "change (clip, advantage, probability, entropy); only STEER acts on all four."
)

if __name__ == "__main__":
    sys.exit(main("factor_matrix", CLAIM))
