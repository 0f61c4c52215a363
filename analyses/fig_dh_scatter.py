"""Figure ``dh_scatter``.

Claim: Per token, the first-order closed forms (Ω paper/code, all-logit, covariance) predict the
measured one-step entropy change only weakly on a real model, while the parameter-space JVP along
the actual update reproduces it.

Usage: python analyses/fig_dh_scatter.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Per token, the first-order closed forms (Ω paper/code, all-logit, covariance) predict the "
    "measured one-step entropy change only weakly on a real model, while the parameter-space "
    "JVP along the actual update reproduces it."
)

if __name__ == "__main__":
    sys.exit(main("dh_scatter", CLAIM))
