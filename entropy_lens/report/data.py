"""What the report shows, as plain values: formatted tables, token spans, headers, figures.

Every function here is pure and returns strings and numbers only — no markup. The page template
(``page.html.j2``) lays them out and autoescapes every one of them, so model text and values from
the run's files reach the page only as text.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from entropy_lens.estimators import QUADRANT_READING
from entropy_lens.plots import ESTIMATOR_LABELS, predicted_columns, quadrants_data
from entropy_lens.report.colours import ColourMode, colour_table

#: Caption of the quadrant table (docs/science.md §2.8).
QUADRANT_CAPTION = "quadrants (Q0: A = 0; Q1 A>0 likely; Q2 A>0 rare; Q3 A<0 rare; Q4 A<0 likely)"


@dataclass(frozen=True)
class Cell:
    """One table cell: its ``text`` and CSS class ``kind`` (``num``: right-aligned, or ``txt``)."""

    text: str
    kind: str


@dataclass(frozen=True)
class Table:
    """A captioned table of formatted cells."""

    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


@dataclass(frozen=True)
class TokenSpan:
    """One shown token: its ``text``, first-mode ``colour``, all modes' colours joined by commas
    (``colours``), its ``quadrant`` and the hover ``tooltip``."""

    text: str
    colour: str
    colours: str
    quadrant: str
    tooltip: str


@dataclass(frozen=True)
class Response:
    """One shown response: sample id, the header line, its shown tokens and how many were cut."""

    sample: int
    head: str
    tokens: tuple[TokenSpan, ...]
    more: int


@dataclass(frozen=True)
class FigureView:
    """One inline figure: ``name``, ``caption`` and the PNG bytes as base64 text (``png_base64``)."""

    name: str
    caption: str
    png_base64: str


def fmt(x: Any, spec: str = ".3g") -> str:
    """A cell value as text: ``–`` for None, ``nan`` for non-finite floats, ints and bools as is,
    other floats with ``spec``, anything else through ``str``."""
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "nan" if not math.isfinite(float(x)) else format(float(x), spec)
    return str(x)


def cell(value: Any, num: str = ".3g") -> Cell:
    """A formatted cell; numbers (not bools) are right-aligned."""
    is_num = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    return Cell(fmt(value, num), "num" if is_num else "txt")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "", num: str = ".3g") -> Table:
    """A :class:`Table` of formatted cells (numbers with the format spec ``num``)."""
    return Table(caption, tuple(header), tuple(tuple(cell(c, num) for c in row) for row in rows))


def sample_ids(tokens: pd.DataFrame, n: int, seed: int = 0) -> list[int]:
    """At most ``n`` response ids (a seeded random sample without replacement), sorted."""
    ids = np.unique(tokens["sample"].to_numpy())
    if len(ids) > n:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    return [int(i) for i in ids]


def tooltip(row: pd.Series, preds: dict[str, float], measured: float | None) -> str:
    """The hover text of one token: p, H, A, Ω / ω, measured and predicted ΔH, its quadrant."""
    q = int(row["quadrant"]) if "quadrant" in row and pd.notna(row["quadrant"]) else None
    lines = [
        f"p = {math.exp(row['logp']):.4g} (log p = {row['logp']:.3f})",
        f"H = {row['entropy']:.4g} nats",
        f"A = {row['adv']:+.4g}",
    ]
    if "omega_paper" in row and pd.notna(row["omega_paper"]):
        lines.append(f"Ω = {row['omega_paper']:+.3e} nats (paper form)")
    if "omega_code" in row and pd.notna(row["omega_code"]):
        lines.append(f"ω (code) = {row['omega_code']:+.3e}")
    if measured is not None:
        lines.append(f"ΔH measured = {measured:+.3e} nats")
    for k, v in preds.items():
        lines.append(f"ΔH {k} = {v:+.3e} nats")
    if q is not None:
        lines.append(f"quadrant Q{q}: " + (QUADRANT_READING.get(q) or "A = 0 (no update)"))
    return "\n".join(lines)


def response_head(frame: pd.DataFrame, rows: pd.Index, sid: int) -> str:
    """The header line of one response: sample, group, reward, A, length, mean H, Σ measured ΔH."""
    first = frame.loc[rows[0]]
    head = [f"sample {sid}"]
    if "group" in frame:
        head.append(f"group {int(first['group'])}")
    if "reward" in frame:
        head.append(f"reward {first['reward']:+g}")
    head.append(f"A = {first['adv']:+.3g}")
    head.append(f"{len(rows)} tokens")
    head.append(f"mean H = {frame.loc[rows, 'entropy'].mean():.3f} nats")
    if "dh_measured" in frame:
        head.append(f"Σ measured ΔH = {frame.loc[rows, 'dh_measured'].sum():+.2e} nats")
    return " · ".join(head)


def token_span(frame: pd.DataFrame, i: int, colours: np.ndarray, preds: dict[str, np.ndarray]) -> TokenSpan:
    """The span of the token in row ``i``: its text (``⟨id⟩`` when there is none), colours, tooltip."""
    row = frame.loc[i]
    has_text = "token" in frame and pd.notna(row["token"])
    text = str(row["token"]) if has_text else f"⟨{int(row['token_id'])}⟩"
    meas = float(row["dh_measured"]) if "dh_measured" in frame else None
    tip = tooltip(row, {k: float(v[i]) for k, v in preds.items()}, meas)
    c = colours[i]
    return TokenSpan(text, str(c[0]), ",".join(c), fmt(row.get("quadrant")), tip)


def responses(
    tokens: pd.DataFrame,
    modes: list[ColourMode],
    ids: list[int],
    max_tokens: int,
    lr: float | None,
    n_tokens: int | None,
) -> list[Response]:
    """The sampled responses ``ids`` (in order), each with at most ``max_tokens`` tokens by position."""
    colours = colour_table(modes)
    preds = predicted_columns(tokens, lr, n_tokens)
    frame = tokens.reset_index(drop=True)
    out = []
    for sid in ids:  # bounded by max_responses
        rows = frame.index[frame["sample"].to_numpy() == sid]
        rows = rows[np.argsort(frame.loc[rows, "pos"].to_numpy(), kind="stable")]
        shown = rows[:max_tokens]
        spans = tuple(token_span(frame, i, colours, preds) for i in shown)  # bounded by max_tokens
        out.append(Response(sid, response_head(frame, rows, sid), spans, len(rows) - len(shown)))
    return out


def run_table(tokens: pd.DataFrame, summary: dict | None, lr: float | None, n_tokens: int | None) -> Table:
    """The ``run`` table: sizes, model, settings, mean entropy, unclipped share (known rows only)."""
    s = summary or {}
    settings = s.get("settings") or {}
    eps = f"{settings['eps_low']} / {settings['eps_high']}" if "eps_low" in settings and "eps_high" in settings else None
    rows = [
        ("responses", s.get("n_sequences", int(tokens["sample"].nunique()))),
        ("tokens", n_tokens),
        ("groups", s.get("n_groups", int(tokens["group"].nunique()) if "group" in tokens else None)),
        ("model", s.get("model")),
        ("rollouts", s.get("rollouts")),
        ("learning rate η", lr),
        ("optimizer", settings.get("optimizer")),
        ("temperature", settings.get("temperature")),
        ("ε low / high", eps),
        ("mean token entropy (nats)", float(tokens["entropy"].mean())),
        (
            "unclipped share (I_clip = 1: gradient flows)",
            float(tokens["clip_active"].mean()) if "clip_active" in tokens else None,
        ),
        ("re-tokenised text", s.get("retokenized")),
    ]
    return table(("quantity", "value"), [r for r in rows if r[1] is not None], "run")


def estimator_table(
    tokens: pd.DataFrame, summary: dict | None, lr: float | None, n_tokens: int | None
) -> Table | None:
    """Estimator scores from the summary (or scored here against ``dh_measured``); None without."""
    from entropy_lens.scoring import score_estimator

    scores = (summary or {}).get("estimators")
    if not scores and "dh_measured" in tokens:
        meas = tokens["dh_measured"].to_numpy(np.float64)
        scores = {k: score_estimator(v, meas) for k, v in predicted_columns(tokens, lr, n_tokens).items()}
    if not scores:
        return None
    keys = ("pcc", "srcc", "mse", "sign_agreement", "total_pred", "total_measured")
    header = (
        "estimator",
        "PCC",
        "SRCC",
        "MSE (nats²)",
        "sign agreement",
        "Σ predicted (nats)",
        "Σ measured (nats)",
    )
    rows = [(k, *[v.get(key) for key in keys]) for k, v in scores.items()]
    return table(header, rows, "ΔH estimators vs the measured change")


def quadrant_table(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> Table:
    """Tokens, share and summed measured / predicted ΔH per quadrant."""
    q = quadrants_data(tokens, lr, n_tokens).pivot(index="quadrant", columns="quantity", values="value")
    cols = ["n_tokens", "token_share"] + [c for c in ["dh_measured", *ESTIMATOR_LABELS] if c in q.columns]
    rows = [(idx, int(r["n_tokens"]), *[r[c] for c in cols[1:]]) for idx, r in q[cols].iterrows()]
    return table(("quadrant", "tokens", "share", *[f"Σ {c} (nats)" for c in cols[2:]]), rows, QUADRANT_CAPTION)


def compare_table(compare_summary: dict) -> Table:
    """One row per method of a compare summary: factors, touched share, mean weight, Σ ΔH per estimator."""
    methods = compare_summary.get("methods") or {}
    ests = list(compare_summary.get("estimators") or [])
    rows = []
    for name, r in methods.items():
        pred = r.get("predicted_dh") or {}
        factors = ", ".join(r.get("factors") or []) or "–"
        rows.append((name, factors, r.get("touched_share"), r.get("weight_mean"), *[pred.get(e) for e in ests]))
    return table(
        ("method", "factors", "touched share", "mean weight", *[f"Σ {e} (nats)" for e in ests]),
        rows,
        f"methods compared offline on this batch (lr = {compare_summary.get('lr')})",
    )


def metrics_table(metrics: pd.DataFrame) -> Table:
    """The last logged step of every training run."""
    last = metrics.sort_values("step").groupby("run").tail(1)
    cols = [c for c in ("entropy_mean", "accuracy", "eval_accuracy", "weight_mean") if c in last]
    rows = [(r["run"], r["method"], r["setting"], int(r["step"]), *[r[c] for c in cols]) for _, r in last.iterrows()]
    return table(("run", "method", "setting", "last step", *cols), rows, "training runs (last logged step)")


def figure_views(figures: Sequence[tuple[str, str, bytes]]) -> list[FigureView]:
    """``(name, caption, png_bytes)`` → figures with the PNG as base64 text (only ``A–Z a–z 0–9 + / =``)."""
    return [FigureView(str(name), str(caption), base64.b64encode(png).decode("ascii")) for name, caption, png in figures]


def attribution_table(summary: dict) -> Table | None:
    """The attribution of ``dh_jvp`` from an ``attribute`` summary (docs/attribution.md): per split
    and part, share of Σ|ΔH|, Σ ΔH, its share of the total and PCC with the total; None without."""
    splits = (summary or {}).get("attribution") or {}
    rows = [
        (kind, part, r.get("share_abs"), r.get("sum"), r.get("share_total"), r.get("pcc_total"))
        for kind, res in splits.items()
        for part, r in (res.get("parts") or {}).items()
    ]
    if not rows:
        return None
    header = ("split", "part", "share of Σ|ΔH|", "Σ ΔH (nats)", "share of Σ ΔH", "PCC with dh_jvp")
    return table(header, rows, "where the first-order entropy change comes from (dh_jvp split exactly)")
