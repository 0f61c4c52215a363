"""The figure registry and :func:`build_plots`, the one loop over it.

A figure is registered with

    @figure("name", needs="tokens", caption="one line", claim="one line")
    def build(source) -> tuple[pd.DataFrame, Figure]: ...

``needs`` names the run parts the figure requires (:data:`NEEDS`): a run part (``tokens``,
``tokens:dh_measured``, ``compare``, ``compare_summary``) makes a figure per run and ``source`` is
that :class:`~entropy_lens.plots.runs.Run`; ``metrics`` or ``pass_at_k`` make one figure from the
frames of all runs stacked and ``source`` is that frame; no needs (the factor matrix) means
``source`` is None. A need implies its parent (``tokens:dh_measured`` implies ``tokens``). When a
need is not met, :func:`build_plots` writes the note — here and nowhere else. A builder that
raises ``ValueError`` is skipped with its message as the note. Registration order is build order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd
from matplotlib.figure import Figure

from entropy_lens.plots.frames import combined
from entropy_lens.plots.runs import Run

Builder = Callable[[Any], tuple[pd.DataFrame, Figure]]


@dataclass(frozen=True)
class Plot:
    """One built figure: file stem ``name``, the Figure, the plotted numbers and a caption."""

    name: str
    figure: Figure
    data: pd.DataFrame
    caption: str


@dataclass(frozen=True)
class Need:
    """A run part a figure requires, and the note text when it is missing.

    ``missing``: the note when the need comes first (the figure's scope) — for a per-run need it
    names ``{names}``, the runs without it. ``missing_in_run``: the note for one run that has the
    first need but lacks this later one (``{run}``, ``{path}``). Per-run needs test a run with
    ``present``; needs of all runs (``per_run=False``) ``gather`` one frame (None = missing).
    """

    key: str
    per_run: bool
    missing: str
    missing_in_run: str = ""
    parent: str | None = None
    present: Callable[[Run], bool] | None = None
    gather: Callable[[list[Run]], Any] | None = None


def _has_measured(r: Run) -> bool:
    """Whether the run's tokens carry the measured entropy change."""
    return r.tokens is not None and "dh_measured" in r.tokens.columns


#: Every need a figure may name, with the notes written when it is not met.
NEEDS = {
    n.key: n
    for n in (
        Need(
            "tokens",
            True,
            "no tokens.parquet in {names}",
            "needs tokens.parquet beside compare/ in {path}",
            present=lambda r: r.tokens is not None,
        ),
        Need(
            "tokens:dh_measured",
            True,
            "no dh_measured in {names}",
            "tokens.parquet of {run} has no dh_measured; run `entropy-lens validate` or analyze with --next-model",
            parent="tokens",
            present=_has_measured,
        ),
        Need(
            "compare",
            True,
            "no compare/compare.parquet in {names}",
            "no compare/compare.parquet in {path}",
            present=lambda r: r.compare is not None,
        ),
        Need(
            "compare_summary",
            True,
            "no compare/summary.json in {names}",
            "no compare/summary.json in {path}",
            parent="compare",
            present=lambda r: bool(r.compare_summary),
        ),
        Need(
            "attribution",
            True,
            "no attribution.parquet in {names}",
            "no attribution.parquet in {path}; run `entropy-lens attribute`",
            present=lambda r: r.attribution is not None,
        ),
        Need("metrics", False, "no metrics.jsonl in the given runs", gather=lambda runs: combined(runs, "metrics")),
        Need(
            "pass_at_k", False, "no pass_at_k in any metrics.jsonl", gather=lambda runs: combined(runs, "pass_at_k")
        ),
    )
}


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure: its builder, the needs (parents first), caption and the claim it checks."""

    name: str
    build: Builder
    needs: tuple[str, ...]
    caption: str
    claim: str

    @property
    def per_run(self) -> bool:
        """True when the figure is made once per run (its first need is a run part)."""
        return bool(self.needs) and NEEDS[self.needs[0]].per_run


_REGISTRY: dict[str, FigureSpec] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _expand_needs(needs: str | Iterable[str] | None) -> tuple[str, ...]:
    """``needs`` as a tuple with every parent before its child; ValueError for an unknown or a
    mixed set (run parts and all-run frames, or two all-run frames)."""
    given = [needs] if isinstance(needs, str) else list(needs or ())
    unknown = [k for k in given if k not in NEEDS]
    if unknown:
        raise ValueError(f"unknown need(s) {', '.join(map(repr, unknown))}; valid: {', '.join(NEEDS)}")
    out: list[str] = []
    for key in given:
        chain = [key]
        while NEEDS[chain[0]].parent:
            chain.insert(0, NEEDS[chain[0]].parent)
        out += [k for k in chain if k not in out]
    scopes = {NEEDS[k].per_run for k in out}
    if len(scopes) > 1 or sum(not NEEDS[k].per_run for k in out) > 1:
        raise ValueError(f"needs {', '.join(out)} mix run parts and frames of all runs")
    return tuple(out)


def _check_line(what: str, text: str) -> None:
    """ValueError unless ``text`` is one non-empty line."""
    if not text or "\n" in text:
        raise ValueError(f"{what} must be one non-empty line")


def figure(
    name: str, *, needs: str | Iterable[str] | None = None, caption: str, claim: str
) -> Callable[[Builder], Builder]:
    """Decorator registering ``build(source) -> (data, Figure)`` as figure ``name`` (module doc).

    ``name`` is snake_case and unique (a duplicate is an error); it is also the file stem.
    ``caption`` describes the figure, ``claim`` is the sentence it checks; both one line.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"figure name must be snake_case, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"figure {name!r} is already registered")
    expanded = _expand_needs(needs)
    _check_line("caption", caption)
    _check_line("claim", claim)

    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = FigureSpec(name=name, build=fn, needs=expanded, caption=caption, claim=claim)
        return fn

    return deco


def unregister_figure(name: str) -> None:
    """Remove a figure (for tests and plugins that replace one deliberately)."""
    _REGISTRY.pop(name, None)


def list_figures() -> list[str]:
    """Registered figure names, in registration (= build) order."""
    return list(_REGISTRY)


def get_figure(name: str) -> FigureSpec:
    """The :class:`FigureSpec` registered under ``name``; unknown → ValueError listing the names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown figure {name!r}; available: {', '.join(_REGISTRY)}") from None


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _names(runs: Iterable[Run], limit: int = 3) -> str:
    """Paths of ``runs`` for a note: the first ``limit`` and how many more."""
    names = [str(r.path) for r in runs]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _stem(name: str, run: Run, many: bool) -> str:
    """File stem of a per-run figure: ``name__<run folder>`` when several runs are given."""
    return f"{name}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', run.name)}" if many else name


def _attempt(spec: FigureSpec, stem: str, source: Any) -> tuple[list[Plot], list[str]]:
    """Build one figure; a ``ValueError`` of its builder becomes the skip note."""
    try:
        data, fig = spec.build(source)
    except ValueError as exc:
        return [], [f"{stem}: skipped ({exc})"]
    return [Plot(stem, fig, data, spec.caption)], []


def _group_note(spec: FigureSpec, runs: list[Run], have: list[Run]) -> list[str]:
    """The note for runs lacking the figure's first need: skipped, or made for k of n runs."""
    if len(have) == len(runs):
        return []
    need = NEEDS[spec.needs[0]]
    missing = need.missing.format(names=_names(r for r in runs if r not in have))
    made = "skipped" if not have else f"made for {len(have)} of {len(runs)} runs"
    return [f"{spec.name}: {made} ({missing})"]


def _run_gap(spec: FigureSpec, run: Run) -> str | None:
    """Why ``run`` lacks a later need of the figure (the note text), or None when it has them all."""
    for key in spec.needs[1:]:
        need = NEEDS[key]
        if not need.present(run):
            return need.missing_in_run.format(run=run.name, path=run.path)
    return None


def _per_run_plots(spec: FigureSpec, runs: list[Run]) -> tuple[list[Plot], list[str]]:
    """One figure per run that has the figure's needs, with the notes for the others."""
    have = [r for r in runs if NEEDS[spec.needs[0]].present(r)]
    plots: list[Plot] = []
    notes = _group_note(spec, runs, have)
    for r in have:  # per run, in the order given
        stem = _stem(spec.name, r, len(runs) > 1)
        gap = _run_gap(spec, r)
        if gap is not None:
            notes.append(f"{stem}: skipped ({gap})")
            continue
        p, n = _attempt(spec, stem, r)
        plots += p
        notes += n
    return plots, notes


def _selected(only: Iterable[str] | None) -> list[FigureSpec]:
    """The registered figures asked for, in registration order; ValueError for an unknown name."""
    known = list_figures()
    asked = list(only) if only is not None else known
    unknown = [w for w in asked if w not in known]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [_REGISTRY[f] for f in known if f in asked]


def _once(spec: FigureSpec, runs: list[Run], frames: dict[str, Any]) -> tuple[list[Plot], list[str]]:
    """A figure made once: from the frame of all runs its need gathers (cached in ``frames``), or
    from nothing (no needs)."""
    if not spec.needs:
        return _attempt(spec, spec.name, None)
    need = NEEDS[spec.needs[0]]
    if need.key not in frames:
        frames[need.key] = need.gather(runs)
    if frames[need.key] is None:
        return [], [f"{spec.name}: skipped ({need.missing})"]
    return _attempt(spec, spec.name, frames[need.key])


def build_plots(runs: list[Run], only: Iterable[str] | None = None) -> tuple[list[Plot], list[str]]:
    """Every figure the runs allow: ``(plots, notes)``; a note says why each other figure was skipped.

    Token and compare figures are made per run (file stem ``name__run`` when several runs are
    given); training-curve figures combine the metrics of all runs (seeds grouped by method and
    setting); the factor matrix comes from the method registry. The figures follow the
    registration order; every note for a missing input is written here (:data:`NEEDS`).
    """
    runs = list(runs)
    frames: dict[str, Any] = {}  # the all-run frames, gathered once
    plots: list[Plot] = []
    notes: list[str] = []
    for spec in _selected(only):  # registration order
        p, n = _per_run_plots(spec, runs) if spec.per_run else _once(spec, runs, frames)
        plots += p
        notes += n
    return plots, notes
