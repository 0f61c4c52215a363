"""Rebuild one registered figure from cached run folders and print the claim it checks.

    python analyses/figure.py NAME RUN [RUN ...] -o DIR [--dpi 150]
    python analyses/figure.py --list          # every registered figure with its claim
    python analyses/figure.py --table         # the figure table of analyses/README.md

Writes ``NAME.png`` and ``NAME.csv`` (the plotted numbers) into ``DIR`` — per-run figures get
``NAME__RUN`` when several runs are given — exactly what ``entropy-lens plot RUN... -o DIR -f NAME``
does. Figures, their needs, captions and claims come from the registry of
:mod:`entropy_lens.plots`. Exit code 2 with one line on stderr when the runs lack what the figure
needs. See analyses/README.md and docs/figures.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from entropy_lens import plots


def example_runs(spec: plots.FigureSpec) -> str:
    """The cached runs of analyses/README.md a figure is made from (its first need decides)."""
    return "runs/train/*" if spec.needs and not spec.per_run else "runs/validate"


def list_lines() -> list[str]:
    """``NAME: claim`` for every registered figure, in build order."""
    return [f"{name}: {plots.get_figure(name).claim}" for name in plots.list_figures()]


def readme_table() -> list[str]:
    """The Markdown figure table of analyses/README.md: name, needs, claim and command."""
    rows = ["| figure | needs | claim it checks | command |", "|---|---|---|---|"]
    for name in plots.list_figures():
        spec = plots.get_figure(name)
        claim = spec.claim.replace("|", "\\|")
        leaves = [n for n in spec.needs if not any(plots.NEEDS[m].parent == n for m in spec.needs)]
        needs = ", ".join(f"`{n}`" for n in leaves) or "the method registry"
        command = f"`python analyses/figure.py {name} {example_runs(spec)} -o figures/`"
        rows.append(f"| `{name}` | {needs} | {claim} | {command} |")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; a usage error exits with code 2."""
    ap = argparse.ArgumentParser(description="Rebuild one registered figure (PNG + CSV) and print its claim.")
    ap.add_argument("name", nargs="?", help=f"figure name: {', '.join(plots.list_figures())}")
    ap.add_argument("runs", nargs="*", type=Path, help="run folders (tokens.parquet, compare/, metrics.jsonl)")
    ap.add_argument("-o", "--out", type=Path, help="folder for the PNG and CSV")
    ap.add_argument("--dpi", type=int, default=150, help="PNG resolution")
    ap.add_argument("--list", action="store_true", help="print every registered figure with its claim")
    ap.add_argument("--table", action="store_true", help="print the figure table of analyses/README.md")
    args = ap.parse_args(argv)
    if not (args.list or args.table):
        if args.name is None or not args.runs or args.out is None:
            ap.error("give NAME, at least one RUN and -o DIR (or --list)")
        if args.name not in plots.list_figures():
            ap.error(f"unknown figure {args.name!r}; known: {', '.join(plots.list_figures())}")
    return args


def make(name: str, runs: list[Path], out: Path, dpi: int) -> int:
    """Build and write figure ``name`` from ``runs``; 0 on success, 2 (one line on stderr) on bad input."""
    try:
        built, notes = plots.build_plots([plots.load_run(p) for p in runs], [name])
    except (ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}")
    if not built:
        print(f"error: {name} could not be made from {', '.join(map(str, runs))}", file=sys.stderr)
        return 2
    for path in plots.save_plots(built, out, dpi=dpi):
        print(f"wrote {path}")
    print(f"claim: {plots.get_figure(name).claim}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--list``, ``--table`` or one figure."""
    args = parse_args(argv)
    if args.list or args.table:
        print("\n".join(list_lines() if args.list else readme_table()))
        return 0
    return make(args.name, args.runs, args.out, args.dpi)


if __name__ == "__main__":
    sys.exit(main())
