"""`entropy-lens sample`."""

from __future__ import annotations

from pathlib import Path

import typer

from entropy_lens_cli.common import (
    ALLOW_PICKLE_HELP,
    add_command,
    check_choice,
    check_int,
    check_positive,
    console,
    input_id,
    load_checkpoint,
    prepare_out_file,
)
from entropy_lens_cli.placement import (
    DEVICE_MAP_HELP,
    device_map_record,
    quiet_status,
    rank_progress,
    rank_session,
    resolve_device_map,
    resolve_placement,
)

#: ``--kv-cache`` of the commands that generate (sample, eval).
KV_CACHE_HELP = ("dynamic (grows with the sequence) or static (pre-allocated; on CUDA transformers compiles the "
                 "decoding step for it once per batch shape, which pays off on long generations). Same tokens up "
                 "to floating-point rounding.")


def check_kv_cache(value: str) -> None:
    """``--kv-cache`` is one of :data:`entropy_lens.model.generate.KV_CACHES`."""
    from entropy_lens.model.generate import KV_CACHES

    check_choice("--kv-cache", value, KV_CACHES)


def check_top_p(option: str, value: float) -> None:
    """``option`` is a number in (0, 1] (nucleus sampling; 1 = the full softmax)."""
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{option} must be in (0, 1] (1: the full softmax), got {value}")


def check_sample_options(n: int, prompts: int | None, temperature: float, max_new_tokens: int, reward: str,
                         convention: str, batch_size: int, top_p: float = 1.0) -> None:
    """Every option of ``sample`` in range (one line naming the option, before any work)."""
    from entropy_lens.rewards import REWARDS

    check_int("-n", n)
    check_int("--prompts", prompts)
    check_positive("--temperature", temperature)
    check_top_p("--top-p", top_p)
    check_int("--max-new-tokens", max_new_tokens)
    check_choice("--reward", reward, list(REWARDS))
    check_choice("--convention", convention, ("pm1", "01"))
    check_int("--batch-size", batch_size)


def sample(
    dataset: str = typer.Option("gsm8k-demo", "--dataset", "-d", help="Shipped name (gsm8k-demo), verl-schema parquet, or problem/answer table."),
    model: str | None = typer.Option(None, "--model", help="HF folder or verl checkpoint (default: bundled SmolLM2-135M-Instruct)."),
    n: int = typer.Option(8, "-n", help="Responses per prompt."),
    prompts: int | None = typer.Option(None, "--prompts", help="Use the first K prompts."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling in (0, 1]; 1 = the full softmax. old_logp stays the full-softmax log-prob."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    reward: str = typer.Option("math", "--reward", help="Verifier: math (math-verify) or dapo."),
    convention: str = typer.Option("pm1", "--convention", help="pm1 (±1) or 01."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-batch random streams (batch k: its own stream)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Responses generated together."),
    shard_batches: int = typer.Option(8, "--shard-batches", help="Batches per resumable shard (OUT.parts/); the unit split across torchrun ranks."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N; under torchrun each rank uses cuda:LOCAL_RANK."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16; old_logp is computed in float32 from the model's logits."),
    device_map: str = typer.Option("none", "--device-map", help=DEVICE_MAP_HELP),
    kv_cache: str = typer.Option("dynamic", "--kv-cache", help=KV_CACHE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Rollouts file to write (.parquet or .jsonl)."),
) -> None:
    """Sample real rollouts with exact token ids and behaviour log-probs, scored by a verifier
    (resumable: finished shards wait in OUT.parts/). Under ``torchrun --nproc-per-node N
    --no-python entropy-lens sample ...`` the shards are split across the N ranks and rank 0
    writes the same file as one process."""
    from entropy_lens import dist
    from entropy_lens.io.datasets import load_prompts
    from entropy_lens.pipelines.sample import (
        SampleSettings,
        parts_dir_for,
        remove_parts,
        run_sample,
        shard_jobs,
        shard_layout,
    )

    check_sample_options(n, prompts, temperature, max_new_tokens, reward, convention, batch_size, top_p)
    check_int("--shard-batches", shard_batches)
    check_kv_cache(kv_cache)
    spread = resolve_device_map(device_map, device, "sample")
    device, dtype = resolve_placement(device, dtype)
    settings = SampleSettings(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                              reward=reward, convention=convention, batch_size=batch_size, shard_batches=shard_batches,
                              kv_cache=kv_cache)
    with rank_session(device) as ranks:
        with dist.agreed(ranks):
            prepare_out_file(out, (".parquet", ".jsonl"))
            table = load_prompts(dataset, prompts)
        if ranks.is_main and prompts is not None and len(table) < prompts:
            console.print(f"note: {dataset} has {len(table)} prompts; sampling all {len(table)} (--prompts {prompts})", soft_wrap=True)
        with dist.agreed(ranks), quiet_status(ranks, "loading model"):
            mdl, tok = load_checkpoint("--model", model, allow_pickle, dtype, device, spread)
        identity = {"model": input_id(model, "bundled"), "dataset": input_id(dataset, str(dataset)), "dtype": dtype,
                    "device": device.split(":")[0]}
        parts = parts_dir_for(out)
        layout = shard_layout(len(table) * n, settings)
        n_mine = sum(len(shard_jobs(layout, j, settings, len(table) * n))
                     for j in dist.shard_indices(len(layout), ranks.rank, ranks.world_size))
        who = "" if not ranks.distributed else f" (rank 0 of {ranks.world_size})"
        stages = {f"responses{who}": n_mine, "tokens": None}
        with rank_progress(ranks, stages) as advance:
            frame = run_sample(mdl, tok, table, settings, parts, identity=identity, ranks=ranks,
                               progress=lambda stage, k: advance(stage if stage == "tokens" else f"responses{who}", k))
        if frame is None:
            return
        frame.attrs["sampling"].update(model=identity["model"], dataset=identity["dataset"], device=device, dtype=dtype,
                                       **device_map_record(spread, mdl))
        write_rollout_file(out, frame)
        remove_parts(parts)
    acc = float((frame["reward"] > 0).mean())
    nucleus = f", top-p {top_p:g}" if top_p < 1 else ""
    ranks_note = f" on {ranks.world_size} ranks" if ranks.distributed else ""
    console.print(f"wrote {len(frame)} rollouts ({len(table)} prompts × {n}, τ {temperature:g}{nucleus}{ranks_note}) "
                  f"to {out}; accuracy {acc:.3f}")


def write_rollout_file(out: Path, frame) -> None:
    """Atomic parquet or JSONL."""
    from entropy_lens.io.writers import atomic_write_bytes, atomic_write_parquet

    if out.suffix == ".jsonl":
        atomic_write_bytes(out, frame.to_json(orient="records", lines=True).encode())
    else:
        atomic_write_parquet(out, frame)


def register(app: typer.Typer) -> None:
    add_command(app, "sample", sample)
