"""Small helpers over the frames the figures read: column checks and curve labels."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from entropy_lens.plots.runs import Run


def check_columns(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    """ValueError ``"<what> lacks column(s) a, b"`` unless every column of ``cols`` is in ``df``."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")


def add_labels(metrics: pd.DataFrame) -> pd.DataFrame:
    """Add the curve ``label``: the method name, plus ``λ_min=…`` when runs of that method differ
    in λ_min (so a sensitivity sweep is not averaged into one curve)."""
    out = metrics.copy()
    lam = out["lambda_min"] if "lambda_min" in out else pd.Series(np.nan, index=out.index)
    n_lam = lam.groupby(out["method"]).transform(lambda s: s.dropna().nunique())
    with_lam = (n_lam > 1) & lam.notna()
    out["label"] = out["method"].astype(str)
    if with_lam.any():
        lam_text = [f"{float(v):g}" for v in lam[with_lam]]  # one entry per run row with a λ_min label
        out.loc[with_lam, "label"] = (
            out.loc[with_lam, "method"].astype(str) + ", λ_min=" + pd.Series(lam_text, index=out.index[with_lam])
        )
    return out


def combined(runs: Iterable[Run], attr: str) -> pd.DataFrame | None:
    """The non-empty ``attr`` frames (``metrics`` or ``pass_at_k``) of all runs, stacked and
    labelled (:func:`add_labels`); None when no run has any."""
    frames = [getattr(r, attr) for r in runs if getattr(r, attr) is not None and len(getattr(r, attr))]
    return add_labels(pd.concat(frames, ignore_index=True)) if frames else None
