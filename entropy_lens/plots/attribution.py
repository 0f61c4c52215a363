"""Attribution figures (``entropy-lens attribute`` runs): where each token's first-order entropy
change comes from — per parameter group, and per source × receiver quadrant (docs/attribution.md).
Importing this module registers the figures."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from entropy_lens.plots.frames import check_columns
from entropy_lens.plots.registry import figure
from entropy_lens.plots.runs import Run
from entropy_lens.plots.style import axis_scale, new_figure

#: Colours of the stacked parts of a parameter-group bar (Okabe–Ito).
ROLE_COLORS = {"attn": "#0072B2", "mlp": "#E69F00", "norm": "#009E73", "other": "#999999", "embed": "#CC79A7",
               "final_norm": "#56B4E9", "lm_head": "#D55E00"}

_BLOCK = re.compile(r"block(\d+)\.(\w+)")


def layer_share_data(attribution: pd.DataFrame) -> pd.DataFrame:
    """``position, order, role, share`` per parameter group: share of Σ|ΔH| (eq. 10 of
    docs/attribution.md) of the ``layer`` split (per block) or, without it, the ``kind`` split."""
    check_columns(attribution, ("by", "part", "dh"), "attribution.parquet")
    kinds = set(attribution["by"])
    by = "layer" if "layer" in kinds else "kind" if "kind" in kinds else None
    if by is None:
        raise ValueError("attribution.parquet has no layer or kind split (run attribute --by layer)")
    sel = attribution[attribution["by"] == by]
    absum = sel.groupby("part", sort=False)["dh"].apply(lambda v: float(np.abs(v).sum()))
    total = float(absum.sum())
    rows = []
    for part, v in absum.items():  # a few dozen groups
        m = _BLOCK.fullmatch(str(part))
        if m:
            pos, order, role = f"{int(m.group(1))}", 1 + int(m.group(1)), m.group(2)
        elif part in ("attn", "mlp", "norm", "other"):
            pos, order, role = "blocks", 1, str(part)
        else:
            pos, order, role = str(part), {"embed": 0, "final_norm": 10_000, "lm_head": 10_001}.get(str(part), 10_002), str(part)
        rows.append({"position": pos, "order": order, "role": role, "share": v / total if total > 0 else np.nan})
    return pd.DataFrame(rows).sort_values(["order", "role"], kind="stable").reset_index(drop=True)


def layer_share_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Stacked bars: share of Σ|ΔH| per position (embed, each block, final norm, LM head), one
    colour per role (attn, MLP, norms)."""
    positions = list(dict.fromkeys(data["position"]))
    fig = new_figure(max(5.0, 0.28 * len(positions) + 2.0), 3.6)
    ax = fig.subplots()
    x = np.arange(len(positions))
    bottom = np.zeros(len(positions))
    for role in dict.fromkeys(data["role"]):  # a handful of roles
        v = data[data["role"] == role].set_index("position")["share"].reindex(positions).fillna(0.0).to_numpy()
        ax.bar(x, v, 0.8, bottom=bottom, color=ROLE_COLORS.get(role, "#666666"), label=role)
        bottom += v
    ax.set_xticks(x, positions, rotation=90 if len(positions) > 12 else 0, fontsize=8)
    ax.set_ylabel("share of Σ|ΔH| (first order)")
    ax.set_xlabel("parameter group (block index)")
    ax.legend(fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "where the first-order entropy change comes from: parameter groups", fontsize=10)
    return fig


def source_matrix_data(attribution: pd.DataFrame, tokens: pd.DataFrame) -> pd.DataFrame:
    """``by, source, receiver, dh`` (nats): Σ of each source part over the receivers of each quadrant
    (Q0–Q4, the receiving token's ``quadrant``), for the ``source`` and ``quadrant`` splits."""
    check_columns(attribution, ("sample", "pos", "by", "part", "dh"), "attribution.parquet")
    check_columns(tokens, ("sample", "pos", "quadrant"), "tokens.parquet")
    sel = attribution[attribution["by"].isin(["source", "quadrant"])]
    if sel.empty:
        raise ValueError("attribution.parquet has no source or quadrant split (run attribute --by source)")
    q = tokens[["sample", "pos", "quadrant"]]
    merged = sel.merge(q, on=["sample", "pos"], how="left", validate="many_to_one")
    merged["receiver"] = "Q" + merged["quadrant"].astype(int).astype(str)
    out = merged.groupby(["by", "part", "receiver"], sort=False)["dh"].sum().reset_index()
    return out.rename(columns={"part": "source"})


def source_matrix_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """One heat map per split: rows the source part, columns the receiver quadrant, cells Σ ΔH
    (signed, diverging colours, values written in the cells)."""
    kinds = list(dict.fromkeys(data["by"]))
    fig = new_figure(4.6 * len(kinds) + 0.8, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    receivers = [f"Q{i}" for i in range(5)]
    for ax, kind in zip(axes, kinds):  # at most two panels
        d = data[data["by"] == kind]
        wide = d.pivot(index="source", columns="receiver", values="dh").reindex(columns=receivers).fillna(0.0)
        wide = wide.reindex(list(dict.fromkeys(d["source"])))
        scale, unit = axis_scale(wide.to_numpy())
        v = wide.to_numpy() * scale
        lim = float(np.abs(v).max()) or 1.0
        im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), val in np.ndenumerate(v):
            ax.text(j, i, f"{val:.2g}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(receivers)), receivers)
        ax.set_yticks(range(len(wide.index)), list(wide.index))
        ax.set_xlabel("receiving token's quadrant")
        ax.set_ylabel("source" if kind == "source" else "source tokens' quadrant")
        fig.colorbar(im, ax=ax, label=f"Σ ΔH ({unit})")
    fig.suptitle(title or "first-order ΔH by source of the update × receiving quadrant", fontsize=10)
    return fig


def _label(r: Run) -> str:
    return f"{r.name}: {r.n_tokens} tokens" + (f", lr={r.lr:g}" if r.lr else "")


@figure(
    "attribution_layers",
    needs="attribution",
    caption="Share of Σ|ΔH| (first order, dh_jvp) per parameter group, stacked by attention / MLP / norms.",
    claim="Most of a token's first-order entropy change comes from the updates of the transformer blocks, "
    "not from the LM head alone, so a closed form over the head's own update captures only part of it.",
)
def _attribution_layers(r: Run) -> tuple[pd.DataFrame, Figure]:
    """Per parameter group share of Σ|ΔH| of one attribute run."""
    d = layer_share_data(r.attribution)
    return d, layer_share_figure(d, f"parameter groups ({_label(r)})")


@figure(
    "attribution_sources",
    needs=("attribution", "tokens"),
    caption="Σ first-order ΔH by source of the update (own sequence, its group, other groups; or source "
    "quadrant) × the receiving token's quadrant.",
    claim="STEER's premise: a token's own update decides its entropy change — the own-sequence row "
    "dominates each receiving quadrant.",
)
def _attribution_sources(r: Run) -> tuple[pd.DataFrame, Figure]:
    """Source × receiver quadrant matrix of one attribute run."""
    d = source_matrix_data(r.attribution, r.tokens)
    return d, source_matrix_figure(d, f"sources × receivers ({_label(r)})")
