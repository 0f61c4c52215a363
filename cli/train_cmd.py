"""``entropy-lens train``: the reference GRPO/STEER trainer (thin: parse, call the library, print).

    entropy-lens train --preset arithmetic-tiny --method steer [--profile paper] [--set optim.lr=1e-4 ...]
                       [--seed S] [--steps N] [--logger tensorboard] [--device D] [--dtype T] -o DIR [--resume]

Exit codes: 0 done; 2 user error (one line on stderr: unknown preset/method/key, bad value, a
reward function that raised, a run folder in the way or being written by another command); 3 the run diverged (non-finite loss; the
last good checkpoint is kept and named).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from entropy_lens_cli.common import (
    DTYPES,
    EXIT_DIVERGED,
    add_command,
    check_choice,
    check_int,
    console,
    err_console,
    fail,
    prepare_out_dir,
)
from entropy_lens_cli.placement import (
    REFUSED_DEVICE_MAP_HELP,
    check_device,
    refuse_ranks,
    resolve_device_map,
    resolve_placement,
)


def resolve_run_config(
    preset: str | None, method: str | None, set_items: list[str], seed: int | None,
    steps: int | None, out: Path, resume: bool, profile: str | None = None,
) -> tuple[Any, dict[str, str]]:
    """The run's config: from the flags (fresh run), or the saved config.yaml updated by the flags
    (``--resume``; the library then checks that nothing but ``steps`` changed)."""
    from entropy_lens.train import build_config, load_run_config, parse_set_items

    given = parse_set_items(set_items)
    if resume:
        saved, saved_set = load_run_config(out)
        overrides = {**saved_set, **given}
        cfg = build_config(preset or saved.preset, method or saved.method, overrides,
                           seed if seed is not None else saved.seed, steps if steps is not None else saved.steps,
                           profile=profile or saved.profile)
        return cfg, overrides
    cfg = build_config(preset or "arithmetic-tiny", method or "grpo", given, seed, steps, profile=profile)
    return cfg, given


def train(
    out: Annotated[Path, typer.Option("-o", "--out", help="run folder (metrics.jsonl, rollouts/, checkpoints/, config.yaml, summary.json)")],
    preset: Annotated[str | None, typer.Option("--preset", help="arithmetic-tiny (default) or gsm8k-smollm2")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="registered method (entropy-lens methods); default grpo")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override KEY=VALUE, e.g. optim.lr=1e-4, rollout.n=4, steer.lambda_min=0.7 (repeatable)"),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="seed of every random stream")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="number of RL steps")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in -o from its newest checkpoint")] = False,
    profile: Annotated[
        str | None,
        typer.Option("--profile", help="settings applied over the preset before --set: paper (the STEER reference setting, docs/trainer.md)"),
    ] = None,
    logger: Annotated[
        list[str] | None,
        typer.Option("--logger", help="extra logger beside metrics.jsonl: tensorboard (writes RUN/tensorboard/)"),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N; default: the preset's (arithmetic-tiny: cpu)"),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="auto (bfloat16 on a GPU, float32 on the CPU), float32 or bfloat16 (autocast; weights and optimizer stay float32); default: the preset's"),
    ] = None,
    device_map: Annotated[str, typer.Option("--device-map", hidden=True, help=REFUSED_DEVICE_MAP_HELP)] = "none",
) -> None:
    """Train with GRPO or any registered intervention and log predicted vs measured entropy change."""
    from dataclasses import replace

    check_int("--steps", steps)
    resolve_device_map(device_map, device or "auto", "train")
    refuse_ranks("train")
    if device is not None:
        check_device(device)
    if dtype is not None:
        check_choice("--dtype", dtype, DTYPES)
    items = list(set_ or [])
    for name in logger or []:
        if name != "tensorboard":
            fail(f"--logger: unknown logger {name!r}; available: tensorboard")
        items.append("log.tensorboard=true")
    items += [f"{key}={value}" for key, value in (("device", device), ("dtype", dtype)) if value is not None]
    cfg, overrides = resolve_run_config(preset, method, items, seed, steps, out, resume, profile)
    cfg = replace(cfg, **dict(zip(("device", "dtype"), resolve_placement(cfg.device, cfg.dtype))))
    with prepare_out_dir(out, "train", None):
        summary = _run(cfg, out, resume, overrides)
    _print_summary(cfg, summary)
    console.print(f"wrote {out}/metrics.jsonl, rollouts/, checkpoints/, config.yaml, summary.json")


def _run(cfg, out: Path, resume: bool, overrides: dict[str, str]) -> dict[str, Any]:
    """The run with progress bars (SFT, RL steps); a diverged run exits with EXIT_DIVERGED."""
    from entropy_lens.train import TrainingDiverged
    from entropy_lens.train import train as run_training

    with Progress(
        TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console, transient=False,
    ) as prog:
        bars: dict[str, Any] = {}

        def progress(event: str, info: dict[str, Any]) -> None:
            if event == "sft":
                if "sft" not in bars:
                    bars["sft"] = prog.add_task("sft", total=info["total"], info="")
                prog.update(bars["sft"], completed=info["step"], info=f"loss {info['loss']:.3f}")
            elif event == "start":
                bars["rl"] = prog.add_task("rl", total=info["total"], completed=info["start"], info="")
            elif event == "step":
                r = info["record"]
                ev = f"  eval {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else ""
                prog.update(bars["rl"], completed=info["step"],
                            info=f"acc {r['accuracy']:.3f}  H {r['entropy_mean']:.3f}  ΔH {r['dh_measured']:+.2f}{ev}")

        try:
            return run_training(cfg, out, resume=resume, set_items=overrides, progress=progress)
        except TrainingDiverged as exc:
            prog.stop()
            fail(str(exc), EXIT_DIVERGED)


def _print_summary(cfg, summary: dict[str, Any]) -> None:
    """The run's table: entropy and accuracy, first → last, pass@k, wall time."""
    t = Table(title=f"{cfg.preset} · {cfg.method} · seed {cfg.seed}")
    t.add_column("quantity")
    t.add_column("value", justify="right")

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    t.add_row("mean entropy, first → last step (nats)", f"{f(summary['entropy_first'])} → {f(summary['entropy_last'])}")
    t.add_row("sample accuracy, first → last step", f"{f(summary['accuracy_first'])} → {f(summary['accuracy_last'])}")
    t.add_row("greedy eval accuracy, start → end", f"{f(summary['eval_accuracy_step0'])} → {f(summary['eval_accuracy_last'])}")
    if summary.get("pass_at_k"):
        t.add_row("pass@k (eval set)", "  ".join(f"@{k} {v:.3f}" for k, v in summary["pass_at_k"].items()))
    t.add_row("wall time of the RL steps (s)", f"{summary['wall_s_steps']:.1f}")
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to the main app."""
    add_command(app, "train", train)
