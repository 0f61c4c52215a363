"""One self-contained HTML page per run: summary tables, figures, and tokens coloured by ΔH.

:func:`build_report` is a pure function from frames / dicts / PNG bytes to an HTML string (the
CLI ``entropy-lens report`` reads the run and writes the file). The page needs no network: figures
are inline ``data:image/png;base64`` images, the style and the one small script are inline, and a
Content-Security-Policy allows nothing else (no external loads; only the page's own script, by
its SHA-256 hash, may run — so even text that slipped through escaping could not execute).

Every piece of model text (token strings) and every value from the input files is HTML-escaped
(:func:`esc`); tokens carry their values in ``data-*`` attributes and a ``title`` tooltip, both
escaped with quotes. The page size is bounded: at most ``max_responses`` responses (a seeded random
sample) with at most ``max_tokens`` tokens each.

Token colours: ΔH modes (measured, or one estimator's prediction, nats) use a diverging scale —
red = entropy increases, blue = decreases, full colour at ±s where s is the 99th percentile of
|value| over all tokens of the run; the entropy mode uses a sequential scale (white → purple,
full at the 99th percentile of H). Colours are computed here; the script only swaps them.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .estimators import QUADRANT_READING
from .plots import ESTIMATOR_LABELS, predicted_columns

#: Default bounds on the page size.
MAX_RESPONSES = 12
MAX_TOKENS = 400

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# RGB end points of the colour scales (ColorBrewer RdBu / Purples ends).
_POS = np.array([215.0, 48.0, 39.0])
_NEG = np.array([69.0, 117.0, 180.0])
_SEQ = np.array([117.0, 107.0, 177.0])
_STRENGTH = 0.85  # full colour is 85 % of the end colour over white, so black text stays readable


def esc(value: Any) -> str:
    """HTML-escape any value for text *and* quoted attributes (& < > " ' escaped); C0 control
    characters other than tab / newline / CR become U+FFFD."""
    return html.escape(_CTRL.sub("\ufffd", str(value)), quote=True)


@dataclass(frozen=True)
class ColourMode:
    """One selectable token colouring: ``key`` (column), ``label``, ``values`` over the run's
    tokens (nats), ``diverging`` (ΔH) or sequential (entropy), and the full-colour scale ``s``."""

    key: str
    label: str
    values: np.ndarray
    diverging: bool
    scale: float


def colour_modes(tokens: pd.DataFrame, lr: float | None, n_tokens: int | None) -> list[ColourMode]:
    """Measured ΔH (if present), each estimator's predicted ΔH, and the token entropy."""
    cols: list[tuple[str, str, np.ndarray, bool]] = []
    if "dh_measured" in tokens.columns:
        cols.append(("dh_measured", "measured ΔH", tokens["dh_measured"].to_numpy(np.float64), True))
    for name, v in predicted_columns(tokens, lr, n_tokens).items():
        cols.append((name, f"predicted ΔH: {ESTIMATOR_LABELS[name]}", v, True))
    cols.append(("entropy", "token entropy H", tokens["entropy"].to_numpy(np.float64), False))
    out = []
    for key, label, v, div in cols:
        a = np.abs(v[np.isfinite(v)])
        s = float(np.quantile(a, 0.99)) if a.size else 0.0
        out.append(ColourMode(key, label, v, div, s if s > 0 else 1.0))
    return out


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


def sample_ids(tokens: pd.DataFrame, n: int, seed: int = 0) -> list[int]:
    """At most ``n`` response ids (a seeded random sample without replacement), sorted."""
    ids = np.unique(tokens["sample"].to_numpy())
    if len(ids) > n:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    return [int(i) for i in ids]


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "nan" if not math.isfinite(float(x)) else format(float(x), spec)
    return str(x)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "", num: str = ".3g") -> str:
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for row in rows:
        out.append(
            "<tr>"
            + "".join(
                f'<td class="{"num" if isinstance(c, (int, float, np.number)) and not isinstance(c, bool) else "txt"}">'
                f"{esc(_fmt(c, num))}</td>"
                for c in row
            )
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _tooltip(row: pd.Series, preds: dict[str, float], measured: float | None) -> str:
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


def _responses_html(
    tokens: pd.DataFrame,
    modes: list[ColourMode],
    ids: list[int],
    max_tokens: int,
    lr: float | None,
    n_tokens: int | None,
) -> tuple[str, int]:
    """HTML of the sampled responses and the number of token spans."""
    colours = np.stack([token_colours(m.values, m.scale, m.diverging) for m in modes], axis=1)
    preds = predicted_columns(tokens, lr, n_tokens)
    frame = tokens.reset_index(drop=True)
    parts = []
    n_spans = 0
    for sid in ids:  # bounded by max_responses
        rows = frame.index[frame["sample"].to_numpy() == sid]
        rows = rows[np.argsort(frame.loc[rows, "pos"].to_numpy(), kind="stable")]
        shown = rows[:max_tokens]
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
        spans = []
        for i in shown:  # bounded by max_tokens
            row = frame.loc[i]
            text = str(row["token"]) if "token" in frame and pd.notna(row["token"]) else f"⟨{int(row['token_id'])}⟩"
            meas = float(row["dh_measured"]) if "dh_measured" in frame else None
            tip = _tooltip(row, {k: float(v[i]) for k, v in preds.items()}, meas)
            c = colours[i]
            spans.append(
                f'<span class="t" style="background-color:{c[0]}" data-c="{",".join(c)}" '
                f'data-q="{esc(_fmt(row.get("quadrant")))}" title="{esc(tip)}">{esc(text)}</span>'
            )
        n_spans += len(spans)
        more = len(rows) - len(shown)
        tail = f'<span class="more">… {more} more tokens not shown</span>' if more > 0 else ""
        parts.append(
            f'<div class="resp" data-sample="{sid}"><div class="head">{esc(" · ".join(head))}</div>'
            f'<div class="text">{"".join(spans)}{tail}</div></div>'
        )
    return "".join(parts), n_spans


def _legend(i: int, m: ColourMode) -> str:
    if m.diverging:
        lo, mid, hi = token_colours(np.array([-m.scale, 0.0, m.scale]), m.scale, True)
        grad = f"linear-gradient(to right, {lo}, {mid}, {hi})"
        ticks = f"<span>−{m.scale:.2g} nats (H falls)</span><span>0</span><span>+{m.scale:.2g} nats (H rises)</span>"
    else:
        lo, hi = token_colours(np.array([0.0, m.scale]), m.scale, False)
        grad = f"linear-gradient(to right, {lo}, {hi})"
        ticks = f"<span>0 nats</span><span>{m.scale:.3g} nats</span>"
    hidden = "" if i == 0 else " hidden"
    return (
        f'<div class="legend" data-mode="{i}"{hidden}><div class="bar" style="background:{grad}"></div>'
        f'<div class="ticks">{ticks}</div><div class="note">{esc(m.label)}; full colour at the 99th '
        f"percentile of |value| over all tokens of the run</div></div>"
    )


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}caption{text-align:left;font-weight:600;padding:.2em 0}
th,td{border:1px solid #ddd;padding:.25em .55em}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.88em;color:#555}
.controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #eee;z-index:1}
.legend{margin:.4em 0;font-size:.85em}.legend .bar{height:12px;width:420px;border:1px solid #ccc}
.legend .ticks{display:flex;justify-content:space-between;width:420px;white-space:nowrap}.legend .note{color:#666}
.resp{border:1px solid #e3e3e3;border-radius:4px;margin:.8em 0}.resp .head{background:#f7f7f7;padding:.3em .6em;font-size:.85em;color:#444}
.resp .text{padding:.5em .6em;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;line-height:1.7;word-break:break-word}
span.t{border-radius:2px;cursor:help}span.t:hover{outline:1px solid #333}.more{color:#888;font-style:italic}
ul.notes{font-size:.9em;color:#555}
"""

_SCRIPT = """(function () {
  var body = document.body;
  window.addEventListener('error', function (e) { body.setAttribute('data-error', String(e.message)); });
  try {
    var sel = document.getElementById('mode');
    var spans = document.querySelectorAll('span.t');
    var legends = document.querySelectorAll('.legend');
    var apply = function (i) {
      for (var k = 0; k < spans.length; k++) {
        spans[k].style.backgroundColor = spans[k].getAttribute('data-c').split(',')[i];
      }
      for (var j = 0; j < legends.length; j++) {
        legends[j].hidden = legends[j].getAttribute('data-mode') !== String(i);
      }
      body.setAttribute('data-mode', String(i));
    };
    if (sel) {
      sel.addEventListener('change', function () { apply(parseInt(sel.value, 10)); });
      apply(parseInt(sel.value, 10));
    }
    body.setAttribute('data-ready', String(spans.length));
  } catch (e) {
    body.setAttribute('data-error', String(e));
  }
})();"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"


def _summary_html(tokens: pd.DataFrame, summary: dict | None, lr: float | None, n_tokens: int | None) -> str:
    from .plots import quadrants_data
    from .validate import score_estimator

    s = summary or {}
    settings = s.get("settings") or {}
    run_rows = [
        ("responses", s.get("n_sequences", int(tokens["sample"].nunique()))),
        ("tokens", n_tokens),
        ("groups", s.get("n_groups", int(tokens["group"].nunique()) if "group" in tokens else None)),
        ("model", s.get("model")),
        ("rollouts", s.get("rollouts")),
        ("learning rate η", lr),
        ("optimizer", settings.get("optimizer")),
        ("temperature", settings.get("temperature")),
        (
            "ε low / high",
            f"{settings['eps_low']} / {settings['eps_high']}"
            if "eps_low" in settings and "eps_high" in settings
            else None,
        ),
        ("mean token entropy (nats)", float(tokens["entropy"].mean())),
        ("unclipped share (I_clip = 1: gradient flows)", float(tokens["clip_active"].mean()) if "clip_active" in tokens else None),
        ("re-tokenised text", s.get("retokenized")),
    ]
    parts = [_table(("quantity", "value"), [r for r in run_rows if r[1] is not None], "run")]
    scores = s.get("estimators")
    if not scores and "dh_measured" in tokens:
        meas = tokens["dh_measured"].to_numpy(np.float64)
        scores = {k: score_estimator(v, meas) for k, v in predicted_columns(tokens, lr, n_tokens).items()}
    if scores:
        rows = [
            (
                k,
                v.get("pcc"),
                v.get("srcc"),
                v.get("mse"),
                v.get("sign_agreement"),
                v.get("total_pred"),
                v.get("total_measured"),
            )
            for k, v in scores.items()
        ]
        parts.append(
            _table(
                (
                    "estimator",
                    "PCC",
                    "SRCC",
                    "MSE (nats²)",
                    "sign agreement",
                    "Σ predicted (nats)",
                    "Σ measured (nats)",
                ),
                rows,
                "ΔH estimators vs the measured change",
            )
        )
    q = quadrants_data(tokens, lr, n_tokens).pivot(index="quadrant", columns="quantity", values="value")
    cols = ["n_tokens", "token_share"] + [c for c in ["dh_measured", *ESTIMATOR_LABELS] if c in q.columns]
    rows = [(idx, int(r["n_tokens"]), *[r[c] for c in cols[1:]]) for idx, r in q[cols].iterrows()]
    parts.append(
        _table(
            ("quadrant", "tokens", "share", *[f"Σ {c} (nats)" for c in cols[2:]]),
            rows,
            "quadrants (Q0: A = 0; Q1 A>0 likely; Q2 A>0 rare; Q3 A<0 rare; Q4 A<0 likely)",
        )
    )
    notes = s.get("notes") or []
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    return "".join(parts)


def _compare_html(compare_summary: dict) -> str:
    methods = compare_summary.get("methods") or {}
    ests = list(compare_summary.get("estimators") or [])
    rows = []
    for name, r in methods.items():
        pred = r.get("predicted_dh") or {}
        rows.append(
            (
                name,
                ", ".join(r.get("factors") or []) or "–",
                r.get("touched_share"),
                r.get("weight_mean"),
                *[pred.get(e) for e in ests],
            )
        )
    return _table(
        ("method", "factors", "touched share", "mean weight", *[f"Σ {e} (nats)" for e in ests]),
        rows,
        f"methods compared offline on this batch (lr = {compare_summary.get('lr')})",
    )


def _metrics_html(metrics: pd.DataFrame) -> str:
    last = metrics.sort_values("step").groupby("run").tail(1)
    cols = [c for c in ("entropy_mean", "accuracy", "eval_accuracy", "weight_mean") if c in last]
    rows = [(r["run"], r["method"], r["setting"], int(r["step"]), *[r[c] for c in cols]) for _, r in last.iterrows()]
    return _table(("run", "method", "setting", "last step", *cols), rows, "training runs (last logged step)")


def build_report(
    tokens: pd.DataFrame,
    summary: dict | None = None,
    compare_summary: dict | None = None,
    metrics: pd.DataFrame | None = None,
    figures: Sequence[tuple[str, str, bytes]] = (),
    *,
    title: str = "entropy-lens report",
    max_responses: int = MAX_RESPONSES,
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
    notes: Sequence[str] = (),
    skipped: Sequence[str] = (),
) -> str:
    """The report page as one HTML string.

    ``tokens``: a tokens.parquet frame (needs ``sample, pos, logp, entropy, adv``; ``token``,
    ``quadrant``, ``dh_measured`` and the estimator columns are used when present).
    ``summary``: its summary.json (η and L scale ``omega_code``). ``compare_summary``: a compare
    summary.json. ``metrics``: flattened trainer metrics (:class:`entropy_lens.plots.Run`).
    ``figures``: ``(name, caption, png_bytes)``; ``notes``: lines shown at the top; ``skipped``: why
    other figures were not made (a collapsed list under the figures). At most ``max_responses`` responses (seeded
    sample, ``seed``) with at most ``max_tokens`` tokens each are shown.
    """
    need = [c for c in ("sample", "pos", "logp", "entropy", "adv") if c not in tokens.columns]
    if need:
        raise ValueError(f"tokens lack column(s) {', '.join(need)}")
    if len(tokens) == 0:
        raise ValueError("tokens have no rows")
    if max_responses < 1 or max_tokens < 1:
        raise ValueError("max_responses and max_tokens must be >= 1")
    tokens = tokens.copy()
    if "quadrant" not in tokens:  # SCIENCE.md §2 quadrants from the frame's own columns
        import torch

        from .estimators import quadrant

        cols = [torch.as_tensor(tokens[c].to_numpy(np.float64, copy=True)) for c in ("logp", "entropy", "adv")]
        tokens["quadrant"] = quadrant(*cols).numpy()
    s = summary or {}
    lr = (s.get("settings") or {}).get("lr", s.get("lr"))
    lr = float(lr) if lr is not None else None
    n_tokens = int(s.get("n_tokens", len(tokens)))
    modes = colour_modes(tokens, lr, n_tokens)
    ids = sample_ids(tokens, max_responses, seed)
    resp_html, n_spans = _responses_html(tokens, modes, ids, max_tokens, lr, n_tokens)

    body = [f"<h1>{esc(title)}</h1>"]
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    body.append('<h2 id="summary">Summary</h2>')
    body.append(_summary_html(tokens, summary, lr, n_tokens))
    if compare_summary:
        body.append(_compare_html(compare_summary))
    if metrics is not None and len(metrics):
        body.append(_metrics_html(metrics))
    if figures:
        body.append('<h2 id="figures">Figures</h2>')
        for name, caption, png in figures:  # a handful of figures
            b64 = base64.b64encode(png).decode("ascii")
            body.append(
                f'<figure id="fig-{esc(name)}"><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
                f"<figcaption><strong>{esc(name)}</strong>: {esc(caption)}</figcaption></figure>"
            )
    if skipped:
        body.append(
            f'<details><summary>{len(skipped)} figure(s) not made</summary><ul class="notes">'
            + "".join(f"<li>{esc(n)}</li>" for n in skipped)
            + "</ul></details>"
        )
    n_resp = int(tokens["sample"].nunique())
    body.append('<h2 id="tokens">Responses</h2>')
    body.append(
        f"<p>{len(ids)} of {n_resp} responses (random sample, seed {seed}); at most {max_tokens} tokens "
        "each. Hover a token for p, H, A, Ω and its quadrant.</p>"
    )
    options = "".join(f'<option value="{i}">{esc(m.label)}</option>' for i, m in enumerate(modes))
    body.append(
        f'<div class="controls"><label>colour tokens by <select id="mode">{options}</select></label>'
        + "".join(_legend(i, m) for i, m in enumerate(modes))
        + "</div>"
    )
    body.append(f'<div id="responses" data-n-spans="{n_spans}">{resp_html}</div>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>"
        f'<body data-report="entropy-lens">{"".join(body)}<script>{_SCRIPT}</script></body></html>\n'
    )
