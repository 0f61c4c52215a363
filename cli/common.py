"""Helpers shared by the CLI commands: console, one-line errors, progress bars, run writers."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and info logs (the CLI shows its own progress)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class RateColumn(ProgressColumn):
    """Items per second of a task (e.g. tokens/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        return Text(f"{speed:,.0f}/s" if speed >= 10 else f"{speed:.2g}/s", style="cyan")


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)
#: Exit codes: bad input or usage; a training run that diverged (NaN loss).
EXIT_USAGE = 2
EXIT_DIVERGED = 3


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``message`` as one line on stderr (whitespace collapsed, no markup) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-input errors into a one-line message and exit code 2."""
    try:
        yield
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@contextmanager
def stage_progress(stages: dict[str, int], get_time=None) -> Iterator:
    """Rich progress bars, one per stage, for stages that run one after another in the given order:
    a stage's clock starts when the stage before it completes (the first one's at once), or at its
    own first report if that comes earlier. Yields ``advance(stage, n)``; ``advance.elapsed(stage)``
    gives a stage's seconds so far."""
    with Progress(
        TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
        console=err_console, transient=False, get_time=get_time,
    ) as prog:
        names = list(stages)
        tasks = {name: prog.add_task(name, total=total, start=(i == 0)) for i, (name, total) in enumerate(stages.items())}
        started = set(names[:1])

        def start(stage: str) -> None:
            if stage not in started:
                prog.start_task(tasks[stage])
                started.add(stage)

        def advance(stage: str, n: int) -> None:
            if stage not in tasks:
                return
            start(stage)
            prog.advance(tasks[stage], n)
            if prog.tasks[tasks[stage]].finished:
                later = names[names.index(stage) + 1 :]
                if later:
                    start(later[0])

        def elapsed(stage: str) -> float:  # as TimeElapsedColumn shows it
            t = prog.tasks[tasks[stage]]
            return (t.finished_time if t.finished else t.elapsed) or 0.0

        advance.elapsed = elapsed
        yield advance


def estimator_table(scores: dict, title: str) -> Table:
    """Rich table of estimator scores from summary.json."""
    t = Table(title=title)
    for col in ("estimator", "PCC", "SRCC", "MSE", "sign", "Σ pred", "Σ meas"):
        t.add_column(col, justify="right" if col != "estimator" else "left", no_wrap=True)

    def f(x, fmt):
        return "nan" if x is None or x != x else format(x, fmt)

    for name, s in scores.items():
        t.add_row(name, f(s["pcc"], ".3f"), f(s["srcc"], ".3f"), f(s["mse"], ".2e"), f(s["sign_agreement"], ".3f"),
                  f(s["total_pred"], ".2e"), f(s["total_measured"], ".2e"))
    return t


def default_rollouts() -> Path:
    """The rollout file shipped with the package."""
    from entropy_lens.data import DEMO_ROLLOUTS

    return DEMO_ROLLOUTS


def write_run(out: Path, tokens, summary: dict, config: dict) -> None:
    """Write tokens.parquet, summary.json and config.yaml, all or nothing."""
    from entropy_lens.io.writers import atomic_write_files, versions

    atomic_write_files(out, {"tokens.parquet": tokens, "summary.json": summary,
                             "config.yaml": {"config": config, "versions": versions()}})
