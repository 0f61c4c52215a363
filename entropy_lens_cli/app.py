"""The `entropy-lens` command line (thin: parse, call the library, print, write files)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Entropy dynamics of RL with verifiable rewards.")
console = Console()
err_console = Console(stderr=True)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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
def stage_progress(stages: dict[str, int]) -> Iterator:
    """Rich progress bars, one per stage; yields ``advance(stage, n)``."""
    with Progress(
        TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=False,
    ) as prog:
        tasks = {name: prog.add_task(name, total=total) for name, total in stages.items()}

        def advance(stage: str, n: int) -> None:
            if stage in tasks:
                prog.advance(tasks[stage], n)

        yield advance


def estimator_table(scores: dict, title: str) -> Table:
    """Rich table of estimator scores from summary.json."""
    t = Table(title=title)
    for col in ("estimator", "PCC", "SRCC", "MSE", "sign agr.", "Σ predicted", "Σ measured"):
        t.add_column(col, justify="right" if col != "estimator" else "left", no_wrap=True)

    def f(x, fmt):
        return "nan" if x is None or x != x else format(x, fmt)

    for name, s in scores.items():
        t.add_row(name, f(s["pcc"], ".3f"), f(s["srcc"], ".3f"), f(s["mse"], ".2e"), f(s["sign_agreement"], ".3f"),
                  f(s["total_pred"], ".3e"), f(s["total_measured"], ".3e"))
    return t


@app.command()
def validate(
    rollouts: Optional[Path] = typer.Option(None, "--rollouts", "-r", help="Rollouts (parquet/JSONL). Default: the shipped SmolLM2 GSM8K rollouts."),
    model: Optional[str] = typer.Option(None, "--model", help="HF model folder or verl checkpoint. Default: the bundled SmolLM2-135M-Instruct."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate η of the one real update."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adamw."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature τ (entropy is measured at τ)."),
    eps_low: float = typer.Option(0.2, "--eps-low"),
    eps_high: float = typer.Option(0.2, "--eps-high"),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Sequences per forward/backward."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use only the first N responses."),
    no_jvp: bool = typer.Option(False, "--no-jvp", help="Skip the parameter-space JVP estimator."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickle-format weights (runs code from the file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
) -> None:
    """Estimators vs the measured ΔH of one real optimizer step (writes tokens.parquet, summary.json)."""
    from entropy_lens.io import rollouts as ro
    from entropy_lens.io.models import load_model
    from entropy_lens.validate import ValidateSettings, run_validate

    with user_errors():
        if optimizer not in ("sgd", "adamw"):
            fail(f"--optimizer must be sgd or adamw, got {optimizer!r}")
        if not lr > 0:
            fail(f"--lr must be > 0, got {lr}")
        src = rollouts if rollouts is not None else default_rollouts()
        frame = ro.load_rollouts(src)
        if max_samples:
            frame = ro.validate_rollouts(frame.head(max_samples), src)
        if "reward" not in frame.columns:
            from entropy_lens.rewards import score_batch

            frame["reward"] = score_batch(frame["response"].tolist(), frame["ground_truth"].astype(str).tolist(), "math")
        t0 = time.time()
        with console.status("loading model"):
            mdl, tok = load_model(model, allow_pickle=allow_pickle)
        settings = ValidateSettings(lr=lr, optimizer=optimizer, temperature=temperature, eps_low=eps_low,
                                    eps_high=eps_high, micro_batch=micro_batch, jvp=not no_jvp)
        B = len(frame)
        stages = {"forward": B, "update": B, "forward after": B}
        if not no_jvp:
            stages["jvp"] = B
        with stage_progress(stages) as advance:
            tokens, summary = run_validate(mdl, tok, frame, settings, str(src), progress=advance)
        summary["model"] = model or "bundled:smollm2-135m-instruct"
        summary["rollouts"] = str(src)
        summary["wall_seconds"] = round(time.time() - t0, 1)
        write_run(out, tokens, summary, {"command": "validate", "model": summary["model"], "rollouts": str(src),
                                         **summary["settings"]})
    console.print(estimator_table(summary["estimators"], f"ΔH estimators vs measured ({optimizer}, lr={lr:g}, "
                                                         f"{summary['n_tokens']} tokens)"))
    for note in summary["notes"]:
        console.print(f"note: {note}")
    console.print(f"wrote {out}/tokens.parquet, {out}/summary.json")


def default_rollouts() -> Path:
    """The rollout file shipped with the package."""
    from entropy_lens.data import DEMO_ROLLOUTS

    return DEMO_ROLLOUTS


def write_run(out: Path, tokens, summary: dict, config: dict) -> None:
    """Write tokens.parquet, summary.json and config.yaml (each atomically)."""
    from entropy_lens.io.writers import atomic_write_json, atomic_write_parquet, atomic_write_yaml, versions

    atomic_write_parquet(out / "tokens.parquet", tokens)
    atomic_write_yaml(out / "config.yaml", {"config": config, "versions": versions()})
    atomic_write_json(out / "summary.json", summary)


def _register_optional() -> None:
    """Commands that live in their own modules."""
    try:
        from entropy_lens_cli import compare_cmd
    except ImportError:
        return
    compare_cmd.register(app)


_register_optional()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
