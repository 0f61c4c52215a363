"""Data shipped with the package (see README.md in this folder for sources and licenses)."""

from pathlib import Path

DATA_DIR = Path(__file__).parent
#: Real rollouts of the bundled SmolLM2-135M-Instruct on GSM8K test problems (exact ids, old_logp).
DEMO_ROLLOUTS = DATA_DIR / "smollm2_gsm8k_rollouts.parquet"
#: GSM8K test problems used by `entropy-lens demo`.
DEMO_PROBLEMS = DATA_DIR / "gsm8k_demo.parquet"
