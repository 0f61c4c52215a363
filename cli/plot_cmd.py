"""``entropy-lens plot RUN... -o DIR``: every figure the runs allow, as PNG + CSV of the plotted numbers.

Thin: reading and building are in :mod:`entropy_lens.plots`; this module parses options, prints
what was written and what was skipped, and turns input problems into one line on stderr (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from entropy_lens_cli.common import add_command, fail


def plot(
    runs: Annotated[
        list[Path], typer.Argument(help="run folders (tokens.parquet, compare/, metrics.jsonl + config.yaml)")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for the PNG and CSV files")],
    figure: Annotated[
        Optional[list[str]],
        typer.Option("-f", "--figure", help="only this figure (repeatable); default: all it can make"),
    ] = None,
    dpi: Annotated[int, typer.Option("--dpi", help="PNG resolution")] = 130,
) -> None:
    """Paper-style figures from run folders: one PNG and one CSV of the plotted numbers per figure."""
    from entropy_lens import plots

    if dpi < 30 or dpi > 600:
        fail(f"--dpi must be in [30, 600], got {dpi}")
    try:
        loaded = [plots.load_run(p) for p in runs]
        built, notes = plots.build_plots(loaded, figure)
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    # the factor matrix comes from the registry, not the runs: it alone counts only when asked for
    made_from_runs = [p for p in built if p.name != "factor_matrix" or (figure and "factor_matrix" in figure)]
    if not made_from_runs:
        fail(f"nothing to plot from {', '.join(map(str, runs))}: {'; '.join(notes)}")
    try:
        written = plots.save_plots(built, out, dpi=dpi)
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror or exc})")
    for r in loaded:
        for n in r.notes:
            typer.echo(f"note: {n}")
    for n in notes:
        typer.echo(f"note: {n}")
    for p in built:
        typer.echo(f"{p.name}: {p.caption}")
    typer.echo(f"wrote {len(written)} files ({len(built)} figures, PNG + CSV) to {out}")


def register(app: typer.Typer) -> None:
    """Add the ``plot`` command to the main app."""
    add_command(app, "plot", plot)
