"""Temporary alias during the layout change (removed before it lands)."""
from entropy_lens.scoring import score_estimator  # noqa: F401
