"""Figure ``pass_at_k``.

Claim: Keeping entropy higher preserves exploration: pass@k at large k stays higher than with GRPO.

Usage: python analyses/fig_pass_at_k.py RUN [RUN ...] -o DIR   (see analyses/README.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

CLAIM = "Keeping entropy higher preserves exploration: pass@k at large k stays higher than with GRPO."

if __name__ == "__main__":
    sys.exit(main("pass_at_k", CLAIM))
