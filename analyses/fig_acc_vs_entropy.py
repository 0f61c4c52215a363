"""Figure ``acc_vs_entropy``.

Claim: Over training, accuracy follows R = −a·exp(H) + b (Cui et al.): lower entropy buys accuracy
at a diminishing rate.

Usage: python analyses/fig_acc_vs_entropy.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = (
    "Over training, accuracy follows R = −a·exp(H) + b (Cui et al.): lower entropy buys accuracy at a diminishing rate."
)

if __name__ == "__main__":
    sys.exit(main("acc_vs_entropy", CLAIM))
