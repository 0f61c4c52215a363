"""Token colours of the report: the selectable colour modes, their scales and their legends.

ΔH modes (measured, or one estimator's prediction, nats) use a diverging scale — red = entropy
increases, blue = decreases, full colour at ±s where s is the 99th percentile of |value| over all
tokens of the run; the entropy mode uses a sequential scale (white → purple, full at the 99th
percentile of H). Colours are computed here; the page's script only swaps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from entropy_lens.plots import ESTIMATOR_LABELS, predicted_columns

# RGB end points of the colour scales (ColorBrewer RdBu / Purples ends).
_POS = np.array([215.0, 48.0, 39.0])
_NEG = np.array([69.0, 117.0, 180.0])
_SEQ = np.array([117.0, 107.0, 177.0])
_STRENGTH = 0.85  # full colour is 85 % of the end colour over white, so black text stays readable


@dataclass(frozen=True)
class ColourMode:
    """One selectable token colouring: ``key`` (column), ``label``, ``values`` over the run's
    tokens (nats), ``diverging`` (ΔH) or sequential (entropy), and the full-colour scale ``s``."""

    key: str
    label: str
    values: np.ndarray
    diverging: bool
    scale: float


@dataclass(frozen=True)
class Legend:
    """The colour bar of one mode: CSS ``gradient``, the tick labels under it, the mode's label."""

    gradient: str
    ticks: tuple[str, ...]
    label: str


def colour_modes(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> list[ColourMode]:
    """Measured ΔH (if present), each estimator's predicted ΔH, and the token entropy."""
    cols: list[tuple[str, str, np.ndarray, bool]] = []
    if "dh_measured" in tokens.columns:
        cols.append(("dh_measured", "measured ΔH", tokens["dh_measured"].to_numpy(np.float64), True))
    for name, v in predicted_columns(tokens, lr, n_tokens).items():
        cols.append((name, f"predicted ΔH: {ESTIMATOR_LABELS[name]}", v, True))
    cols.append(("entropy", "token entropy H", tokens["entropy"].to_numpy(np.float64), False))
    return [ColourMode(key, label, v, div, full_colour_scale(v)) for key, label, v, div in cols]


def full_colour_scale(values: np.ndarray) -> float:
    """The 99th percentile of |value| over the finite values; 1.0 when that is 0 or there are none."""
    a = np.abs(values[np.isfinite(values)])
    s = float(np.quantile(a, 0.99)) if a.size else 0.0
    return s if s > 0 else 1.0


def token_colours(values: np.ndarray, scale: float, diverging: bool) -> np.ndarray:
    """Hex background colour per value (vectorised): diverging white→red (> 0) / white→blue (< 0),
    or sequential white→purple; saturates at ``|value| = scale``. NaN → white."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip(np.nan_to_num(v / scale, nan=0.0), -1.0, 1.0) * _STRENGTH
    if diverging:
        end = np.where((t >= 0)[:, None], _POS[None, :], _NEG[None, :])
    else:
        t = np.clip(t, 0.0, None)
        end = np.broadcast_to(_SEQ, (v.size, 3))
    rgb = np.rint(255.0 + (end - 255.0) * np.abs(t)[:, None]).astype(np.int64)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return np.char.add("#", np.char.zfill(np.char.mod("%x", packed), 6)) if v.size else np.array([], dtype=str)


def colour_table(modes: list[ColourMode]) -> np.ndarray:
    """Hex colours, one row per token and one column per mode."""
    return np.stack([token_colours(m.values, m.scale, m.diverging) for m in modes], axis=1)


def legend(mode: ColourMode) -> Legend:
    """The colour bar and tick labels of one mode (diverging: −s, 0, +s; sequential: 0, s)."""
    s = mode.scale
    if mode.diverging:
        lo, mid, hi = token_colours(np.array([-s, 0.0, s]), s, True)
        grad = f"linear-gradient(to right, {lo}, {mid}, {hi})"
        ticks = (f"−{s:.2g} nats (H falls)", "0", f"+{s:.2g} nats (H rises)")
    else:
        lo, hi = token_colours(np.array([0.0, s]), s, False)
        grad = f"linear-gradient(to right, {lo}, {hi})"
        ticks = ("0 nats", f"{s:.3g} nats")
    return Legend(grad, ticks, mode.label)
