"""Training-curve figures from the trainer's ``metrics.jsonl`` of several runs (seeds grouped by
method label and setting), and the entropy–accuracy fit of Cui et al."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from entropy_lens.plots.frames import add_labels, check_columns
from entropy_lens.plots.style import TAB10, accuracy_name, method_colors, new_figure
from entropy_lens.scoring import fit_entropy_accuracy


def settings_order(values: Iterable[str]) -> list[str]:
    """Distinct settings in panel order: ``normal``, ``extreme``, then the others sorted."""
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda s: (s != "normal", s != "extreme", s))


def seed_band_data(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean ± spread over seeds of ``column`` per (setting, label, step): ``setting, label, step,
    quantity, mean, std, min, max, n_seeds`` (each run counts as one seed; std with ddof = 1, 0 for
    one seed; ``label`` from :func:`add_labels`)."""
    if "label" not in metrics:
        metrics = add_labels(metrics)
    check_columns(metrics, ("setting", "label", "run", "step", column), "metrics")
    d = metrics[["setting", "label", "run", "step", column]].dropna(subset=[column])
    if d.empty:
        raise ValueError(f"metrics have no values of {column}")
    # several records for one (run, step) are averaged first; each run is one seed
    d = d.groupby(["setting", "label", "run", "step"], as_index=False)[column].mean()
    g = d.groupby(["setting", "label", "step"])[column]
    out = pd.DataFrame(
        {"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0), "min": g.min(), "max": g.max(), "n_seeds": g.size()}
    ).reset_index()
    out.insert(3, "quantity", column)
    return out


def steps_figure(data: pd.DataFrame, ylabel: str, title: str = "") -> Figure:
    """One panel per setting (normal, extreme, …): a line per method label, band = mean ± std over seeds."""
    settings = settings_order(data["setting"])
    colors = method_colors(sorted(set(data["label"])))
    fig = new_figure(5.2 * len(settings) + 1.8, 4.0)
    axes = fig.subplots(1, len(settings), squeeze=False, sharey=True).ravel()
    for ax, s in zip(axes, settings):  # one panel per setting
        ds = data[data["setting"] == s]
        for m in sorted(set(ds["label"])):  # one curve per method (label)
            d = ds[ds["label"] == m].sort_values("step")
            n = int(d["n_seeds"].max())
            ax.plot(d["step"], d["mean"], color=colors[m], lw=1.5, label=f"{m} ({n} seed{'s' if n > 1 else ''})")
            ax.fill_between(
                d["step"], d["mean"] - d["std"], d["mean"] + d["std"], color=colors[m], alpha=0.2, linewidth=0
            )
        ax.set_title(f"{s} setting", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles: dict[str, tuple] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab.split(" (")[0], (h, lab))
    fig.legend(
        [v[0] for v in handles.values()],
        [v[1] for v in handles.values()],
        loc="outside right upper",
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


WEIGHT_STATS = ("weight_mean", "weight_std", "weight_min", "weight_max")


def weight_steps_data(metrics: pd.DataFrame) -> pd.DataFrame:
    """Seed bands of the four token-weight statistics (long over ``quantity``)."""
    parts = [seed_band_data(metrics, c) for c in WEIGHT_STATS if c in metrics and metrics[c].notna().any()]
    if not parts:
        raise ValueError("metrics have no weight statistics")
    return pd.concat(parts, ignore_index=True)


def weight_steps_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """2×2 panels (mean, std, min, max of the per-token weight) vs step, a line per method/setting."""
    qs = [q for q in WEIGHT_STATS if q in set(data["quantity"])]
    colors = method_colors(sorted(set(data["label"])))
    settings = settings_order(data["setting"])
    styles = ["-", "--", ":", "-."]
    fig = new_figure(11.5, 7.0)
    axes = fig.subplots(2, 2, squeeze=False, sharex=True).ravel()
    for ax, q in zip(axes, qs):  # four statistics
        dq = data[data["quantity"] == q]
        for (s, m), d in dq.groupby(["setting", "label"]):  # one curve per (setting, method)
            d = d.sort_values("step")
            ls = styles[settings.index(s) % len(styles)]
            label = m if len(settings) == 1 else f"{m}, {s}"
            ax.plot(d["step"], d["mean"], color=colors[m], ls=ls, lw=1.4, label=label)
            ax.fill_between(
                d["step"], d["mean"] - d["std"], d["mean"] + d["std"], color=colors[m], alpha=0.15, linewidth=0
            )
        ax.set_title(q.replace("weight_", "token weight: "), fontsize=10)
        ax.set_ylabel("λ (dimensionless)")
        ax.grid(alpha=0.3)
    for ax in axes[len(qs) :]:
        ax.set_visible(False)
    for ax in axes[-2:]:
        ax.set_xlabel("training step")
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside right upper", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def accuracy_column(metrics: pd.DataFrame) -> str:
    """``eval_accuracy`` when any run logged it, else ``accuracy``; ValueError when neither."""
    if "eval_accuracy" in metrics and metrics["eval_accuracy"].notna().any():
        return "eval_accuracy"
    if "accuracy" in metrics and metrics["accuracy"].notna().any():
        return "accuracy"
    raise ValueError("metrics have neither eval_accuracy nor accuracy")


def lambda_sensitivity_data(metrics: pd.DataFrame, tail: float = 0.1) -> pd.DataFrame:
    """Final accuracy and entropy of STEER runs against λ_min: per (setting, λ_min) the mean ± std
    over seeds of each run's average over its last ``tail`` share of steps (≥ 1 step)."""
    st = (
        metrics[(metrics["method"] == "steer") & metrics["lambda_min"].notna()]
        if "lambda_min" in metrics
        else metrics[:0]
    )
    if st.empty or st["lambda_min"].nunique() < 2:
        raise ValueError("needs STEER runs with at least two values of lambda_min")
    acc = accuracy_column(st)
    rows = []
    for run, d in st.groupby("run"):  # one row per run
        steps = np.sort(d["step"].unique())
        cut = steps[-max(1, int(math.ceil(tail * len(steps))))]
        last = d[d["step"] >= cut]
        rows.append(
            {
                "run": run,
                "setting": d["setting"].iloc[0],
                "lambda_min": float(d["lambda_min"].iloc[0]),
                "seed": d["seed"].iloc[0],
                "accuracy": float(last[acc].mean()),
                "entropy": float(last["entropy_mean"].mean()) if "entropy_mean" in last else np.nan,
            }
        )
    per_run = pd.DataFrame(rows)
    g = per_run.groupby(["setting", "lambda_min"])
    out = pd.DataFrame(
        {
            "accuracy_mean": g["accuracy"].mean(),
            "accuracy_std": g["accuracy"].std(ddof=1).fillna(0.0),
            "entropy_mean": g["entropy"].mean(),
            "entropy_std": g["entropy"].std(ddof=1).fillna(0.0),
            "n_seeds": g.size(),
        }
    ).reset_index()
    out["accuracy_source"] = acc
    return out


def lambda_sensitivity_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Two panels: final accuracy and final entropy (nats) against λ_min, error bars = std over seeds."""
    fig = new_figure(10.0, 4.0)
    ax0, ax1 = fig.subplots(1, 2)
    acc_name = accuracy_name(str(data["accuracy_source"].iloc[0]))
    for j, (s, d) in enumerate(data.groupby("setting")):  # one line per setting
        d = d.sort_values("lambda_min")
        c = TAB10[j % 10]
        for ax, quantity in ((ax0, "accuracy"), (ax1, "entropy")):  # the two panels
            ax.errorbar(d["lambda_min"], d[f"{quantity}_mean"], yerr=d[f"{quantity}_std"], marker="o", color=c,
                        capsize=3, label=f"{s} setting")
    ax0.set_xlabel("λ_min")
    ax1.set_xlabel("λ_min")
    ax0.set_ylabel(f"final {acc_name}")
    ax1.set_ylabel("final mean token entropy (nats)")
    ax0.set_title("accuracy vs λ_min (STEER)", fontsize=10)
    ax1.set_title("entropy vs λ_min (STEER)", fontsize=10)
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def acc_vs_entropy_data(metrics: pd.DataFrame) -> pd.DataFrame:
    """Points (entropy, accuracy) over training per method label, plus the per-label fit of
    R = −a·exp(H) + b (columns ``a, b, r2`` repeated on the label's rows; seeds pooled; the setting
    joins the label when runs of several settings are given)."""
    acc = accuracy_column(metrics)
    check_columns(metrics, ("entropy_mean",), "metrics")
    if "label" not in metrics:
        metrics = add_labels(metrics)
    d = metrics[["setting", "label", "method", "run", "step", "entropy_mean", acc]].dropna()
    if d.empty:
        raise ValueError(f"metrics have no rows with both entropy_mean and {acc}")
    d = d.rename(columns={acc: "accuracy", "entropy_mean": "entropy"})
    if d["setting"].nunique() > 1:  # normal and extreme runs are fitted apart
        d["label"] = d["label"] + ", " + d["setting"]
    fits = {m: fit_entropy_accuracy(g["entropy"].to_numpy(), g["accuracy"].to_numpy()) for m, g in d.groupby("label")}
    for k in ("a", "b", "r2"):
        d[k] = d["label"].map(lambda m, k=k: fits[m][k])
    d["accuracy_source"] = acc
    return d.reset_index(drop=True)


def acc_vs_entropy_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Accuracy against mean entropy over training, a colour per method, dashed fit R = −a·e^H + b."""
    colors = method_colors(sorted(set(data["label"])))
    fig = new_figure(9.5, 4.8)
    ax = fig.subplots()
    for m, d in data.groupby("label"):  # one series per method
        c = colors[m]
        a, b, r2 = float(d["a"].iloc[0]), float(d["b"].iloc[0]), float(d["r2"].iloc[0])
        ax.scatter(d["entropy"], d["accuracy"], s=12, color=c, alpha=0.6, linewidths=0)
        if np.isfinite(a):
            h = np.linspace(d["entropy"].min(), d["entropy"].max(), 100)
            ax.plot(h, -a * np.exp(h) + b, color=c, lw=1.5, ls="--", label=f"{m}: a={a:.3g}, b={b:.3g}, R²={r2:.2f}")
        else:
            ax.plot([], [], color=c, label=f"{m}: too few points to fit")
    acc_name = accuracy_name(str(data["accuracy_source"].iloc[0]))
    ax.set_xlabel("mean token entropy H (nats)")
    ax.set_ylabel(acc_name)
    ax.set_title(title or "accuracy vs entropy over training, fit R = −a·exp(H) + b", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return fig


def pass_at_k_data(pass_at_k: pd.DataFrame) -> pd.DataFrame:
    """pass@k of each run's last evaluated step, mean ± std over seeds per (setting, label, k)."""
    check_columns(pass_at_k, ("run", "setting", "method", "seed", "step", "k", "pass_at_k"), "pass@k")
    if pass_at_k.empty:
        raise ValueError("metrics have no pass_at_k")
    if "label" not in pass_at_k:
        pass_at_k = add_labels(pass_at_k)
    last = pass_at_k.groupby("run")["step"].transform("max")
    d = pass_at_k[pass_at_k["step"] == last]
    g = d.groupby(["setting", "label", "k"])["pass_at_k"]
    return pd.DataFrame(
        {
            "mean": g.mean(),
            "std": g.std(ddof=1).fillna(0.0),
            "n_seeds": g.size(),
            "step": d.groupby(["setting", "label", "k"])["step"].max(),
        }
    ).reset_index()


def pass_at_k_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """pass@k against k (log₂ axis), a line per method (and setting), error bars over seeds."""
    colors = method_colors(sorted(set(data["label"])))
    settings = settings_order(data["setting"])
    fig = new_figure(8.5, 4.6)
    ax = fig.subplots()
    for (s, m), d in data.groupby(["setting", "label"]):  # one line per (setting, method)
        d = d.sort_values("k")
        ls = ["-", "--", ":", "-."][settings.index(s) % 4]
        ax.errorbar(
            d["k"],
            d["mean"],
            yerr=d["std"],
            color=colors[m],
            ls=ls,
            marker="o",
            ms=4,
            capsize=3,
            label=m if len(settings) == 1 else f"{m}, {s}",
        )
    ks = sorted(set(data["k"]))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (samples per problem, log₂ scale)")
    ax.set_ylabel("pass@k")
    ax.set_title(title or "pass@k at the last evaluated step (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return fig
