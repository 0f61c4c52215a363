"""Token figures from ``tokens.parquet``: predicted vs measured ΔH, ΔH vs probability, quadrants.

Units: entropies and entropy changes are in nats; ``omega_code`` is turned into a ΔH prediction
with −η/L (:func:`entropy_lens.estimators.scaled_prediction`). Quadrants follow docs/science.md §2.8
(sign ΔH = sign(−A·(log p + H)); log p + H > 0 ⇔ p > e^{−H}).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from entropy_lens.plots.frames import check_columns
from entropy_lens.plots.style import (
    ESTIMATOR_LABELS,
    QUADRANT_COLORS,
    QUADRANT_LABELS,
    TAB10,
    axis_scale,
    grid_shape,
    new_figure,
    padded_limits,
    thin,
)
from entropy_lens.scoring import quadrant_table

#: Columns the token figures need from tokens.parquet.
TOKEN_COLUMNS = ("sample", "pos", "logp", "entropy", "adv", "quadrant")


def _pcc_srcc(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman correlation of a prediction with the measured ΔH."""
    from entropy_lens.scoring import score_estimator

    s = score_estimator(pred, meas)
    return s["pcc"], s["srcc"]


def predicted_columns(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> dict[str, np.ndarray]:
    """Every estimator column present, as a per-token ΔH prediction in nats.

    ``omega_code`` is scaled by −η/L (``lr``, ``n_tokens``) and left out when ``lr`` is unknown.
    """
    import torch

    from entropy_lens import estimators as est

    out = {}
    for name in ESTIMATOR_LABELS:
        if name not in tokens.columns:
            continue
        if name == "omega_code" and (lr is None or n_tokens is None):
            continue
        col = torch.from_numpy(tokens[name].to_numpy(np.float64, copy=True))
        out[name] = est.scaled_prediction(name, col, lr or 0.0, n_tokens or 1).numpy()
    return out


def dh_scatter_data(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> pd.DataFrame:
    """Long table ``estimator, sample, pos, predicted_dh, measured_dh, pcc, srcc, slope`` (ΔH in nats).

    ``slope``: least-squares k of measured ≈ k·predicted through the origin, k = Σxy/Σx² — how far
    the estimator's scale is from the measured one (1 = on the identity line).
    """
    check_columns(tokens, ("sample", "pos", "dh_measured"), "tokens.parquet")
    meas = tokens["dh_measured"].to_numpy(np.float64)
    preds = predicted_columns(tokens, lr, n_tokens)
    if not preds:
        raise ValueError("tokens.parquet has no estimator columns")
    parts = []
    for name, pred in preds.items():  # one block per estimator
        pcc, srcc = _pcc_srcc(pred, meas)
        xx = float((pred * pred).sum())
        parts.append(
            pd.DataFrame(
                {
                    "estimator": name,
                    "sample": tokens["sample"].to_numpy(),
                    "pos": tokens["pos"].to_numpy(),
                    "predicted_dh": pred,
                    "measured_dh": meas,
                    "pcc": pcc,
                    "srcc": srcc,
                    "slope": float((pred * meas).sum()) / xx if xx > 0 else np.nan,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def dh_scatter_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """One panel per estimator: predicted vs measured ΔH per token, PCC / SRCC and the fitted scale.

    Each axis has its own power-of-ten unit (closed forms can be orders of magnitude below the
    measured change); the dashed identity line y = x is drawn where it crosses the panel.
    """
    names = list(dict.fromkeys(data["estimator"]))
    nrows, ncols = grid_shape(len(names), 3)
    fig = new_figure(4.4 * ncols, 4.1 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):  # one panel per estimator
        d = data[data["estimator"] == name]
        x = d["predicted_dh"].to_numpy()
        y = d["measured_dh"].to_numpy()
        sx, sy = axis_scale(x), axis_scale(y)
        t = thin(d)
        ax.scatter(t["predicted_dh"] * sx[0], t["measured_dh"] * sy[0], s=6, alpha=0.35, color="#0072B2", linewidths=0)
        (xlo, xhi), (ylo, yhi) = padded_limits(x), padded_limits(y)
        ax.set_xlim(xlo * sx[0], xhi * sx[0])
        ax.set_ylim(ylo * sy[0], yhi * sy[0])
        lo, hi = max(xlo, ylo), min(xhi, yhi)  # identity inside both ranges (raw nats)
        if hi > lo:
            flat = abs(math.log10(sx[0] / sy[0])) >= 2
            ax.plot(
                [lo * sx[0], hi * sx[0]],
                [lo * sy[0], hi * sy[0]],
                color="#444444",
                lw=1,
                ls="--",
                label="identity y = x" + (" (flat: units differ)" if flat else ""),
            )
        ax.axhline(0, color="#bbbbbb", lw=0.6, zorder=0)
        ax.axvline(0, color="#bbbbbb", lw=0.6, zorder=0)
        pcc, srcc, k = float(d["pcc"].iloc[0]), float(d["srcc"].iloc[0]), float(d["slope"].iloc[0])
        ax.text(
            0.03,
            0.97,
            f"PCC = {pcc:.3f}\nSRCC = {srcc:.3f}\nmeasured ≈ {k:.3g} × predicted\nn = {len(d)}",
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=8.5,
            bbox=dict(boxstyle="round", fc="white", ec="#cccccc", alpha=0.9),
        )
        ax.set_title(ESTIMATOR_LABELS.get(name, name), fontsize=10)
        ax.set_xlabel(f"predicted ΔH ({sx[1]})")
        ax.set_ylabel(f"measured ΔH ({sy[1]})")
        if hi > lo:
            ax.legend(loc="lower right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def dh_vs_prob_data(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> pd.DataFrame:
    """``sample, pos, p, entropy, p_over_boundary, dh, dh_source, quadrant``.

    ``dh``: the measured ΔH when present, else the paper-form prediction Ω (nats);
    ``p_over_boundary`` = p·e^{H} (> 1 ⇔ likely token, p > e^{−H}).
    """
    check_columns(tokens, TOKEN_COLUMNS, "tokens.parquet")
    if "dh_measured" in tokens.columns:
        dh, src = tokens["dh_measured"].to_numpy(np.float64), "dh_measured"
    else:
        preds = predicted_columns(tokens, lr, n_tokens)
        if not preds:
            raise ValueError("tokens.parquet has neither dh_measured nor an estimator column")
        src = "omega_paper" if "omega_paper" in preds else next(iter(preds))
        dh = preds[src]
    logp = tokens["logp"].to_numpy(np.float64)
    H = tokens["entropy"].to_numpy(np.float64)
    return pd.DataFrame(
        {
            "sample": tokens["sample"].to_numpy(),
            "pos": tokens["pos"].to_numpy(),
            "p": np.exp(logp),
            "entropy": H,
            "p_over_boundary": np.exp(logp + H),
            "dh": dh,
            "dh_source": src,
            "quadrant": tokens["quadrant"].to_numpy().astype(int),
        }
    )


def dh_vs_prob_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Three panels, quadrant colours: ΔH vs p; ΔH vs p/e^{−H} with the boundary at 1; H vs p with
    the boundary curve H = −log p (p = e^{−H})."""
    src = str(data["dh_source"].iloc[0])
    what = "measured ΔH" if src == "dh_measured" else f"predicted ΔH ({src})"
    s = axis_scale(data["dh"].to_numpy())
    fig = new_figure(14.0, 4.6)
    axes = fig.subplots(1, 3)
    pmin = max(float(data["p"].min()), 1e-12)
    shown = thin(data)
    for q in sorted(shown["quadrant"].unique()):  # at most five quadrant groups
        d = shown[shown["quadrant"] == q]
        kw = dict(
            s=7,
            alpha=0.45,
            color=QUADRANT_COLORS.get(int(q), "k"),
            linewidths=0,
            label=QUADRANT_LABELS.get(int(q), f"Q{q}"),
        )
        axes[0].scatter(d["p"], d["dh"] * s[0], **kw)
        axes[1].scatter(d["p_over_boundary"], d["dh"] * s[0], **kw)
        axes[2].scatter(d["p"], d["entropy"], **kw)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.axhline(0, color="#777777", lw=0.7)
        ax.set_ylabel(f"{what} ({s[1]})")
    axes[0].set_xlabel("token probability p (log scale)")
    axes[0].set_title("ΔH vs p", fontsize=10)
    axes[1].axvline(1.0, color="k", lw=1.2, ls="--", label="boundary $p = e^{-H}$")
    axes[1].set_xlabel("$p\\,/\\,e^{-H} = p\\,e^{H}$ (log scale)")
    axes[1].set_title("ΔH vs p relative to the boundary", fontsize=10)
    grid = np.logspace(math.log10(pmin), 0, 200)
    axes[2].plot(grid, -np.log(grid), color="k", lw=1.2, ls="--", label="boundary $p = e^{-H}$")
    axes[2].set_xscale("log")
    axes[2].set_ylim(0.0, 1.08 * max(float(data["entropy"].max()), 0.1))  # the curve is clipped to the data
    axes[2].set_xlabel("token probability p (log scale)")
    axes[2].set_ylabel("token entropy H (nats)")
    axes[2].set_title("quadrant map: likely tokens right of the curve", fontsize=10)
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False, markerscale=2.0
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def quadrants_data(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> pd.DataFrame:
    """Per quadrant (Q0..Q4): ``n_tokens, token_share`` and the summed ΔH (nats) of the measured
    change and of every estimator: long table ``quadrant, quantity, value``."""
    check_columns(tokens, ("quadrant",), "tokens.parquet")
    q = tokens["quadrant"].to_numpy().astype(int)
    cols = {}
    if "dh_measured" in tokens.columns:
        cols["dh_measured"] = tokens["dh_measured"].to_numpy(np.float64)
    cols.update(predicted_columns(tokens, lr, n_tokens))
    table = quadrant_table(q, cols)  # Q0..Q4: n_tokens, token_share, sums
    out = pd.DataFrame.from_dict(table, orient="index")
    out.index.name = "quadrant"
    long = out.reset_index().melt(id_vars="quadrant", var_name="quantity", value_name="value")
    return long


def quadrants_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Left: token share per quadrant (%). Right: summed ΔH per quadrant, measured and predicted."""
    wide = data.pivot(index="quadrant", columns="quantity", values="value")
    wide = wide.reindex([f"Q{i}" for i in range(5)])
    dh_cols = [c for c in ["dh_measured", *ESTIMATOR_LABELS] if c in wide.columns]
    fig = new_figure(12.5, 4.4)
    ax0, ax1 = fig.subplots(1, 2, width_ratios=[1, 2])
    x = np.arange(len(wide))
    ax0.bar(x, 100 * wide["token_share"], color=[QUADRANT_COLORS[i] for i in range(5)])
    for xi, v in zip(x, 100 * wide["token_share"]):
        ax0.text(xi, v, f"{v:.1f}%", ha="center", va="bottom", fontsize=8)
    ax0.set_xticks(x, wide.index)
    ax0.set_ylabel("share of response tokens (%)")
    ax0.set_title("token share", fontsize=10)
    ax0.margins(y=0.15)
    if dh_cols:
        # each column on its own scale would hide sizes; normalise by its total |ΔH| instead
        width = 0.8 / len(dh_cols)
        for j, c in enumerate(dh_cols):  # measured + each estimator
            v = wide[c].to_numpy(np.float64)
            tot = float(np.abs(v).sum())
            frac = v / tot if tot > 0 else v
            label = "measured" if c == "dh_measured" else ESTIMATOR_LABELS.get(c, c)
            ax1.bar(
                x - 0.4 + width * (j + 0.5), frac, width, label=f"{label} (Σ={v.sum():+.2e} nats)", color=TAB10[j % 10]
            )
        ax1.axhline(0, color="#777777", lw=0.7)
        ax1.set_xticks(x, wide.index)
        ax1.set_ylabel("ΔH of the quadrant / Σ|ΔH| over quadrants")
        ax1.set_title("ΔH contribution per quadrant (signed, normalised per series)", fontsize=10)
        ax1.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax1.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
