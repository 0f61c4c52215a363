"""`sample`: real rollouts from a model on a prompt dataset, scored by a verifier.

The responses are laid out prompt-major (prompt i's ``n`` copies next to each other) and cut into
consecutive batches of ``batch_size`` responses; batch k is sampled from its own random stream
(:func:`entropy_lens.model.generate.batch_seed`), so its responses do not depend on which other
batches the same process ran. ``shard_batches`` consecutive batches make one resumable shard,
written atomically to ``parts_dir/shard_XXXXX.parquet`` and skipped on a rerun. With several ranks
(:mod:`entropy_lens.dist`) rank r samples shards r, r + N, r + 2N, ... and rank 0 merges them all:
the merged rollouts are the ones a single process writes with the same settings (bit for bit on the
same device, dtype and CPU thread count: the same batches, seeds and arithmetic).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens import dist
from entropy_lens.io.prompts import chat_prompt_ids
from entropy_lens.io.tables import InputError, read_json, read_parquet
from entropy_lens.io.writers import atomic_write_json, atomic_write_parquet
from entropy_lens.model.generate import (
    check_kv_cache,
    check_top_p,
    generate_batches,
    response_jobs,
)
from entropy_lens.rewards import score_batch

#: ``progress(stage, n)``: ``("responses", k)`` and ``("tokens", t)`` after each batch.
Progress = Callable[[str, int], None]

#: Columns of a shard file (one row per response, ``job`` = its index in the prompt-major order).
SHARD_COLUMNS = ("job", "prompt_index", "response_ids", "old_logp", "finished", "response", "reward")


@dataclass(frozen=True)
class SampleSettings:
    """``n`` responses per prompt at ``temperature`` τ (nucleus ``top_p``; 1: the full softmax), up
    to ``max_new_tokens`` each, ``seed`` of the per-batch streams, ``reward`` verifier (``math`` or
    ``dapo``) with ``convention`` (``pm1``: ±1, ``01``), ``batch_size`` responses per generate call
    and ``shard_batches`` batches per resumable shard; ``kv_cache`` of the generation loop
    (:data:`entropy_lens.model.generate.KV_CACHES`)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    reward: str = "math"
    convention: str = "pm1"
    batch_size: int = 16
    shard_batches: int = 8
    kv_cache: str = "dynamic"


def check_sample_settings(s: SampleSettings) -> None:
    """Raise ``ValueError`` (one line naming the setting) unless every setting is in range."""
    for name in ("n", "max_new_tokens", "batch_size", "shard_batches"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v}")
    if not (s.temperature > 0 and s.temperature != float("inf")):
        raise ValueError(f"temperature must be > 0 and finite, got {s.temperature}")
    check_top_p(s.top_p)
    check_kv_cache(s.kv_cache)


def shard_layout(n_responses: int, settings: SampleSettings) -> list[list[int]]:
    """The batch numbers of every shard, in order: shard j holds batches
    ``j·shard_batches .. (j+1)·shard_batches − 1`` below ``ceil(n_responses / batch_size)``."""
    n_batches = -(-n_responses // settings.batch_size)
    step = settings.shard_batches
    return [list(range(j, min(j + step, n_batches))) for j in range(0, n_batches, step)]


def shard_jobs(layout: list[list[int]], j: int, settings: SampleSettings, n_responses: int) -> list[int]:
    """The response indices (prompt-major order) of shard ``j``."""
    bs = settings.batch_size
    return [i for k in layout[j] for i in range(k * bs, min((k + 1) * bs, n_responses))]


def shard_path(parts_dir: Path, j: int) -> Path:
    """File of shard ``j``."""
    return Path(parts_dir) / f"shard_{j:05d}.parquet"


def parts_dir_for(out: str | Path) -> Path:
    """The folder of the resumable shards beside the rollout file ``out``: ``OUT.parts``."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def fingerprint(prompt_ids: list[list[int]], settings: SampleSettings, identity: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the settings, ``identity`` (model, dataset, dtype, device
    type: what else decides the responses) and every prompt's ids."""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(settings), identity], sort_keys=True, default=str).encode())
    for p in prompt_ids:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def open_parts_dir(parts_dir: Path, fp: str, settings: SampleSettings, identity: dict[str, Any]) -> None:
    """Check ``parts_dir``'s manifest against this run's fingerprint (InputError: shards of another
    run), or create the folder and write the manifest."""
    manifest = Path(parts_dir) / "manifest.json"
    if manifest.exists():
        if read_json(manifest).get("fingerprint") != fp:
            raise InputError(f"{parts_dir}: holds shards of a different sample run (other prompts, model or "
                             "settings); remove it or write to another -o")
        return
    if parts_dir.exists() and not parts_dir.is_dir():
        raise InputError(f"{parts_dir}: is a file, not the folder of the run's shards")
    parts_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, {"fingerprint": fp, "settings": asdict(settings), "identity": identity})


def read_shard(path: Path, expected_jobs: list[int]) -> pd.DataFrame:
    """A finished shard file, checked: its columns and the responses it must hold."""
    part = read_parquet(path)
    missing = [c for c in SHARD_COLUMNS if c not in part.columns]
    if missing:
        raise InputError(f"{path}: not a sample shard (missing columns {', '.join(missing)}); remove it to sample it again")
    if part["job"].tolist() != expected_jobs:
        raise InputError(f"{path}: holds other responses than its shard's; remove it to sample it again")
    return part


def sample_shard(model, tokenizer, jobs: list[tuple[int, list[int]]], batches: list[int], ground_truth: list[str],
                 settings: SampleSettings, progress: Progress | None = None) -> pd.DataFrame:
    """The responses of ``batches`` (:func:`entropy_lens.model.generate.generate_batches`), decoded
    and scored: one row per response with :data:`SHARD_COLUMNS`; ``old_logp`` in nats (fp32
    values), ``reward`` in the settings' convention."""

    def tick(k: int, tokens: int) -> None:
        if progress:
            progress("responses", k)
            progress("tokens", tokens)

    outs = generate_batches(model, tokenizer, jobs, batches, settings.batch_size, settings.max_new_tokens,
                            settings.temperature, settings.seed, progress=tick, top_p=settings.top_p,
                            kv_cache=settings.kv_cache)
    rows = [(k * settings.batch_size + r, o) for k in batches for r, o in enumerate(outs[k])]
    texts = [tokenizer.decode(o["response_ids"], skip_special_tokens=True) for _, o in rows]
    rewards = score_batch(texts, [ground_truth[o["prompt_index"]] for _, o in rows], settings.reward,
                          settings.convention)
    return pd.DataFrame({
        "job": np.asarray([j for j, _ in rows], dtype=np.int64),
        "prompt_index": np.asarray([o["prompt_index"] for _, o in rows], dtype=np.int64),
        "response_ids": [list(o["response_ids"]) for _, o in rows],
        "old_logp": [list(o["old_logp"]) for _, o in rows],
        "finished": [bool(o["finished"]) for _, o in rows],
        "response": texts,
        "reward": np.asarray(rewards, dtype=np.float64),
    })


def compute_shards(model, tokenizer, jobs, layout: list[list[int]], shards: list[int], ground_truth: list[str],
                   settings: SampleSettings, parts_dir: Path, progress: Progress | None = None) -> None:
    """Sample the shards numbered ``shards`` into ``parts_dir`` (atomic files); a shard whose file
    exists is read back and checked instead (resume)."""
    for j in shards:
        path = shard_path(parts_dir, j)
        expected = shard_jobs(layout, j, settings, len(jobs))
        if path.exists():
            read_shard(path, expected)
            if progress:
                progress("responses", len(expected))
            continue
        part = sample_shard(model, tokenizer, jobs, layout[j], ground_truth, settings, progress)
        atomic_write_parquet(path, part)


def merge_shards(prompts: pd.DataFrame, prompt_ids: list[list[int]], jobs, layout: list[list[int]],
                 settings: SampleSettings, parts_dir: Path) -> pd.DataFrame:
    """Every shard file in order as the rollout frame (:func:`sample_rollouts`' columns)."""
    parts = [read_shard(shard_path(parts_dir, j), shard_jobs(layout, j, settings, len(jobs)))
             for j in range(len(layout))]
    return rollout_frame(prompts, prompt_ids, pd.concat(parts, ignore_index=True))


def rollout_frame(prompts: pd.DataFrame, prompt_ids: list[list[int]], raw: pd.DataFrame) -> pd.DataFrame:
    """The rollout frame of shard rows ``raw`` (:data:`SHARD_COLUMNS`, in job order): the prompt,
    its ground truth and ids, ``group`` = the prompt's index, plain Python lists of ids and
    log-probs."""
    pi = raw["prompt_index"].to_numpy()
    return pd.DataFrame({
        "prompt": [list(prompts["prompt"].iloc[i]) for i in pi],
        "response": raw["response"].astype(str).tolist(),
        "reward": raw["reward"].astype(np.float64).tolist(),
        "ground_truth": [str(prompts["ground_truth"].iloc[i]) for i in pi],
        "group": [str(i) for i in pi],
        "prompt_ids": [list(prompt_ids[i]) for i in pi],
        "response_ids": [[int(t) for t in r] for r in raw["response_ids"]],
        "old_logp": [[float(x) for x in r] for r in raw["old_logp"]],
        "finished": [bool(f) for f in raw["finished"]],
    })


def remove_parts(parts_dir: Path) -> None:
    """Remove the shards folder once the merged rollout file is written."""
    shutil.rmtree(parts_dir, ignore_errors=True)


def sampling_metadata(settings: SampleSettings, world_size: int) -> dict[str, Any]:
    """``frame.attrs["sampling"]``: the settings, the per-batch seeding and the world size."""
    meta = asdict(settings)
    meta.update(seeding="per-batch", world_size=world_size)
    return meta


def run_sample(
    model,
    tokenizer,
    prompts: pd.DataFrame,
    settings: SampleSettings,
    parts_dir: Path,
    identity: dict[str, Any] | None = None,
    progress: Progress | None = None,
    ranks: dist.Ranks = dist.SINGLE,
) -> pd.DataFrame | None:
    """``settings.n`` responses per prompt of ``prompts`` (columns ``prompt``: chat messages,
    ``ground_truth``) as a rollout frame on rank 0 (None on the other ranks): ``prompt, response,
    reward, ground_truth, group, prompt_ids, response_ids, old_logp, finished``, prompt-major,
    ``old_logp`` the log-prob (nats) of each sampled token under the full softmax at τ (also with
    ``top_p < 1``). ``frame.attrs["sampling"]`` holds :func:`sampling_metadata`.

    Rank r of N samples shards r, r + N, ... into ``parts_dir`` (existing shard files are kept:
    resume, with any number of ranks); rank 0 writes or checks the manifest first and merges after
    every rank agreed that its shards are written (:func:`entropy_lens.dist.agreed`: a failure on any
    rank raises :class:`entropy_lens.dist.RankFailed` on all of them before anything is merged).
    ``identity`` (model, dataset, dtype, device type) enters the manifest's fingerprint.
    ``progress(stage, n)``: ``("responses", k)`` and ``("tokens", t)`` for this rank's batches.
    The caller removes ``parts_dir`` (:func:`remove_parts`) once the merged frame is written."""
    check_sample_settings(settings)
    identity = dict(identity or {})
    with dist.agreed(ranks):
        prompt_ids = [chat_prompt_ids(tokenizer, list(m)) for m in prompts["prompt"]]
        ground_truth = [str(g) for g in prompts["ground_truth"]]
        jobs = response_jobs(prompt_ids, settings.n)
        layout = shard_layout(len(jobs), settings)
        if ranks.is_main:
            open_parts_dir(Path(parts_dir), fingerprint(prompt_ids, settings, identity), settings, identity)
    with dist.agreed(ranks):
        compute_shards(model, tokenizer, jobs, layout, dist.shard_indices(len(layout), ranks.rank, ranks.world_size),
                       ground_truth, settings, Path(parts_dir), progress)
    if not ranks.is_main:
        return None
    frame = merge_shards(prompts, prompt_ids, jobs, layout, settings, Path(parts_dir))
    frame.attrs["sampling"] = sampling_metadata(settings, ranks.world_size)
    return frame


def sample_rollouts(
    model,
    tokenizer,
    prompts: pd.DataFrame,
    n: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    reward: str = "math",
    convention: str = "pm1",
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    top_p: float = 1.0,
) -> pd.DataFrame:
    """``n`` responses per prompt of ``prompts`` (columns prompt, ground_truth) as a rollout frame,
    in one process and in memory (no shard files): :func:`run_sample`'s frame, with the same
    per-batch seeding. ``progress(k)`` after each batch of k responses."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    settings = SampleSettings(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                              reward=reward, convention=convention, batch_size=batch_size)
    check_sample_settings(settings)
    prompt_ids = [chat_prompt_ids(tokenizer, list(m)) for m in prompts["prompt"]]
    jobs = response_jobs(prompt_ids, n)
    batches = list(range(-(-len(jobs) // batch_size)))

    def tick(stage: str, k: int) -> None:
        if progress and stage == "responses":
            progress(k)

    part = sample_shard(model, tokenizer, jobs, batches, [str(g) for g in prompts["ground_truth"]], settings, tick)
    frame = rollout_frame(prompts, prompt_ids, part)
    frame.attrs["sampling"] = sampling_metadata(settings, 1)
    return frame
