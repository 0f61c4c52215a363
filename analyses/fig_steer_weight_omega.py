"""Figure ``steer_weight_omega``.

Claim: STEER's weight is a monotone decreasing function of |ω| (exp mapping): the token with the
largest |ω| in the scope gets exactly λ_min.

Usage: python analyses/fig_steer_weight_omega.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "STEER's weight is a monotone decreasing function of |ω| (exp mapping): the token with the "
    "largest |ω| in the scope gets exactly λ_min."
)

if __name__ == "__main__":
    sys.exit(main("steer_weight_omega", CLAIM))
