"""``entropy-lens report RUN [-o report.html]``: one self-contained HTML page for a run.

Thin: the page is built by :func:`entropy_lens.report.build_report` from the run's files
(:func:`entropy_lens.plots.load_run`) and the figures of :func:`entropy_lens.plots.build_plots`;
this module writes it atomically and prints where. Input problems: one line on stderr, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from entropy_lens_cli.common import add_command, fail


def report(
    run: Annotated[Path, typer.Argument(help="run folder with tokens.parquet (from validate or analyze)")],
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="HTML file to write (default RUN/report.html)")
    ] = None,
    max_responses: Annotated[int, typer.Option("--max-responses", help="responses shown (random sample)")] = 12,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="tokens shown per response")] = 400,
    seed: Annotated[int, typer.Option("--seed", help="seed of the response sample")] = 0,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="include the figures")] = True,
    dpi: Annotated[int, typer.Option("--dpi", help="resolution of the inline figures")] = 100,
) -> None:
    """One self-contained HTML page: summary tables, figures, tokens coloured by ΔH or entropy."""
    from entropy_lens import plots
    from entropy_lens.io.writers import atomic_write_bytes
    from entropy_lens.report import build_report

    if max_responses < 1 or max_tokens < 1:
        fail("--max-responses and --max-tokens must be >= 1")
    if dpi < 30 or dpi > 300:
        fail(f"--dpi must be in [30, 300], got {dpi}")
    try:
        r = plots.load_run(run)
        if r.tokens is None:
            raise ValueError(f"{run}: no tokens.parquet (run `entropy-lens validate` or `entropy-lens analyze` first)")
        figs: list[tuple[str, str, bytes]] = []
        skipped: list[str] = []
        if figures:
            built, skipped = plots.build_plots([r])
            figs = [(p.name, p.caption, plots.figure_png(p.figure, dpi)) for p in built]
        try:
            html = build_report(
                r.tokens,
                r.summary,
                r.compare_summary,
                r.metrics,
                figs,
                title=f"entropy-lens report: {r.name}",
                max_responses=max_responses,
                max_tokens=max_tokens,
                seed=seed,
                notes=r.notes,
                skipped=skipped,
            )
        except ValueError as exc:
            raise ValueError(f"{run / 'tokens.parquet'}: {exc}") from exc
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    target = out if out is not None else run / "report.html"
    try:
        atomic_write_bytes(target, html.encode("utf-8"))
    except OSError as exc:
        fail(f"{target}: cannot write ({exc.strerror or exc})")
    typer.echo(f"wrote {target} ({len(html.encode('utf-8')) / 1024:.0f} KiB, {len(figs)} figures)")


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the main app."""
    add_command(app, "report", report)
