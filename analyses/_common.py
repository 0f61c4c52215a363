"""Shared entry point of the figure scripts: read cached runs, rebuild one figure, write PNG + CSV.

Each ``fig_*.py`` script calls :func:`main` with its figure name and the claim it checks. Usage:

    python analyses/fig_<name>.py RUN [RUN ...] -o DIR [--dpi 150]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(figure: str, claim: str, argv: list[str] | None = None) -> int:
    """Rebuild ``figure`` from the run folders given on the command line; 0 on success, 2 on bad input."""
    from entropy_lens import plots

    ap = argparse.ArgumentParser(description=f"{figure}: {claim}")
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (tokens.parquet, compare/, metrics.jsonl)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="folder for the PNG and CSV")
    ap.add_argument("--dpi", type=int, default=150)
    args = ap.parse_args(argv)
    try:
        runs = [plots.load_run(p) for p in args.runs]
        built, notes = plots.build_plots(runs, [figure])
    except (ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}")
    if not built:
        print(f"error: {figure} could not be made from {', '.join(map(str, args.runs))}", file=sys.stderr)
        return 2
    for path in plots.save_plots(built, args.out, dpi=args.dpi):
        print(f"wrote {path}")
    print(f"claim: {claim}")
    return 0
