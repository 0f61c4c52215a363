"""Figure ``dh_vs_prob``.

Claim: The sign of a token's entropy change follows its quadrant: with A>0 a likely token (p >
e^{-H}) lowers entropy and a rare one raises it; with A<0 the reverse.

Usage: python analyses/fig_dh_vs_prob.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "The sign of a token's entropy change follows its quadrant: with A>0 a likely token (p > "
    "e^{-H}) lowers entropy and a rare one raises it; with A<0 the reverse."
)

if __name__ == "__main__":
    sys.exit(main("dh_vs_prob", CLAIM))
