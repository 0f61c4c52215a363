"""Method figures: ``compare`` outputs (predicted ΔH, token weights, STEER's mapping) and the
factor matrix of the method registry."""

from __future__ import annotations

import math
from typing import Iterable

import matplotlib.colors
import matplotlib.patches
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from entropy_lens.plots.frames import check_columns
from entropy_lens.plots.style import (
    ESTIMATOR_LABELS,
    QUADRANT_COLORS,
    QUADRANT_LABELS,
    axis_scale,
    method_colors,
    new_figure,
    thin,
)


def compare_dh_data(compare_summary: dict) -> pd.DataFrame:
    """``method, estimator, predicted_dh`` (batch sums, nats) from compare/summary.json."""
    rows = []
    for m, res in (compare_summary.get("methods") or {}).items():
        for e, v in (res.get("predicted_dh") or {}).items():
            rows.append(
                {
                    "method": m,
                    "estimator": e,
                    "predicted_dh": float(v) if v is not None else np.nan,
                    "touched_share": res.get("touched_share"),
                    "weight_mean": res.get("weight_mean"),
                }
            )
    if not rows:
        raise ValueError("compare summary has no methods")
    return pd.DataFrame(rows)


def compare_dh_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """One panel per estimator (own x scale): each method's predicted batch ΔH as a horizontal bar."""
    methods = list(dict.fromkeys(data["method"]))
    ests = list(dict.fromkeys(data["estimator"]))
    wide = data.pivot(index="method", columns="estimator", values="predicted_dh").reindex(methods)
    colors = method_colors(methods)
    fig = new_figure(3.6 * len(ests) + 1.2, 0.34 * len(methods) + 1.5)
    axes = fig.subplots(1, len(ests), squeeze=False, sharey=True).ravel()
    y = np.arange(len(methods))
    for ax, e in zip(axes, ests):  # one panel per estimator
        v = wide[e].to_numpy(np.float64)
        s = axis_scale(v)
        ax.barh(y, v * s[0], 0.7, color=[colors[m] for m in methods])
        ax.axvline(0, color="#777777", lw=0.7)
        ax.set_xlabel(f"predicted batch ΔH ({s[1]})")
        ax.set_title(ESTIMATOR_LABELS.get(e, e), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, methods)
    axes[0].invert_yaxis()
    fig.suptitle(title or "predicted entropy change of one update on the recorded batch, per method", fontsize=11)
    return fig


def weight_dist_data(compare: pd.DataFrame) -> pd.DataFrame:
    """Per method: weight quantiles (min, 5%, 25%, 50%, 75%, 95%, max), mean, share ≠ 1."""
    check_columns(compare, ("method", "weight"), "compare.parquet")
    g = compare.groupby("method", sort=False)["weight"]
    out = g.quantile([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]).unstack()
    out.columns = ["min", "q05", "q25", "median", "q75", "q95", "max"]
    out["mean"] = g.mean()
    out["share_not_1"] = compare.assign(n1=compare["weight"] != 1.0).groupby("method", sort=False)["n1"].mean()
    out["n_tokens"] = g.size()
    return out.reset_index()


def weight_dist_figure(data: pd.DataFrame, compare: pd.DataFrame | None = None, title: str = "") -> Figure:
    """Horizontal box per method (whiskers 5–95 %, dots min / max), plus up to 300 jittered tokens."""
    methods = list(data["method"])
    colors = method_colors(methods)
    fig = new_figure(9.0, 0.55 * len(methods) + 1.6)
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for i, row in data.iterrows():  # one row per method
        y = i
        c = colors[row["method"]]
        ax.plot([row["q05"], row["q95"]], [y, y], color=c, lw=1.2)
        ax.add_patch(
            matplotlib.patches.Rectangle((row["q25"], y - 0.25), row["q75"] - row["q25"], 0.5, fc=c, alpha=0.35, ec=c)
        )
        ax.plot([row["median"]] * 2, [y - 0.25, y + 0.25], color=c, lw=2)
        ax.plot([row["min"], row["max"]], [y, y], "o", color=c, ms=3)
        if compare is not None:
            w = compare.loc[compare["method"] == row["method"], "weight"].to_numpy()
            if w.size > 300:
                w = rng.choice(w, 300, replace=False)
            ax.scatter(w, y + rng.uniform(-0.2, 0.2, w.size), s=4, color=c, alpha=0.3, linewidths=0)
        ax.text(
            1.01, y, f"{100 * row['share_not_1']:.1f}% ≠ 1", transform=ax.get_yaxis_transform(), va="center", fontsize=8
        )
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("per-token loss weight λ (dimensionless)")
    ax.set_title(title or "token-weight distribution per method (box 25–75 %, line 5–95 %)", fontsize=10)
    return fig


def steer_weight_omega_data(compare: pd.DataFrame, tokens: pd.DataFrame, steer_params: dict | None) -> pd.DataFrame:
    """STEER's weight per token against its |ω| (the form STEER used): ``sample, pos, omega_abs,
    weight, quadrant``, plus the mapping curve rows (``sample = -1``)."""
    import torch

    from entropy_lens.methods import params_from_dict
    from entropy_lens.methods.steer import OMEGA_FLOOR, steer_omega

    check_columns(compare, ("method", "sample", "pos", "weight"), "compare.parquet")
    check_columns(tokens, ("sample", "pos", "logp", "old_logp", "entropy", "adv", "quadrant"), "tokens.parquet")
    st = compare[compare["method"] == "steer"]
    if st.empty:
        raise ValueError("compare.parquet has no steer rows")
    params = params_from_dict("steer", {k: v for k, v in (steer_params or {}).items()})
    t = tokens.merge(st[["sample", "pos", "weight"]], on=["sample", "pos"], how="inner")

    def col(c: str) -> torch.Tensor:
        return torch.as_tensor(t[c].to_numpy(np.float64, copy=True))

    lp, olp = col("logp"), col("old_logp")
    ratio = torch.exp(lp - olp)
    iclip = (
        torch.as_tensor(t["clip_active"].to_numpy(bool, copy=True))
        if "clip_active" in t
        else torch.ones_like(lp, dtype=torch.bool)
    )
    om = steer_omega(lp, olp, col("entropy"), col("adv"), ratio, iclip, params.omega, params.use_iclip).abs().numpy()
    pts = pd.DataFrame(
        {
            "sample": t["sample"],
            "pos": t["pos"],
            "omega_abs": om,
            "weight": t["weight"],
            "quadrant": t["quadrant"].astype(int),
            "kind": "token",
        }
    )
    # mapping curve over the batch scope (compare uses one batch: micro = mini = batch)
    M = float(om.max()) if om.size else 0.0
    grid = np.linspace(0.0, max(M, 1e-12), 200)
    lam_min = params.lambda_min
    if params.mapping == "exp":
        k = math.log(1.0 / lam_min) / max(M, OMEGA_FLOOR)
        curve = np.clip(np.exp(-k * grid), lam_min, 1.0)
    else:
        lam_max = params.resolved_lambda_max
        m = float(om.min()) if om.size else 0.0
        curve = (
            np.full_like(grid, 0.5 * (lam_min + lam_max))
            if M <= m
            else np.clip(lam_max - (grid - m) * (lam_max - lam_min) / (M - m), lam_min, lam_max)
        )
    cur = pd.DataFrame(
        {
            "sample": -1,
            "pos": -1,
            "omega_abs": grid,
            "weight": curve,
            "quadrant": -1,
            "kind": f"mapping {params.mapping}, lambda_min={lam_min:g}, omega={params.omega}",
        }
    )
    return pd.concat([pts, cur], ignore_index=True)


def steer_weight_omega_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Scatter of STEER weight λ vs |ω| (quadrant colours) with the mapping curve."""
    pts = thin(data[data["kind"] == "token"])
    cur = data[data["kind"] != "token"]
    fig = new_figure(7.5, 4.8)
    ax = fig.subplots()
    if not cur.empty:
        ax.plot(
            cur["omega_abs"],
            cur["weight"],
            color="#555555",
            lw=1.0,
            ls="--",
            zorder=1,
            label=str(cur["kind"].iloc[0]).replace("lambda_min", "λ_min").replace("omega", "ω"),
        )
    for q in sorted(pts["quadrant"].unique()):  # at most five quadrant groups
        d = pts[pts["quadrant"] == q]
        ax.scatter(
            d["omega_abs"],
            d["weight"],
            s=18,
            alpha=0.75,
            color=QUADRANT_COLORS.get(int(q), "k"),
            linewidths=0,
            zorder=2,
            label=QUADRANT_LABELS.get(int(q), f"Q{q}"),
        )
    ax.set_xlabel("|ω| (STEER score, dimensionless)")
    ax.set_ylabel("STEER token weight λ")
    ax.set_title(title or "STEER weight against |ω| (one batch scope)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", frameon=True, markerscale=2.0)
    return fig


def factor_matrix_data(methods: Iterable[str] | None = None) -> pd.DataFrame:
    """Methods × {clip, advantage, probability, entropy}: 1 where the method acts on the factor."""
    from entropy_lens.methods import FACTORS, get_method, list_methods

    names = list(methods) if methods is not None else list(list_methods())
    rows = []
    for n in names:  # one row per registered method
        spec = get_method(n)
        rows.append({"method": n, **{f: int(f in spec.factors) for f in FACTORS}})
    return pd.DataFrame(rows, columns=["method", *FACTORS])


def factor_matrix_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """A grid: filled cell where the method touches the factor (docs/science.md §2.9)."""
    factors = [c for c in data.columns if c != "method"]
    m = data[factors].to_numpy(float)
    fig = new_figure(6.2, 0.42 * len(data) + 1.6)
    ax = fig.subplots()
    ax.imshow(m, cmap=matplotlib.colors.ListedColormap(["#f4f4f4", "#0072B2"]), vmin=0, vmax=1, aspect="auto")
    for i in range(m.shape[0]):  # small grid of methods × factors
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, "●", ha="center", va="center", color="white", fontsize=10)
    ax.set_xticks(
        range(len(factors)),
        [
            {
                "clip": "clipping\nI_clip",
                "advantage": "advantage\nA",
                "probability": "probability\np(1−p), r",
                "entropy": "entropy\nlog p + H",
            }.get(f, f)
            for f in factors
        ],
        fontsize=9,
    )
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(data)), data["method"])
    ax.set_xticks(np.arange(-0.5, len(factors)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(data)), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title or "which factor of the entropy change each method acts on", fontsize=10, pad=8)
    return fig
