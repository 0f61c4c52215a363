"""`entropy-lens analyze`."""

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
    input_id,
    load_checkpoint,
    write_run,
)
from entropy_lens_cli.placement import (
    DEVICE_MAP_HELP,
    device_map_record,
    prepare_rank_out_dir,
    quiet_status,
    rank_progress,
    rank_session,
    resolve_device_map,
    resolve_placement,
)


def analyze(
    rollouts: Optional[Path] = typer.Option(None, "--rollouts", "-r", help="Rollouts: parquet/JSONL, a verl dump file or rollout_data_dir. Default: shipped rollouts."),
    model: Optional[str] = typer.Option(None, "--model", help="HF folder or verl checkpoint (default: bundled model)."),
    next_model: Optional[str] = typer.Option(None, "--next-model", help="A later checkpoint: dh_measured = its entropy minus the first's."),
    reward: Optional[str] = typer.Option(None, "--reward", help="Score ground_truth with math or dapo instead of the reward column."),
    lr: float = typer.Option(1e-6, "--lr", help="η that scales the closed-form predictions."),
    temperature: float = typer.Option(1.0, "--temperature"),
    eps_low: float = typer.Option(0.2, "--eps-low"),
    eps_high: float = typer.Option(0.2, "--eps-high"),
    advantage: str = typer.Option("grpo", "--advantage", help="grpo, dr_grpo, rloo or opo."),
    shard_size: int = typer.Option(64, "--shard-size", help="Sequences per resumable shard."),
    micro_batch: int = typer.Option(4, "--micro-batch"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N; under torchrun each rank uses cuda:LOCAL_RANK."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16. Statistics are reduced in float32."),
    device_map: str = typer.Option("none", "--device-map", help=DEVICE_MAP_HELP),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the figures the run supports into OUT/figures."),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """Per-token statistics, estimators and quadrants of a checkpoint on rollouts (resumable);
    tokens.parquet, summary.json and figures/ (PNG + CSV) in OUT. Under
    ``torchrun --nproc-per-node N --no-python entropy-lens analyze ...`` the shards are split
    across the N ranks and rank 0 writes the same run as one process."""
    from entropy_lens import dist
    from entropy_lens.io import rollouts as ro
    from entropy_lens.pipelines.analyze import AnalyzeSettings

    check_analyze_options(reward, lr, temperature, eps_low, eps_high, advantage, shard_size, micro_batch)
    spread = resolve_device_map(device_map, device, "analyze")
    device, dtype = resolve_placement(device, dtype)
    src = rollouts if rollouts is not None else default_rollouts()
    options = {"model": input_id(model, "bundled"), "next_model": input_id(next_model, ""), "rollouts": input_id(src, ""),
               "reward": reward, "lr": lr, "temperature": temperature, "eps_low": eps_low, "eps_high": eps_high,
               "advantage": advantage, "shard_size": shard_size, "dtype": dtype}
    settings = AnalyzeSettings(lr=lr, temperature=temperature, eps_low=eps_low, eps_high=eps_high,
                               advantage=advantage, micro_batch=micro_batch, shard_size=shard_size)
    with rank_session(device) as ranks, prepare_rank_out_dir(out, "analyze", options, ranks):
        with dist.agreed(ranks):
            frame = with_rewards(ro.load_rollouts(src), reward, src)
        placement = {"device": device, "dtype": dtype, "device_map": spread}
        summary = analyze_into(out, frame, src, (model, next_model), settings, allow_pickle, options, placement, ranks)
        if not ranks.is_main:
            return
        print_analysis(summary)
        console.print(f"wrote {out}/tokens.parquet, {out}/summary.json")
        if figures:
            from entropy_lens.plots import save_run_figures

            names = save_run_figures(out, out / "figures")
            console.print(f"wrote {len(names)} figures (PNG + CSV) to {out}/figures: {', '.join(names)}")


def check_analyze_options(reward: Optional[str], lr: float, temperature: float, eps_low: float, eps_high: float,
                          advantage: str, shard_size: int, micro_batch: int) -> None:
    """Every option of ``analyze`` in range (one line naming the option, before any work)."""
    from entropy_lens.advantages import ADVANTAGES

    if reward is not None:
        check_choice("--reward", reward, ("math", "dapo"))
    check_positive("--lr", lr)
    check_positive("--temperature", temperature)
    check_non_negative("--eps-low", eps_low)
    check_non_negative("--eps-high", eps_high, allow_inf=True)
    check_choice("--advantage", advantage, list(ADVANTAGES))
    check_int("--shard-size", shard_size)
    check_int("--micro-batch", micro_batch)


def with_rewards(frame, reward: Optional[str], src: Path):
    """``frame`` with a ``reward`` column: ground_truth scored with ``reward`` when given (or when
    the rollouts carry no reward, with math-verify), else as recorded."""
    from entropy_lens.rewards import score_batch

    if reward is not None:
        if "ground_truth" not in frame.columns:
            raise ValueError(f"{src}: --reward {reward} needs a ground_truth column")
        frame["reward"] = score_batch(frame["response"].tolist(), frame["ground_truth"].astype(str).tolist(), reward)
    elif "reward" not in frame.columns:
        frame["reward"] = score_batch(frame["response"].tolist(), frame["ground_truth"].astype(str).tolist(), "math")
    return frame


def analyze_into(out: Path, frame, src: Path, models: tuple[Optional[str], Optional[str]], settings,
                 allow_pickle: bool, options: dict, placement: dict, ranks) -> dict | None:
    """Load the checkpoint(s) (``models``: ``--model``, ``--next-model``) on ``placement``'s device
    and dtype, or spread by its ``device_map`` (None: not spread; recorded as ``device_map`` and
    ``model_devices``: :func:`device_map_record`), run the analysis (shards in OUT/shards; this rank's share of them) and, on
    rank 0, write the run; returns the summary there (None on the other ranks)."""
    from entropy_lens import dist
    from entropy_lens.logits import recording_paths
    from entropy_lens.pipelines.analyze import check_same_vocab, run_analyze

    model, next_model = models
    t0 = time.time()
    where = (placement["dtype"], placement["device"], placement["device_map"])
    with dist.agreed(ranks), quiet_status(ranks, "loading model"):
        mdl, tok = load_checkpoint("--model", model, allow_pickle, *where)
        nxt = None
        if next_model is not None:
            nxt, _ = load_checkpoint("--next-model", next_model, allow_pickle, *where)
            check_same_vocab(mdl, nxt, str(next_model))
    placement = {**placement, **device_map_record(placement["device_map"], mdl, nxt)}
    mine = dist.shard_indices(-(-len(frame) // settings.shard_size), ranks.rank, ranks.world_size)
    rows = [i for k in mine for i in range(k * settings.shard_size, min((k + 1) * settings.shard_size, len(frame)))]
    n_tok = estimate_tokens(frame.iloc[rows], tok)
    stage = "tokens" if not ranks.distributed else f"tokens (rank 0 of {ranks.world_size})"
    with rank_progress(ranks, {stage: n_tok}) as advance, recording_paths() as paths:
        result = run_analyze(mdl, tok, frame, settings, out / "shards", next_model=nxt,
                             model_names=(str(model or "bundled"), str(next_model or "")),
                             source=str(src), progress=lambda _, n: advance(stage, n), ranks=ranks)
    paths = dist.sum_counts(ranks, paths)  # every rank's rows, as one process would count them
    if result is None:
        return None
    tokens, summary = result
    summary.update(model=str(model or "bundled:smollm2-135m-instruct"), next_model=next_model, rollouts=str(src),
                   **placement, statistics_path=paths, wall_seconds=round(time.time() - t0, 1))
    write_run(out, tokens, summary, {"command": "analyze", "model": summary["model"], "next_model": next_model,
                                     "rollouts": str(src), **placement, "world_size": ranks.world_size,
                                     **summary["settings"]}, options)
    return summary


def estimate_tokens(frame, tokenizer) -> int:
    """Response tokens to process (exact when ids are given)."""
    if "response_ids" in frame.columns:
        return int(sum(len(r) for r in frame["response_ids"]))
    return int(sum(len(tokenizer(str(r), add_special_tokens=False)["input_ids"]) for r in frame["response"]))


def print_analysis(summary: dict) -> None:
    from rich.table import Table

    from entropy_lens_cli.common import estimator_table

    t = Table(title=f"Quadrants ({summary['n_tokens']} tokens, mean H {summary['mean_entropy']:.3f} nats)")
    for c in ("quadrant", "token share", "Σ omega_paper", "Σ dh_all_logit", "Σ dh_measured"):
        t.add_column(c, justify="right")
    for q, row in summary["quadrants"].items():
        meas = row.get("dh_measured")
        t.add_row(q, f"{row['token_share']:.3f}", f"{row['omega_paper']:.3e}", f"{row['dh_all_logit']:.3e}",
                  "-" if meas is None else f"{meas:.3e}")
    console.print(t)
    if "estimators" in summary:
        console.print(estimator_table(summary["estimators"], "Estimators vs the change between checkpoints"))
    for note in summary["notes"]:
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    add_command(app, "analyze", analyze)
