"""Helpers shared by the CLI commands: the one console, the one error path (:func:`error_boundary`,
every command runs inside it), option checks, the run-folder rules (:func:`prepare_out_dir`: check,
lock, then compute, then write), progress bars and the run writer."""

from __future__ import annotations

import errno
import math
import os
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
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
from typer.core import TyperCommand

from entropy_lens.dist import RankFailed, env_ranks
from entropy_lens.io.tables import first_line
from entropy_lens.placement import DTYPES, resolve_dtype  # noqa: F401 (the options' names for the commands)

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


#: Exit codes: a bug; bad input, usage or environment; a training run that diverged (NaN loss);
#: interrupted (SIGINT).
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``message`` as one line on stderr (whitespace collapsed, no markup, hidden temporary
    file names mapped to the final ones) and exit with ``code``."""
    line = public_text(" ".join(str(message).split()))
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# The one error boundary: every command runs inside it (GuardedCommand)
# ---------------------------------------------------------------------------------------------

#: ``.NAME.XXXXXXXX`` or ``.NAME.XXXXXXXX.tmp``: the hidden temporary names of io.writers.
_TEMP_NAME = re.compile(r"(^|[/\\\s'\"(])\.([^/\\\s'\"]+?)\.[a-z0-9_]{8}(?:\.tmp)?(?=$|[/\\\s'\":,)])")

#: Plain words for the errno values a careless or unlucky user meets.
_ERRNO_REASONS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "already exists",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}

#: Exceptions that are not errors but click's and typer's own control flow.
_PASS_THROUGH = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)


def public_text(text: str) -> str:
    """``text`` with every hidden temporary name of :mod:`entropy_lens.io.writers`
    (``.tokens.parquet.ab12cd34.tmp``) replaced by the final name (``tokens.parquet``)."""
    return _TEMP_NAME.sub(r"\1\2", text)


def os_reason(exc: OSError) -> str:
    """What went wrong in an OSError, in plain words (no file name)."""
    if exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return exc.strerror or first_line(exc)


def os_error_line(exc: OSError) -> str:
    """``FILE: problem`` for an OSError (the destination of a rename), or its message."""
    where = exc.filename2 if exc.filename2 is not None else exc.filename
    if where is None:
        return first_line(exc) if exc.errno is None else os_reason(exc)
    return f"{os.fsdecode(where)}: {os_reason(exc)}"


def _is_safetensors_error(exc: BaseException) -> bool:
    mod = sys.modules.get("safetensors")
    cls = getattr(mod, "SafetensorError", None) if mod is not None else None
    return cls is not None and isinstance(exc, cls)


def expected_error(exc: BaseException) -> str | None:
    """The one-line message of an expected failure (bad input, options, files, environment), or
    None when ``exc`` is a bug."""
    if isinstance(exc, OSError):
        return os_error_line(exc)
    if _is_safetensors_error(exc):
        return f"invalid safetensors file ({first_line(exc)})"
    if isinstance(exc, FloatingPointError):
        return f"non-finite number: {first_line(exc)}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory ({first_line(exc)})"
    if isinstance(exc, ValueError):
        return first_line(exc)
    return None


def report_bug(exc: BaseException, debug: bool) -> None:
    """One line saying that ``exc`` is a bug and where to report it (the traceback too with
    ``--debug``); exits with :data:`EXIT_BUG`."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    hint = "" if debug else " (--debug shows the traceback)"
    fail(f"{rank_prefix()}{bug_line(exc)}{hint}", EXIT_BUG)


def bug_line(exc: BaseException) -> str:
    """``internal error at FILE:LINE: Type: message — this is a bug ...`` for an unexpected error."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return (f"internal error{where}: {type(exc).__name__}: {first_line(exc)} — this is a bug in entropy-lens; "
            "please report this with the command you ran to the project's issue tracker")


def rank_prefix() -> str:
    """``rank R of N: `` when the command runs as one of several processes (torchrun), else empty."""
    try:
        rank, world, _ = env_ranks()
    except ValueError:
        return ""
    return f"rank {rank} of {world}: " if world > 1 else ""


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """How a rank's failure is told to the others (:func:`entropy_lens.dist.agree`): the line and
    exit code this boundary would give it."""
    if isinstance(exc, click.exceptions.Exit):
        return f"stopped (exit {exc.exit_code})", exc.exit_code or EXIT_BUG
    message = expected_error(exc)
    return (message, EXIT_USAGE) if message is not None else (bug_line(exc), EXIT_BUG)


_INTERRUPT_REPORTED = False


def report_interrupt() -> None:
    """``interrupted`` on stderr (SIGINT / Ctrl-C)."""
    global _INTERRUPT_REPORTED
    _INTERRUPT_REPORTED = True
    err_console.print("interrupted", highlight=False)


def interrupt_reported() -> bool:
    """Whether :func:`report_interrupt` ran in this process (the entry point must not repeat it)."""
    return _INTERRUPT_REPORTED


@contextmanager
def error_boundary(debug: bool = False) -> Iterator[None]:
    """The one error path: an expected failure becomes one line on stderr and exit 2, Ctrl-C
    ``interrupted`` and exit 130, anything else a bug (one line, exit 1; traceback with ``debug``).
    ``typer.Exit`` (from :func:`fail`) and click's own exceptions pass through."""
    try:
        yield
    except (*_PASS_THROUGH, BrokenPipeError):  # typer handles a closed stdout (`| head`) itself
        raise
    except KeyboardInterrupt:
        report_interrupt()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except RankFailed as exc:  # several processes: rank 0 reports what every rank agreed on
        if debug and exc.__cause__ is not None:
            traceback.print_exception(type(exc.__cause__), exc.__cause__, exc.__cause__.__traceback__, file=sys.stderr)
        if exc.agreed and exc.rank != 0:
            raise typer.Exit(exc.exit_code) from None
        fail(str(exc), exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the boundary: sort expected failures from bugs
        message = expected_error(exc)
        if message is not None:
            if debug:
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            fail(rank_prefix() + message)
        report_bug(exc, debug)


class GuardedCommand(TyperCommand):
    """A typer command that runs its callback inside :func:`error_boundary`; ``--debug`` is the
    app's global option (``entropy-lens --debug COMMAND ...``)."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.find_root().params.get("debug"))
        with error_boundary(debug):
            return super().invoke(ctx)


def add_command(app: typer.Typer, name: str, function) -> None:
    """Register ``function`` as the command ``name`` of ``app``, inside the error boundary."""
    app.command(name, cls=GuardedCommand)(function)


# ---------------------------------------------------------------------------------------------
# Option checks (uniform messages, before anything is loaded or written)
# ---------------------------------------------------------------------------------------------


def check_int(option: str, value: int | None, minimum: int = 1) -> None:
    """``option`` (when given) is an integer >= ``minimum``."""
    if value is not None and not value >= minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value}")


def check_positive(option: str, value: float) -> None:
    """``option`` is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be > 0 and finite, got {value}")


def check_non_negative(option: str, value: float, allow_inf: bool = False) -> None:
    """``option`` is a number >= 0 (and finite unless ``allow_inf``)."""
    if not (value >= 0 and (allow_inf or math.isfinite(value))):
        what = "(inf: unbounded)" if allow_inf else "and finite"
        raise ValueError(f"{option} must be >= 0 {what}, got {value}")


def check_choice(option: str, value: str, choices) -> None:
    """``option`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
        raise ValueError(f"{option} must be {listed}, got {value!r}")


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


def write_run(out: Path, tokens, summary: dict, config: dict, options: dict | None = None) -> None:
    """Write tokens.parquet, summary.json and config.yaml (``config``, the command's ``options``
    that :func:`prepare_out_dir` compares on a rerun, versions), all or nothing."""
    from entropy_lens.io.writers import atomic_write_files, versions

    atomic_write_files(out, {"tokens.parquet": tokens, "summary.json": summary,
                             "config.yaml": run_config(config, options, versions())})


def run_config(config: dict, options: dict | None, versions: dict) -> dict:
    """config.yaml's content: ``config`` (with ``command``), ``options`` (when given), ``versions``."""
    out: dict[str, Any] = {"config": config}
    if options is not None:
        out["options"] = recorded(options)
    out["versions"] = versions
    return out


#: ``--allow-pickle``'s help, the same on every command that loads a model.
ALLOW_PICKLE_HELP = ("Allow pickle-format weights (pytorch_model*.bin, *.pt); loading them can run code from the file. "
                     "Safetensors, and verl shard files that torch.load(weights_only=True) reads, need no flag.")


def load_checkpoint(option: str, path: str | None, allow_pickle: bool = False, dtype: str = "float32",
                    device: str = "cpu", device_map: str | None = None):
    """``(model, tokenizer)`` of ``--model``/``--next-model`` (:func:`entropy_lens.model.load.load_model`;
    None: the bundled model) in ``dtype`` on ``device``, or spread by ``device_map`` (``--device-map``;
    None: not spread); a failure the loader does not name (e.g. a corrupt safetensors file) is named
    by the option."""
    from entropy_lens.model.load import ModelLoadError, load_model

    try:
        return load_model(path, dtype=dtype, allow_pickle=allow_pickle, device=device, device_map=device_map)
    except ModelLoadError:
        raise
    except Exception as exc:  # only expected failures are renamed; bugs pass on
        reason = expected_error(exc)
        if reason is None:
            raise
        who = f"{option} {path}" if path is not None else "the bundled model"
        raise ValueError(f"{who}: cannot load the model ({reason})") from exc


# ---------------------------------------------------------------------------------------------
# Run folders: check, lock, then compute, then write
# ---------------------------------------------------------------------------------------------


def input_id(path: str | Path | None, default: str) -> str:
    """How an input is recorded among a run's options: an existing path as an absolute path, a
    name as given, None as ``default``."""
    if path is None:
        return default
    p = Path(path)
    return str(p.resolve()) if p.exists() else str(path)


def recorded(options: dict) -> dict:
    """``options`` as config.yaml holds them (plain values; non-finite numbers as None)."""
    from entropy_lens.io.writers import json_ready

    return json_ready(options)


def check_out_path(out: Path, what: str = "folder") -> None:
    """Refuse an ``-o`` that cannot become a ``what`` (folder or file): an existing entry of the
    other kind, or a path below a file."""
    if what == "folder" and out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: is a file, not a folder")
    if what == "file" and out.is_dir():
        raise ValueError(f"-o {out}: is a folder, not a file")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"-o {out}: {parent} is a file, not a folder")
            return


def make_folders(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; returns the folders created (outermost first)."""
    missing = [p for p in [out, *out.parents] if not p.exists()][::-1]
    made: list[Path] = []
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            remove_empty(made)
            raise ValueError(f"-o {out}: cannot create the folder {p} ({os_reason(exc)})") from None
        made.append(p)
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove the given folders, innermost first, where they are empty (what a failed run made)."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            return


def write_probe(out: Path, folder: Path) -> None:
    """Write and remove a temporary file in ``folder`` (through the writers' own primitive), so
    that a folder the command cannot write is refused before any work."""
    from entropy_lens.io import writers

    try:
        fd, tmp = writers.temp_file(folder, prefix=".entropy-lens-probe.")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        raise ValueError(f"-o {out}: cannot write in {folder} ({os_reason(exc)})") from None


def folder_run(out: Path) -> tuple[str, dict | None] | None:
    """``(command, options)`` of the run ``out`` holds (from config.yaml's ``config.command``,
    compare's summary.json, or a trainer's or an unfinished analyze's files); ``command`` is
    ``"foreign"`` for a config.yaml or summary.json entropy-lens did not write; None when empty."""
    from entropy_lens.io.tables import read_json, read_yaml

    if (out / "config.yaml").is_file():
        data = read_yaml(out / "config.yaml")
        config = data.get("config")
        options = data.get("options") if isinstance(data.get("options"), dict) else None
        if isinstance(config, dict) and "command" in config:
            return str(config["command"]), options
        if isinstance(config, dict) and "preset" in config and "method" in config:
            return "train", None
        return "foreign", None
    if (out / "summary.json").is_file():
        data = read_json(out / "summary.json")
        if "command" in data:
            return str(data["command"]), data.get("options") if isinstance(data.get("options"), dict) else None
        return "foreign", None
    if (out / "metrics.jsonl").exists() or (out / "checkpoints").is_dir():
        return "train", None
    if (out / "shards" / "manifest.json").exists():
        return "analyze", None
    return None


def option_changes(before: dict, now: dict) -> list[str]:
    """``--name OLD → NEW`` for each option that differs between two recorded option sets."""
    keys = list(now) + [k for k in before if k not in now]
    return [f"--{k.replace('_', '-')} {before.get(k)} → {now.get(k)}" for k in keys if before.get(k) != now.get(k)]


def refuse_other_run(out: Path, command: str, options: dict | None) -> None:
    """Refuse a folder holding another command's run, or this command's run with other options."""
    held = folder_run(out)
    if held is None:
        return
    cmd, before = held
    if cmd == "foreign":
        raise ValueError(f"-o {out}: holds files entropy-lens did not write (config.yaml or summary.json); "
                         "use another -o")
    if cmd != command:
        raise ValueError(f"-o {out}: holds a different run (of `entropy-lens {cmd}`); {command} writes its own "
                         "run folder — use another -o")
    if options is not None and before is not None:
        changes = option_changes(before, recorded(options))
        if changes:
            raise ValueError(f"-o {out}: holds a different run ({command} with other options: "
                             f"{'; '.join(changes[:3])}); use another -o or remove the folder")


@contextmanager
def prepare_out_dir(out: Path, command: str, options: dict | None) -> Iterator[Path]:
    """The run-folder rules, before any model is loaded or file written: ``out`` is (or can become)
    a folder this process can write; no other entropy-lens command is writing it (an exclusive
    lock, held until the block ends: :func:`entropy_lens.io.lock.folder_lock`); it holds no other
    command's run and no run of this command with other ``options`` (None: not compared).
    Folders created here are removed again if the command fails before writing into them."""
    from entropy_lens.io.lock import folder_lock

    out = Path(out)
    check_out_path(out)
    made = make_folders(out)
    try:
        write_probe(out, out)
        with folder_lock(out):
            refuse_other_run(out, command, options)
            yield out
    finally:
        remove_empty(made)


def prepare_out_file(out: Path, suffixes: tuple[str, ...]) -> None:
    """The same checks for a command that writes one file (``sample``): the suffix, not a folder,
    not below a file, and its (nearest existing) folder writable. No lock: the file is written
    atomically and nothing else of the folder is touched."""
    out = Path(out)
    if out.suffix not in suffixes:
        raise ValueError(f"-o {out}: output must end in {' or '.join(suffixes)}")
    check_out_path(out, "file")
    folder = next(p for p in out.parents if p.exists())
    write_probe(out, folder)
