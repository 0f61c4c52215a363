"""Colours, labels and the small drawing helpers every figure shares (no data, no I/O)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Estimator columns of tokens.parquet, in display order, with their panel titles.
ESTIMATOR_LABELS = {
    "omega_paper": "Ω, paper form (Thm 1)",
    "omega_code": "−(η/L)·ω, reference code",
    "dh_all_logit": "all-logit (tabular softmax)",
    "dh_cov": "covariance (Cui et al.)",
    "dh_jvp": "parameter-space JVP",
}

#: Quadrant colours (Okabe–Ito, colour-blind safe) and legend labels; 0 = tokens with A = 0.
QUADRANT_COLORS = {0: "#9a9a9a", 1: "#0072B2", 2: "#E69F00", 3: "#009E73", 4: "#D55E00"}
QUADRANT_LABELS = {
    0: "Q0: A = 0",
    1: "Q1: A>0, p > $e^{-H}$",
    2: "Q2: A>0, p < $e^{-H}$",
    3: "Q3: A<0, p < $e^{-H}$",
    4: "Q4: A<0, p > $e^{-H}$",
}

#: Colours for curves that are not a plain registered method (e.g. "steer, λ_min=0.7").
EXTRA_COLORS = ("#000000", "#8c1c13", "#1b7837", "#542788", "#b35806", "#01665e", "#c51b7d", "#4d4d4d")
#: matplotlib's tab10 cycle, then the dark shades of tab20b: one colour per registered method
#: (registry order), 20 distinct colours before any repeats.
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
METHOD_PALETTE = TAB10 + ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252", "#bd9e39",
                          "#ad494a", "#a55194")

#: Points drawn per scatter panel at most (a seeded random subset; statistics use every token).
MAX_POINTS = 20000


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """A fixed colour per method or curve label (registry order, so a method keeps its colour across
    figures). A label ``"method, …"`` takes its method's colour when it is the only label of that
    method (and the bare method is absent); other labels get extra colours."""
    from entropy_lens.methods import list_methods

    order = list(list_methods())
    names = list(methods)
    base = [m.split(",", 1)[0] for m in names]
    out = {}
    extra = 0
    for m, b in zip(names, base):
        if m in order:
            out[m] = METHOD_PALETTE[order.index(m) % len(METHOD_PALETTE)]
        elif b in order and base.count(b) == 1:
            out[m] = METHOD_PALETTE[order.index(b) % len(METHOD_PALETTE)]
        else:
            out[m] = EXTRA_COLORS[extra % len(EXTRA_COLORS)]
            extra += 1
    return out


def axis_scale(values: np.ndarray) -> tuple[float, str]:
    """A power of ten that brings ``values`` near 1, and the unit text, e.g. (1e4, '$10^{-4}$ nats')."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1.0, "nats"
    e = int(math.floor(math.log10(float(np.quantile(v, 0.99)))))
    if -2 <= e <= 2:
        return 1.0, "nats"
    return 10.0 ** (-e), f"$10^{{{e}}}$ nats"


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot, no global backend switch, nothing shown)."""
    fig = Figure(figsize=(width, height), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    return fig


def grid_shape(n: int, ncols: int) -> tuple[int, int]:
    """``(rows, cols)`` of a grid of ``n`` panels at most ``ncols`` wide."""
    ncols = max(1, min(n, ncols))
    return int(math.ceil(n / ncols)), ncols


def thin(d: pd.DataFrame, n: int = MAX_POINTS) -> pd.DataFrame:
    """At most ``n`` rows of ``d`` (a seeded random subset) for drawing."""
    return d if len(d) <= n else d.sample(n, random_state=0)


def padded_limits(v: np.ndarray) -> tuple[float, float]:
    """The range of ``v`` widened by 5 % on each side (a fixed pad for a constant)."""
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    pad = 0.05 * (hi - lo) if hi > lo else (abs(hi) or 1.0) * 0.05
    return lo - pad, hi + pad


def accuracy_name(source: str, rollouts: bool = False) -> str:
    """Axis text of an accuracy column: test accuracy for ``eval_accuracy``, else training accuracy."""
    if source == "eval_accuracy":
        return "test accuracy"
    return "training accuracy (rollouts)" if rollouts else "training accuracy"
