"""One self-contained HTML page per run: summary tables, figures, and tokens coloured by ΔH.

:func:`build_report` is a pure function from frames / dicts / PNG bytes to an HTML string (the
CLI ``entropy-lens report`` reads the run and writes the file). Layout:

- :mod:`.colours` — the colour modes of the tokens, their scales and legends;
- :mod:`.data` — tables, token spans, headers and figures as plain, formatted values;
- :mod:`.page` — the Jinja2 environment and :func:`build_report`;
- ``page.html.j2`` / ``script.js.j2`` — the page template and its one script.

The page needs no network: figures are inline ``data:image/png;base64`` images, the style and
the script are inline, and a Content-Security-Policy allows nothing else (only the page's own
script, by its SHA-256 hash, may run). Every value reaches the page through Jinja2's
autoescaping — model text (token strings) and every value from the input files alike; tokens
carry their values in ``data-*`` attributes and a ``title`` tooltip. The page size is bounded: at
most ``max_responses`` responses (a seeded random sample) with at most ``max_tokens`` tokens each.
"""

from __future__ import annotations

from entropy_lens.report.colours import ColourMode, colour_modes, token_colours
from entropy_lens.report.data import sample_ids
from entropy_lens.report.page import (
    MAX_RESPONSES,
    MAX_TOKENS,
    build_report,
    environment,
    script_sha256,
)

__all__ = [
    "MAX_RESPONSES",
    "MAX_TOKENS",
    "ColourMode",
    "build_report",
    "colour_modes",
    "environment",
    "sample_ids",
    "script_sha256",
    "token_colours",
]
