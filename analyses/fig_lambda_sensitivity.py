"""Figure ``lambda_sensitivity``.

Claim: STEER is not sensitive to λ_min in a broad range: final accuracy and entropy change little
between λ_min values.

Usage: python analyses/fig_lambda_sensitivity.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "STEER is not sensitive to λ_min in a broad range: final accuracy and entropy change little between λ_min values."
)

if __name__ == "__main__":
    sys.exit(main("lambda_sensitivity", CLAIM))
