"""Paper-style figures of entropy dynamics (matplotlib, Agg; no I/O inside the figure builders).

Three layers, kept apart:

1. **Loading** (the only file reading here): :func:`load_run` reads one run folder —
   ``tokens.parquet`` + ``summary.json`` (``validate`` / ``analyze``), ``compare/compare.parquet`` +
   ``compare/summary.json`` (``compare``), ``metrics.jsonl`` + ``config.yaml`` (the trainer) — into a
   :class:`Run`. Anything missing is simply absent; malformed files raise ``ValueError`` with one
   line naming the file and the problem.
2. **Plotted numbers**: ``*_data`` functions turn frames into the tidy table a figure draws (this
   is the CSV written next to each PNG).
3. **Figure builders**: ``*_figure(data) -> matplotlib.figure.Figure``, pure functions of that
   table; every Figure is created on its own Agg canvas (no pyplot state, no window, the global
   backend is left alone). :func:`build_plots` runs 2+3 for every figure a set of runs allows and returns the
   :class:`Plot` objects plus a note for each figure it had to skip; :func:`save_plots` writes them.

Units: entropies and entropy changes are in nats; ``omega_code`` is turned into a ΔH prediction
with −η/L (:func:`entropy_lens.estimators.scaled_prediction`). Quadrants follow SCIENCE.md §2
(sign ΔH = sign(−A·(log p + H)); log p + H > 0 ⇔ p > e^{−H}).
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import matplotlib.colors
import matplotlib.patches
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

#: Figure names, in the order they are built (also the PNG / CSV file stems).
FIGURES = (
    "dh_scatter",
    "dh_vs_prob",
    "quadrants",
    "compare_dh",
    "weight_dist",
    "steer_weight_omega",
    "entropy_steps",
    "accuracy_steps",
    "weight_steps",
    "lambda_sensitivity",
    "acc_vs_entropy",
    "pass_at_k",
    "factor_matrix",
)

#: Files that make a folder a run (at least one must exist).
RUN_FILES = ("tokens.parquet", "compare/compare.parquet", "metrics.jsonl")

#: Columns the token figures need from tokens.parquet.
TOKEN_COLUMNS = ("sample", "pos", "logp", "entropy", "adv", "quadrant")

#: Colours for curves that are not a plain registered method (e.g. "steer, λ_min=0.7").
_EXTRA_COLORS = ("#000000", "#8c1c13", "#1b7837", "#542788", "#b35806", "#01665e", "#c51b7d", "#4d4d4d")
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# =============================================================================================
# Loading (I/O)
# =============================================================================================


@dataclass
class Run:
    """Everything one run folder holds; absent parts are None.

    ``metrics``: one row per (step) of metrics.jsonl, flattened (``q1_token_share`` …,
    ``pred_omega_paper`` …), with ``run, method, seed, setting, lambda_min`` columns.
    ``pass_at_k``: long frame ``run, method, seed, setting, step, k, pass_at_k``.
    """

    path: Path
    name: str
    tokens: pd.DataFrame | None = None
    summary: dict | None = None
    compare: pd.DataFrame | None = None
    compare_summary: dict | None = None
    metrics: pd.DataFrame | None = None
    pass_at_k: pd.DataFrame | None = None
    config: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def lr(self) -> float | None:
        s = (self.summary or {}).get("settings") or {}
        lr = s.get("lr", (self.summary or {}).get("lr"))
        return float(lr) if lr is not None else None

    @property
    def n_tokens(self) -> int | None:
        n = (self.summary or {}).get("n_tokens")
        if n is None and self.tokens is not None:
            n = len(self.tokens)
        return int(n) if n is not None else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read parquet ({msg})") from exc


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from exc
    return obj if isinstance(obj, dict) else {}


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a trainer ``metrics.jsonl`` (one JSON object per step).

    The file may be being written: an incomplete last line (no newline, or not valid JSON) is
    ignored. A malformed line elsewhere, a non-object or a record without an integer ``step``
    raises ValueError naming the file and line.
    """
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out: list[dict] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = i == len(lines)  # no trailing newline: possibly still being written
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if last:
                break
            raise ValueError(f"{path}: line {i}: malformed JSON ({type(exc).__name__})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")
        if not isinstance(obj.get("step"), int):
            raise ValueError(f"{path}: line {i}: missing integer 'step'")
        out.append(obj)
    return out


def _set_items(cfg: dict) -> dict[str, Any]:
    """The run's settings as dotted keys: the ``set`` overrides, then the resolved
    ``method_params`` of the trainer's config (``method_params.<name>``), which win."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = obj

    walk("", cfg.get("set") or {})
    mp = cfg.get("method_params")
    if isinstance(mp, dict):
        walk("method_params", mp)
    return out


def _leaf_value(items: dict[str, Any], leaf: str) -> Any:
    """The value of the last key whose final dotted part is ``leaf`` (method_params come last)."""
    found = None
    for key, v in items.items():
        if key.rsplit(".", 1)[-1] == leaf:
            found = v
    return found


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def setting_label(cfg: dict) -> str:
    """``normal`` or ``extreme`` (or an explicit label) of a run config (config.yaml's ``config``:
    ``method, seed, preset, set``, and for the trainer also ``method_params``).

    An explicit ``setting`` (top level or in ``set``) wins; otherwise a run is ``extreme`` when
    clipping is effectively off (SCIENCE.md §6: ε_low ≥ 0.99 or ε_high ≥ 1, read from a key ending
    in ``eps_low`` / ``eps_high``) or its preset name contains "extreme".
    """
    items = _set_items(cfg)
    explicit = cfg.get("setting", items.get("setting"))
    if isinstance(explicit, str) and explicit:
        return explicit
    lo, hi = _float(_leaf_value(items, "eps_low")), _float(_leaf_value(items, "eps_high"))
    if (lo is not None and lo >= 0.99) or (hi is not None and hi >= 1.0):
        return "extreme"
    if "extreme" in str(cfg.get("preset") or "").lower():
        return "extreme"
    return "normal"


def lambda_min_of(cfg: dict, method: str) -> float | None:
    """λ_min of a run: a key ending in ``lambda_min`` (``method_params`` or ``set``), else the
    registry default for ``steer``, else None."""
    v = _float(_leaf_value(_set_items(cfg), "lambda_min"))
    if v is not None:
        return v
    if method == "steer":
        from .methods import params_from_dict

        return float(params_from_dict("steer", {}).lambda_min)
    return None


def metrics_frames(records: list[dict], cfg: dict, run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flatten metrics records into ``(metrics, pass_at_k)`` frames (see :class:`Run`)."""
    flat = []
    pk = []
    for rec in records:  # one record per training step
        row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
        for q, d in (rec.get("quadrant") or {}).items():
            if isinstance(d, dict):
                for k, v in d.items():
                    row[f"{str(q).lower()}_{k}"] = v
        for k, v in (rec.get("dh_pred") or {}).items():
            row[f"pred_{k}"] = v
        flat.append(row)
        for k, v in (rec.get("pass_at_k") or {}).items():
            try:
                pk.append({"step": rec["step"], "k": int(k), "pass_at_k": float(v)})
            except (TypeError, ValueError):
                continue
    df = pd.DataFrame(flat)
    method = str(df["method"].iloc[0]) if "method" in df and len(df) else str(cfg.get("method") or run)
    seed = df["seed"].iloc[0] if "seed" in df and len(df) else cfg.get("seed", 0)
    ident = {
        "run": run,
        "method": method,
        "seed": seed,
        "setting": setting_label(cfg),
        "lambda_min": lambda_min_of(cfg, method),
    }
    for k, v in ident.items():
        df[k] = v
    pkdf = pd.DataFrame(pk, columns=["step", "k", "pass_at_k"])
    for k, v in ident.items():
        pkdf[k] = v
    for c in df.columns:
        if c not in ("run", "method", "setting"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df, pkdf


def load_run(path: str | Path) -> Run:
    """Read every known input of one run folder (a ``compare`` output folder also works).

    Raises ValueError (one line) if ``path`` is not a folder or holds none of :data:`RUN_FILES`.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder (give the run directory)")
    run = Run(path=path, name=path.resolve().name)
    cmp_dir = path / "compare"
    if (path / "compare.parquet").is_file() and not (path / "tokens.parquet").is_file():
        cmp_dir = path  # the compare output folder itself
    found = [p for p in ("tokens.parquet", "metrics.jsonl") if (path / p).is_file()]
    if (cmp_dir / "compare.parquet").is_file():
        found.append("compare.parquet")
    if not found:
        raise ValueError(f"{path}: no run files (expected one of {', '.join(RUN_FILES)})")

    if (path / "tokens.parquet").is_file():
        run.tokens = _read_parquet(path / "tokens.parquet")
        if (path / "summary.json").is_file():
            run.summary = _read_json(path / "summary.json")
        else:
            run.notes.append(f"{path / 'summary.json'} missing: lr unknown, omega_code not scaled")
    if (cmp_dir / "compare.parquet").is_file():
        run.compare = _read_parquet(cmp_dir / "compare.parquet")
        if (cmp_dir / "summary.json").is_file():
            run.compare_summary = _read_json(cmp_dir / "summary.json")
        if run.tokens is None:  # the compare summary names the tokens it was made from
            src = (run.compare_summary or {}).get("tokens")
            if src and Path(src).is_file():
                run.tokens = _read_parquet(Path(src))
                if (Path(src).parent / "summary.json").is_file():
                    run.summary = _read_json(Path(src).parent / "summary.json")
    if (path / "metrics.jsonl").is_file():
        cfg = {}
        if (path / "config.yaml").is_file():
            cfg = _read_yaml(path / "config.yaml").get("config") or {}
            if not isinstance(cfg, dict):
                raise ValueError(f"{path / 'config.yaml'}: 'config' is not a mapping")
        records = read_metrics(path / "metrics.jsonl")
        if records:
            run.config = cfg
            run.metrics, run.pass_at_k = metrics_frames(records, cfg, run.name)
        else:
            run.notes.append(f"{path / 'metrics.jsonl'} has no complete records yet")
    return run


# =============================================================================================
# Small helpers
# =============================================================================================


@dataclass(frozen=True)
class Plot:
    """One built figure: file stem ``name``, the Figure, the plotted numbers and a caption."""

    name: str
    figure: Figure
    data: pd.DataFrame
    caption: str


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """A fixed colour per method or curve label (registry order, so a method keeps its colour across
    figures). A label ``"method, …"`` takes its method's colour when it is the only label of that
    method (and the bare method is absent); other labels get extra colours."""
    from .methods import list_methods

    order = list(list_methods())
    names = list(methods)
    base = [m.split(",", 1)[0] for m in names]
    out = {}
    extra = 0
    for m, b in zip(names, base):
        if m in order:
            out[m] = _TAB10[order.index(m) % len(_TAB10)]
        elif b in order and base.count(b) == 1:
            out[m] = _TAB10[order.index(b) % len(_TAB10)]
        else:
            out[m] = _EXTRA_COLORS[extra % len(_EXTRA_COLORS)]
            extra += 1
    return out


def _scale(values: np.ndarray) -> tuple[float, str]:
    """A power of ten that brings ``values`` near 1, and the unit text, e.g. (1e4, '$10^{-4}$ nats')."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1.0, "nats"
    e = int(math.floor(math.log10(float(np.quantile(v, 0.99)))))
    if -2 <= e <= 2:
        return 1.0, "nats"
    return 10.0 ** (-e), f"$10^{{{e}}}$ nats"


def _new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot, no global backend switch, nothing shown)."""
    fig = Figure(figsize=(width, height), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(n, ncols))
    return int(math.ceil(n / ncols)), ncols


def fit_entropy_accuracy(entropy: np.ndarray, accuracy: np.ndarray) -> dict[str, float]:
    """Least-squares fit of R = −a·exp(H) + b (Cui et al., arXiv 2505.22617).

    Linear in the regressors (exp(H), 1), so the closed form is ordinary least squares:
    with x = exp(H), a = −Cov(x, R)/Var(x), b = mean R + a·mean x. ``r2`` = 1 − SS_res/SS_tot.
    Returns ``a, b, r2, n``; NaN when fewer than 3 points or x is constant.
    """
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(accuracy, dtype=np.float64)
    ok = np.isfinite(h) & np.isfinite(r)
    h, r = h[ok], r[ok]
    nan = {"a": float("nan"), "b": float("nan"), "r2": float("nan"), "n": int(h.size)}
    if h.size < 3:
        return nan
    x = np.exp(h)
    dx = x - x.mean()
    var = float((dx * dx).sum())
    if var <= 0:
        return nan
    slope = float((dx * (r - r.mean())).sum()) / var
    a = -slope
    b = float(r.mean()) + a * float(x.mean())
    res = r - (-a * x + b)
    ss_tot = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((res * res).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"a": a, "b": b, "r2": r2, "n": int(h.size)}


def _pcc_srcc(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    from .validate import score_estimator

    s = score_estimator(pred, meas)
    return s["pcc"], s["srcc"]


def _check_columns(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")


# =============================================================================================
# Token figures (tokens.parquet)
# =============================================================================================


def predicted_columns(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> dict[str, np.ndarray]:
    """Every estimator column present, as a per-token ΔH prediction in nats.

    ``omega_code`` is scaled by −η/L (``lr``, ``n_tokens``) and left out when ``lr`` is unknown.
    """
    import torch

    from . import estimators as est

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
    _check_columns(tokens, ("sample", "pos", "dh_measured"), "tokens.parquet")
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


#: Points drawn per scatter panel at most (a seeded random subset; statistics use every token).
MAX_POINTS = 20000


def _thin(d: pd.DataFrame, n: int = MAX_POINTS) -> pd.DataFrame:
    return d if len(d) <= n else d.sample(n, random_state=0)


def _limits(v: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    pad = 0.05 * (hi - lo) if hi > lo else (abs(hi) or 1.0) * 0.05
    return lo - pad, hi + pad


def dh_scatter_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """One panel per estimator: predicted vs measured ΔH per token, PCC / SRCC and the fitted scale.

    Each axis has its own power-of-ten unit (closed forms can be orders of magnitude below the
    measured change); the dashed identity line y = x is drawn where it crosses the panel.
    """
    names = list(dict.fromkeys(data["estimator"]))
    nrows, ncols = _grid(len(names), 3)
    fig = _new_figure(4.4 * ncols, 4.1 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):  # one panel per estimator
        d = data[data["estimator"] == name]
        x = d["predicted_dh"].to_numpy()
        y = d["measured_dh"].to_numpy()
        sx, sy = _scale(x), _scale(y)
        t = _thin(d)
        ax.scatter(t["predicted_dh"] * sx[0], t["measured_dh"] * sy[0], s=6, alpha=0.35, color="#0072B2", linewidths=0)
        (xlo, xhi), (ylo, yhi) = _limits(x), _limits(y)
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
    _check_columns(tokens, TOKEN_COLUMNS, "tokens.parquet")
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
    s = _scale(data["dh"].to_numpy())
    fig = _new_figure(14.0, 4.6)
    axes = fig.subplots(1, 3)
    pmin = max(float(data["p"].min()), 1e-12)
    shown = _thin(data)
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
    _check_columns(tokens, ("quadrant",), "tokens.parquet")
    q = tokens["quadrant"].to_numpy().astype(int)
    cols = {}
    if "dh_measured" in tokens.columns:
        cols["dh_measured"] = tokens["dh_measured"].to_numpy(np.float64)
    cols.update(predicted_columns(tokens, lr, n_tokens))
    frame = pd.DataFrame({"quadrant": q, **cols})
    g = frame.groupby("quadrant")
    out = pd.DataFrame({"n_tokens": g.size()})
    out["token_share"] = out["n_tokens"] / len(frame)
    for c in cols:
        out[c] = g[c].sum()
    out = out.reindex(range(5)).fillna(0.0)
    out.index.name = "quadrant"
    long = out.reset_index().melt(id_vars="quadrant", var_name="quantity", value_name="value")
    long["quadrant"] = "Q" + long["quadrant"].astype(int).astype(str)
    return long


def quadrants_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """Left: token share per quadrant (%). Right: summed ΔH per quadrant, measured and predicted."""
    wide = data.pivot(index="quadrant", columns="quantity", values="value")
    wide = wide.reindex([f"Q{i}" for i in range(5)])
    dh_cols = [c for c in ["dh_measured", *ESTIMATOR_LABELS] if c in wide.columns]
    fig = _new_figure(12.5, 4.4)
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
                x - 0.4 + width * (j + 0.5), frac, width, label=f"{label} (Σ={v.sum():+.2e} nats)", color=_TAB10[j % 10]
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


# =============================================================================================
# Compare figures (compare.parquet)
# =============================================================================================


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
    fig = _new_figure(3.6 * len(ests) + 1.2, 0.34 * len(methods) + 1.5)
    axes = fig.subplots(1, len(ests), squeeze=False, sharey=True).ravel()
    y = np.arange(len(methods))
    for ax, e in zip(axes, ests):  # one panel per estimator
        v = wide[e].to_numpy(np.float64)
        s = _scale(v)
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
    _check_columns(compare, ("method", "weight"), "compare.parquet")
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
    fig = _new_figure(9.0, 0.55 * len(methods) + 1.6)
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

    from .methods import params_from_dict
    from .methods.steer import OMEGA_FLOOR, steer_omega

    _check_columns(compare, ("method", "sample", "pos", "weight"), "compare.parquet")
    _check_columns(tokens, ("sample", "pos", "logp", "old_logp", "entropy", "adv", "quadrant"), "tokens.parquet")
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
    pts = _thin(data[data["kind"] == "token"])
    cur = data[data["kind"] != "token"]
    fig = _new_figure(7.5, 4.8)
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


# =============================================================================================
# Training-curve figures (metrics.jsonl of several runs)
# =============================================================================================


def _settings_order(values: Iterable[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda s: (s != "normal", s != "extreme", s))


def seed_band_data(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean ± spread over seeds of ``column`` per (setting, label, step): ``setting, label, step,
    quantity, mean, std, min, max, n_seeds`` (each run counts as one seed; std with ddof = 1, 0 for
    one seed; ``label`` from :func:`add_labels`)."""
    if "label" not in metrics:
        metrics = add_labels(metrics)
    _check_columns(metrics, ("setting", "label", "run", "step", column), "metrics")
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
    settings = _settings_order(data["setting"])
    colors = method_colors(sorted(set(data["label"])))
    fig = _new_figure(5.2 * len(settings) + 1.8, 4.0)
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
    settings = _settings_order(data["setting"])
    styles = ["-", "--", ":", "-."]
    fig = _new_figure(11.5, 7.0)
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


def _accuracy_column(metrics: pd.DataFrame) -> str:
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
    acc = _accuracy_column(st)
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
    fig = _new_figure(10.0, 4.0)
    ax0, ax1 = fig.subplots(1, 2)
    acc_name = "test accuracy" if data["accuracy_source"].iloc[0] == "eval_accuracy" else "training accuracy"
    for j, (s, d) in enumerate(data.groupby("setting")):  # one line per setting
        d = d.sort_values("lambda_min")
        c = _TAB10[j % 10]
        ax0.errorbar(
            d["lambda_min"],
            d["accuracy_mean"],
            yerr=d["accuracy_std"],
            marker="o",
            color=c,
            capsize=3,
            label=f"{s} setting",
        )
        ax1.errorbar(
            d["lambda_min"],
            d["entropy_mean"],
            yerr=d["entropy_std"],
            marker="o",
            color=c,
            capsize=3,
            label=f"{s} setting",
        )
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
    acc = _accuracy_column(metrics)
    _check_columns(metrics, ("entropy_mean",), "metrics")
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
    fig = _new_figure(9.5, 4.8)
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
    acc_name = "test accuracy" if data["accuracy_source"].iloc[0] == "eval_accuracy" else "training accuracy"
    ax.set_xlabel("mean token entropy H (nats)")
    ax.set_ylabel(acc_name)
    ax.set_title(title or "accuracy vs entropy over training, fit R = −a·exp(H) + b", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return fig


def pass_at_k_data(pass_at_k: pd.DataFrame) -> pd.DataFrame:
    """pass@k of each run's last evaluated step, mean ± std over seeds per (setting, label, k)."""
    _check_columns(pass_at_k, ("run", "setting", "method", "seed", "step", "k", "pass_at_k"), "pass@k")
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
    settings = _settings_order(data["setting"])
    fig = _new_figure(8.5, 4.6)
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


# =============================================================================================
# Factor matrix (registry)
# =============================================================================================


def factor_matrix_data(methods: Iterable[str] | None = None) -> pd.DataFrame:
    """Methods × {clip, advantage, probability, entropy}: 1 where the method acts on the factor."""
    from .methods import FACTORS, get_method, list_methods

    names = list(methods) if methods is not None else list(list_methods())
    rows = []
    for n in names:  # one row per registered method
        spec = get_method(n)
        rows.append({"method": n, **{f: int(f in spec.factors) for f in FACTORS}})
    return pd.DataFrame(rows, columns=["method", *FACTORS])


def factor_matrix_figure(data: pd.DataFrame, title: str = "") -> Figure:
    """A grid: filled cell where the method touches the factor (SCIENCE.md §2 four factors)."""
    factors = [c for c in data.columns if c != "method"]
    m = data[factors].to_numpy(float)
    fig = _new_figure(6.2, 0.42 * len(data) + 1.6)
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


# =============================================================================================
# Orchestration
# =============================================================================================


def _combined(runs: list[Run], attr: str) -> pd.DataFrame | None:
    frames = [getattr(r, attr) for r in runs if getattr(r, attr) is not None and len(getattr(r, attr))]
    return add_labels(pd.concat(frames, ignore_index=True)) if frames else None


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


def _names(runs: Iterable[Run], limit: int = 3) -> str:
    names = [str(r.path) for r in runs]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _per_run(runs: list[Run], name: str) -> Callable[[Run], str]:
    many = len(runs) > 1

    def stem(run: Run) -> str:
        return f"{name}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', run.name)}" if many else name

    return stem


def build_plots(runs: list[Run], only: Iterable[str] | None = None) -> tuple[list[Plot], list[str]]:
    """Every figure the runs allow: ``(plots, notes)``; a note says why each other figure was skipped.

    Token and compare figures are made per run (file stem ``name__run`` when several runs are
    given); training-curve figures combine the metrics of all runs (seeds grouped by method and
    setting); the factor matrix comes from the method registry.
    """
    asked = list(only) if only is not None else list(FIGURES)
    unknown = [w for w in asked if w not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    want = [f for f in FIGURES if f in asked]  # always in FIGURES order
    plots: list[Plot] = []
    notes: list[str] = []
    metrics = _combined(runs, "metrics")
    pass_k = _combined(runs, "pass_at_k")

    def attempt(name: str, stem: str, make: Callable[[], tuple[pd.DataFrame, Figure]], caption: str) -> None:
        try:
            data, fig = make()
        except ValueError as exc:
            notes.append(f"{stem}: skipped ({exc})")
            return
        plots.append(Plot(stem, fig, data, caption))

    for name in want:  # fixed figure list
        stem_of = _per_run(runs, name)
        if name in ("dh_scatter", "dh_vs_prob", "quadrants"):
            have = [r for r in runs if r.tokens is not None]
            if len(have) < len(runs):
                notes.append(
                    f"{name}: {'skipped' if not have else f'made for {len(have)} of {len(runs)} runs'}"
                    f" (no tokens.parquet in {_names(r for r in runs if r.tokens is None)})"
                )
            for r in have:  # per run
                label = f"{r.name}: {r.n_tokens} tokens" + (f", lr={r.lr:g}" if r.lr else "")
                if name == "dh_scatter":
                    if "dh_measured" not in r.tokens.columns:
                        notes.append(
                            f"{stem_of(r)}: skipped (tokens.parquet of {r.name} has no dh_measured; "
                            "run `entropy-lens validate` or analyze with --next-model)"
                        )
                        continue
                    attempt(
                        name,
                        stem_of(r),
                        lambda r=r, label=label: (
                            d := dh_scatter_data(r.tokens, r.lr, r.n_tokens),
                            dh_scatter_figure(d, f"predicted vs measured ΔH per token ({label})"),
                        ),
                        "Per-token predicted vs measured entropy change for each estimator; dashed: identity.",
                    )
                elif name == "dh_vs_prob":
                    attempt(
                        name,
                        stem_of(r),
                        lambda r=r, label=label: (
                            d := dh_vs_prob_data(r.tokens, r.lr, r.n_tokens),
                            dh_vs_prob_figure(d, f"entropy change vs token probability ({label})"),
                        ),
                        "ΔH against token probability, coloured by quadrant; the sign flips at p = exp(−H).",
                    )
                else:
                    attempt(
                        name,
                        stem_of(r),
                        lambda r=r, label=label: (
                            d := quadrants_data(r.tokens, r.lr, r.n_tokens),
                            quadrants_figure(d, f"quadrants ({label})"),
                        ),
                        "Token share of each quadrant and its signed share of the batch entropy change.",
                    )
        elif name in ("compare_dh", "weight_dist", "steer_weight_omega"):
            have = [r for r in runs if r.compare is not None]
            if len(have) < len(runs):
                notes.append(
                    f"{name}: {'skipped' if not have else f'made for {len(have)} of {len(runs)} runs'}"
                    f" (no compare/compare.parquet in {_names(r for r in runs if r.compare is None)})"
                )
            for r in have:  # per run
                if name == "compare_dh":
                    if not r.compare_summary:
                        notes.append(f"{stem_of(r)}: skipped (no compare/summary.json in {r.path})")
                        continue
                    attempt(
                        name,
                        stem_of(r),
                        lambda r=r: (d := compare_dh_data(r.compare_summary), compare_dh_figure(d)),
                        "Predicted batch entropy change of one update under each method (closed-form estimators).",
                    )
                elif name == "weight_dist":
                    attempt(
                        name,
                        stem_of(r),
                        lambda r=r: (d := weight_dist_data(r.compare), weight_dist_figure(d, r.compare)),
                        "Distribution of per-token loss weights each method assigns on the recorded batch.",
                    )
                else:
                    if r.tokens is None:
                        notes.append(f"{stem_of(r)}: skipped (needs tokens.parquet beside compare/ in {r.path})")
                        continue
                    sp = (((r.compare_summary or {}).get("methods") or {}).get("steer") or {}).get("params")
                    attempt(
                        name,
                        stem_of(r),
                        lambda r=r, sp=sp: (
                            d := steer_weight_omega_data(r.compare, r.tokens, sp),
                            steer_weight_omega_figure(d),
                        ),
                        "STEER's per-token weight against |ω|; dashed: the mapping.",
                    )
        elif name == "factor_matrix":
            attempt(
                name,
                name,
                lambda: (d := factor_matrix_data(), factor_matrix_figure(d)),
                "Methods × the four factors of the first-order entropy change.",
            )
        else:
            if name == "pass_at_k":
                if pass_k is None:
                    notes.append(f"{name}: skipped (no pass_at_k in any metrics.jsonl)")
                    continue
                attempt(
                    name,
                    name,
                    lambda: (d := pass_at_k_data(pass_k), pass_at_k_figure(d)),
                    "pass@k against k at the last evaluated step.",
                )
                continue
            if metrics is None:
                notes.append(f"{name}: skipped (no metrics.jsonl in the given runs)")
                continue
            if name == "entropy_steps":
                attempt(
                    name,
                    name,
                    lambda: (
                        d := seed_band_data(metrics, "entropy_mean"),
                        steps_figure(d, "mean token entropy (nats)", "entropy over training (mean ± std over seeds)"),
                    ),
                    "Mean token entropy against training step per method, normal and extreme settings.",
                )
            elif name == "accuracy_steps":

                def make_acc() -> tuple[pd.DataFrame, Figure]:
                    col = _accuracy_column(metrics)
                    d = seed_band_data(metrics, col)
                    lab = "test accuracy" if col == "eval_accuracy" else "training accuracy (rollouts)"
                    return d, steps_figure(d, lab, f"{lab} over training (mean ± std over seeds)")

                attempt(name, name, make_acc, "Accuracy against training step per method, normal and extreme settings.")
            elif name == "weight_steps":
                attempt(
                    name,
                    name,
                    lambda: (d := weight_steps_data(metrics), weight_steps_figure(d)),
                    "Token-weight statistics (mean, std, min, max) against training step.",
                )
            elif name == "lambda_sensitivity":
                attempt(
                    name,
                    name,
                    lambda: (d := lambda_sensitivity_data(metrics), lambda_sensitivity_figure(d)),
                    "STEER's final accuracy and entropy against λ_min.",
                )
            elif name == "acc_vs_entropy":
                attempt(
                    name,
                    name,
                    lambda: (d := acc_vs_entropy_data(metrics), acc_vs_entropy_figure(d)),
                    "Accuracy against entropy over training with the fit R = −a·exp(H) + b.",
                )
    return plots, notes


def figure_png(fig: Figure, dpi: int = 130) -> bytes:
    """PNG bytes of a figure (in memory)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_plots(plots: list[Plot], out: str | Path, dpi: int = 130) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.csv`` for every plot into ``out`` (each file atomically).

    Every PNG and CSV is rendered in memory first, so a failure writes nothing.
    """
    from .io.writers import atomic_write_bytes

    out = Path(out)
    blobs: dict[str, bytes] = {}
    for p in plots:  # one entry per figure
        blobs[f"{p.name}.png"] = figure_png(p.figure, dpi)
        blobs[f"{p.name}.csv"] = p.data.to_csv(index=False).encode()
    written = []
    for fname, data in blobs.items():
        atomic_write_bytes(out / fname, data)
        written.append(out / fname)
    return written


def save_run_figures(run: str | Path, out: str | Path, registry: bool = False, dpi: int = 130) -> list[str]:
    """Every figure one run folder supports, PNG + CSV into ``out``; their names in order.

    The factor matrix (from the method registry, not the run) is included only with ``registry``.
    """
    built, _ = build_plots([load_run(run)])
    if not registry:
        built = [p for p in built if p.name != "factor_matrix"]
    save_plots(built, out, dpi=dpi)
    return [p.name for p in built]
