"""Rendering and writing built figures: PNG bytes, PNG + CSV files, a run's figures in one call."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from entropy_lens.io.writers import atomic_write_bytes
from entropy_lens.plots.registry import Plot, build_plots
from entropy_lens.plots.runs import load_run


def figure_png(fig: Figure, dpi: int = 130) -> bytes:
    """PNG bytes of a figure (in memory)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_plots(plots: list[Plot], out: str | Path, dpi: int = 130) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.csv`` for every plot into ``out`` (each file atomically).

    Every PNG and CSV is rendered in memory first, so a failure writes nothing.
    """
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
