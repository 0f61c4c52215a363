"""``entropy-lens table RUN... [-o DIR] [--metric M] [--skip-incomplete]``: the paper-style results
table, method × benchmark, mean ± std over seeds, best per column in bold.

Thin: reading, aggregating and formatting are in :mod:`entropy_lens.results`; this module parses
options, prints the markdown (without ``-o``) or writes ``results.md`` and ``results.csv``
together (with ``-o``), and prints the runs it left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from entropy_lens_cli.common import add_command, console, err_console, prepare_out_dir


def table(
    runs: Annotated[list[Path], typer.Argument(help="run folders, all trainer runs or all eval runs")],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="folder for results.md and results.csv (default: print)")
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="avg_at_k (default), pass_at_1, pass_at_k:K, or greedy (trainer runs)")
    ] = "avg_at_k",
    skip_incomplete: Annotated[
        bool, typer.Option("--skip-incomplete", help="leave out unfinished or diverged runs instead of failing")
    ] = False,
) -> None:
    """Results table of trainer or eval runs: method × benchmark, mean ± std over seeds."""
    from entropy_lens.results import parse_metric, results_csv, results_table

    parsed = parse_metric(metric)
    if out is None:
        result = results_table(runs, parsed, skip_incomplete)
    else:
        with prepare_out_dir(out, "table", None):
            result = results_table(runs, parsed, skip_incomplete)
            from entropy_lens.io.writers import atomic_write_files

            atomic_write_files(out, {"results.md": result.markdown, "results.csv": results_csv(result.table, parsed)})
    for line in result.skipped:
        err_console.print(f"skipped: {line}", markup=False, highlight=False)
    if out is None:
        console.print(result.markdown, markup=False, highlight=False, end="", soft_wrap=True)
    else:
        console.print(f"wrote {out}/results.md, results.csv ({result.table['method'].nunique()} methods, "
                      f"{len(result.rows)} run × benchmark values)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``table`` command to the main app."""
    add_command(app, "table", table)
