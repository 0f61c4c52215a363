"""`entropy-lens validate`: the estimators against the measured ΔH of one real optimizer step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from entropy_lens_cli.common import (
    ALLOW_PICKLE_HELP,
    add_command,
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    console,
    default_rollouts,
    estimator_table,
    input_id,
    load_checkpoint,
    write_run,
)
from entropy_lens_cli.placement import (
    REFUSED_DEVICE_MAP_HELP,
    prepare_rank_out_dir,
    quiet_status,
    rank_progress,
    rank_session,
    resolve_device_map,
    resolve_placement,
)


def check_validate_options(lr: float, optimizer: str, temperature: float, eps_low: float, eps_high: float,
                           micro_batch: int, max_samples: Optional[int], max_len: Optional[int] = None) -> None:
    """Every option of ``validate`` in range (one line naming the option, before any work)."""
    check_choice("--optimizer", optimizer, ("sgd", "adamw"))
    check_positive("--lr", lr)
    check_positive("--temperature", temperature)
    check_non_negative("--eps-low", eps_low)
    check_non_negative("--eps-high", eps_high, allow_inf=True)
    check_int("--micro-batch", micro_batch)
    check_int("--max-samples", max_samples)
    check_int("--max-len", max_len)


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
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Cut every response to its first N tokens (noted in summary.json); for runs that would not fit in memory."),
    no_jvp: bool = typer.Option(False, "--no-jvp", help="Skip the parameter-space JVP estimator."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N; under torchrun each rank uses cuda:LOCAL_RANK."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16. Low precision: the update uses an fp32 master copy and ΔH is measured in float32 (summary.json: precision, noise_floor)."),
    device_map: str = typer.Option("none", "--device-map", hidden=True, help=REFUSED_DEVICE_MAP_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
) -> None:
    """Estimators vs the measured ΔH of one real optimizer step (writes tokens.parquet, summary.json).
    Under ``torchrun --nproc-per-node N --no-python entropy-lens validate ...`` each rank takes a
    contiguous block of the sequences, the update sums the ranks' gradients (the single-process
    step) and rank 0 writes the same run as one process."""
    from entropy_lens import dist
    from entropy_lens.io import rollouts as ro
    from entropy_lens.logits import recording_paths
    from entropy_lens.pipelines.validate import (
        ValidateSettings,
        rank_rows,
        run_validate,
    )

    check_validate_options(lr, optimizer, temperature, eps_low, eps_high, micro_batch, max_samples, max_len)
    resolve_device_map(device_map, device, "validate")
    device, dtype = resolve_placement(device, dtype)
    src = rollouts if rollouts is not None else default_rollouts()
    options = {"model": input_id(model, "bundled"), "rollouts": input_id(src, ""), "lr": lr, "optimizer": optimizer,
               "temperature": temperature, "eps_low": eps_low, "eps_high": eps_high, "max_samples": max_samples,
               "max_len": max_len, "jvp": not no_jvp, "dtype": dtype}
    settings = ValidateSettings(lr=lr, optimizer=optimizer, temperature=temperature, eps_low=eps_low,
                                eps_high=eps_high, micro_batch=micro_batch, jvp=not no_jvp, max_len=max_len)
    with rank_session(device) as ranks, prepare_rank_out_dir(out, "validate", options, ranks):
        with dist.agreed(ranks):
            frame = validate_frame(ro, src, max_samples)
        t0 = time.time()
        with dist.agreed(ranks), quiet_status(ranks, "loading model"):
            mdl, tok = load_checkpoint("--model", model, allow_pickle, dtype, device)
        rows = rank_rows(len(frame), ranks.rank, ranks.world_size)
        n = rows.stop - rows.start
        stages = {"forward": n, "update": n, "forward after": n}
        if not no_jvp:
            stages["jvp"] = n
        with rank_progress(ranks, stages) as advance, recording_paths() as paths:
            result = run_validate(mdl, tok, frame, settings, str(src), progress=advance, ranks=ranks)
        paths = dist.sum_counts(ranks, paths)  # every rank's rows, as one process would count them
        if result is None:
            return
        tokens, summary = result
        placement = {"device": device, "dtype": dtype}
        summary.update(model=model or "bundled:smollm2-135m-instruct", rollouts=str(src), **placement,
                       statistics_path=paths, wall_seconds=round(time.time() - t0, 1))
        write_run(out, tokens, summary, {"command": "validate", "model": summary["model"], "rollouts": str(src),
                                         **placement, "world_size": ranks.world_size, **summary["settings"]}, options)
    print_validation(summary, optimizer, lr)
    console.print(f"wrote {out}/tokens.parquet, {out}/summary.json")


def validate_frame(ro, src: Path, max_samples: Optional[int]):
    """The rollouts of ``src`` (the first ``max_samples`` when given), with a ``reward`` column
    (math-verify on ``ground_truth`` when the rollouts carry none)."""
    frame = ro.load_rollouts(src)
    if max_samples:
        frame = ro.validate_rollouts(frame.head(max_samples), src)
    if "reward" not in frame.columns:
        from entropy_lens.rewards import score_batch

        frame["reward"] = score_batch(frame["response"].tolist(), frame["ground_truth"].astype(str).tolist(), "math")
    return frame


def print_validation(summary: dict, optimizer: str, lr: float) -> None:
    """The estimator table, the measurement against its noise floor, and the notes."""
    console.print(estimator_table(summary["estimators"], f"ΔH estimators vs measured ({optimizer}, lr={lr:g}, "
                                                         f"{summary['n_tokens']} tokens)"))
    floor = summary["noise_floor"]
    console.print(f"measured in {floor['measuring_dtype']}: median |ΔH| {floor['step_abs_dh']['p50']:.3e}, "
                  f"noise floor (η = 0) median {floor['floor_abs_dh']['p50']:.3e}")
    for note in summary["notes"]:
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    add_command(app, "validate", validate)
