"""The report page: the Jinja2 environment (autoescaping, strict undefined) and :func:`build_report`.

The page needs no network: figures are inline ``data:image/png;base64`` images, the style and the
one small script are inline, and the Content-Security-Policy in ``page.html.j2`` allows nothing
else (no external loads; only the page's own script, by its SHA-256 hash, may run — so even text
that slipped through escaping could not execute).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from typing import Any, Sequence

import jinja2
import numpy as np
import pandas as pd

from entropy_lens.report import data
from entropy_lens.report.colours import colour_modes, legend

#: Default bounds on the page size.
MAX_RESPONSES = 12
MAX_TOKENS = 400

#: Template names (files beside this module).
PAGE_TEMPLATE = "page.html.j2"
SCRIPT_TEMPLATE = "script.js.j2"

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

#: Bidirectional-text controls: embeddings and overrides (U+202A–U+202E), isolates (U+2066–U+2069),
#: the LRM / RLM / ALM marks (U+200E, U+200F, U+061C). Model text containing them could reorder
#: what the page shows (an RTL override makes "abc" read "cba"), so they are shown, not obeyed.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def visible_bidi(text: str) -> str:
    """``text`` with every bidirectional control character replaced by a visible ``⟨U+XXXX⟩``."""
    return _BIDI.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)


def printable(value: Any) -> Any:
    """Every printed value's last step before autoescaping: in strings, C0 control characters
    other than tab / newline / CR become U+FFFD and bidirectional controls become a visible
    ``⟨U+XXXX⟩`` (:func:`visible_bidi`); other values pass unchanged."""
    if not isinstance(value, str):
        return value
    if _CTRL.search(value):
        value = _CTRL.sub("\ufffd", value)
    return visible_bidi(value) if _BIDI.search(value) else value


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The report's template environment: templates from this package, autoescaping on for every
    template, undefined names an error, block tags trimmed."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("entropy_lens.report", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=printable,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def script_text() -> str:
    """The page's script exactly as the page template includes it."""
    return environment().get_template(SCRIPT_TEMPLATE).render()


def script_sha256() -> str:
    """Base64 SHA-256 of the page's script: the hash the Content-Security-Policy allows."""
    return base64.b64encode(hashlib.sha256(script_text().encode()).digest()).decode()


def _check_frame(tokens: pd.DataFrame, max_responses: int, max_tokens: int) -> None:
    """ValueError for a frame without the needed columns or rows, or bounds below 1."""
    need = [c for c in ("sample", "pos", "logp", "entropy", "adv") if c not in tokens.columns]
    if need:
        raise ValueError(f"tokens lack column(s) {', '.join(need)}")
    if len(tokens) == 0:
        raise ValueError("tokens have no rows")
    if max_responses < 1 or max_tokens < 1:
        raise ValueError("max_responses and max_tokens must be >= 1")


def with_quadrants(tokens: pd.DataFrame) -> pd.DataFrame:
    """A copy of the frame with a ``quadrant`` column (docs/science.md §2.8, from logp, entropy and adv
    when the frame has none)."""
    tokens = tokens.copy()
    if "quadrant" not in tokens:
        import torch

        from entropy_lens.estimators import quadrant

        cols = [torch.as_tensor(tokens[c].to_numpy(np.float64, copy=True)) for c in ("logp", "entropy", "adv")]
        tokens["quadrant"] = quadrant(*cols).numpy()
    return tokens


def _run_scale(summary: dict | None, n_rows: int) -> tuple[float | None, int]:
    """η (``settings.lr`` or ``lr``; None when unknown) and L (``n_tokens``, else the row count)."""
    s = summary or {}
    lr = (s.get("settings") or {}).get("lr", s.get("lr"))
    return (float(lr) if lr is not None else None), int(s.get("n_tokens", n_rows))


def page_context(
    tokens: pd.DataFrame,
    summary: dict | None,
    compare_summary: dict | None,
    metrics: pd.DataFrame | None,
    figures: Sequence[tuple[str, str, bytes]],
    *,
    title: str,
    max_responses: int,
    max_tokens: int,
    seed: int,
    notes: Sequence[str],
    skipped: Sequence[str],
) -> dict[str, Any]:
    """Everything the page template shows, as plain values (see :func:`build_report`)."""
    lr, n_tokens = _run_scale(summary, len(tokens))
    modes = colour_modes(tokens, lr, n_tokens)
    ids = data.sample_ids(tokens, max_responses, seed)
    resp = data.responses(tokens, modes, ids, max_tokens, lr, n_tokens)
    summary_tables = [
        data.run_table(tokens, summary, lr, n_tokens),
        data.estimator_table(tokens, summary, lr, n_tokens),
        data.quadrant_table(tokens, lr, n_tokens),
    ]
    extra_tables = []
    if compare_summary:
        extra_tables.append(data.compare_table(compare_summary))
    if metrics is not None and len(metrics):
        extra_tables.append(data.metrics_table(metrics))
    attribution = data.attribution_table(summary or {})
    if attribution is not None:
        extra_tables.append(attribution)
    return {
        "title": str(title),
        "notes": [str(n) for n in notes],
        "summary_tables": [t for t in summary_tables if t is not None],
        "summary_notes": [str(n) for n in ((summary or {}).get("notes") or [])],
        "extra_tables": extra_tables,
        "figures": data.figure_views(figures),
        "skipped": [str(n) for n in skipped],
        "n_shown": len(ids),
        "n_responses": int(tokens["sample"].nunique()),
        "seed": seed,
        "max_tokens": max_tokens,
        "mode_labels": [m.label for m in modes],
        "legends": [legend(m) for m in modes],
        "responses": resp,
        "n_spans": sum(len(r.tokens) for r in resp),
        "script_sha256": script_sha256(),
    }


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
    _check_frame(tokens, max_responses, max_tokens)
    context = page_context(
        with_quadrants(tokens),
        summary,
        compare_summary,
        metrics,
        figures,
        title=title,
        max_responses=max_responses,
        max_tokens=max_tokens,
        seed=seed,
        notes=notes,
        skipped=skipped,
    )
    return environment().get_template(PAGE_TEMPLATE).render(context) + "\n"
