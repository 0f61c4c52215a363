"""Instrument a checkpoint on recorded rollouts: per-token statistics, estimators, quadrants.

Work is split into shards of sequences; each shard's raw statistics are written to
``shard_dir/shard_XXXXX.parquet`` (atomically) and skipped on a rerun, so an interrupted run
resumes where it stopped. Advantages and the closed-form estimators need batch-wide quantities
(group statistics, covariance means), so they are computed once over all shards at the end.
With a second checkpoint (``next_model``), ``dh_measured`` = H_next − H at every token.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from entropy_lens import dist
from entropy_lens import estimators as est
from entropy_lens.advantages import ADVANTAGES
from entropy_lens.io.rollouts import Tokenized
from entropy_lens.io.tables import InputError, read_json, read_parquet
from entropy_lens.io.writers import atomic_write_json, atomic_write_parquet
from entropy_lens.model.forward import PackedBatch, response_stats
from entropy_lens.model.load import model_device, model_dtype
from entropy_lens.pipelines.prepare import (
    BatchSettings,
    Prepared,
    prepare,
    token_batch,
    token_texts,
)
from entropy_lens.scoring import quadrant_table, score_frame, zero_advantage_notes
from entropy_lens.tokens import TokenBatch, frame_grid

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class AnalyzeSettings(BatchSettings):
    """:class:`BatchSettings` (``lr`` only scales the predictions) plus ``shard_size``: sequences
    per resumable shard."""

    shard_size: int = 64


def check_settings(settings: AnalyzeSettings) -> None:
    """Raise ``ValueError`` (one line naming the setting) unless every setting is in range: η and τ
    finite and > 0, clip bounds >= 0 (``eps_high`` may be inf), a known advantage estimator, and
    ``micro_batch``/``shard_size`` integers >= 1. Checked before any file is written, so a bad
    setting never leaves a manifest behind that a later, correct run would refuse."""
    for name in ("lr", "temperature"):
        v = getattr(settings, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be > 0 and finite, got {v}")
    if not (math.isfinite(settings.eps_low) and settings.eps_low >= 0):
        raise ValueError(f"eps_low must be >= 0 and finite, got {settings.eps_low}")
    if not settings.eps_high >= 0:
        raise ValueError(f"eps_high must be >= 0, got {settings.eps_high}")
    if settings.advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {settings.advantage!r}")
    for name in ("micro_batch", "shard_size"):
        v = getattr(settings, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v}")


def check_same_vocab(model_a, model_b, name_b: str) -> None:
    """Raise when two checkpoints' output vocabularies differ (ΔH would compare other tokens)."""
    va = model_a.get_output_embeddings().weight.shape[0]
    vb = model_b.get_output_embeddings().weight.shape[0]
    if va != vb:
        raise InputError(f"{name_b}: vocabulary of {vb} tokens differs from the first model's {va}")


def _fingerprint(tok: Tokenized, settings: AnalyzeSettings, models: list[str], dtype: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([settings.temperature, settings.shard_size, models, dtype]).encode())
    for p, r in zip(tok.prompt_ids, tok.response_ids):
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|" + np.asarray(r, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def shard_frame(model, next_model, packed: PackedBatch, start: int, settings: AnalyzeSettings) -> pd.DataFrame:
    """Raw per-token statistics of one shard of sequences (global ``sample`` index from ``start``).

    The packed batch goes to each model's device once; the statistics come back as fp32 on the
    CPU (:func:`entropy_lens.model.forward.response_stats`) and are stored as float64."""
    st = response_stats(model, packed.to(model_device(model)), settings.temperature, micro_batch=settings.micro_batch)
    m = packed.mask
    b_idx, t_idx = torch.nonzero(m, as_tuple=True)
    cols = {
        "sample": (b_idx + start).numpy(),
        "pos": t_idx.numpy(),
        "token_id": packed.response_ids[m].numpy(),
        **{k: st[k][m].double().numpy() for k in ("logp", "entropy", "sum_p2", "sum_p2_logp")},
    }
    if next_model is not None:
        nxt = response_stats(next_model, packed.to(model_device(next_model)), settings.temperature,
                             micro_batch=settings.micro_batch)
        cols["entropy_next"] = nxt["entropy"][m].double().numpy()
        cols["logp_next"] = nxt["logp"][m].double().numpy()
    return pd.DataFrame(cols)


def shard_bounds(n_sequences: int, shard_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` sequence range of every shard, in order (shard k: ``shard_XXXXX.parquet``)."""
    return [(start, min(start + shard_size, n_sequences)) for start in range(0, n_sequences, shard_size)]


def shard_path(shard_dir: Path, k: int) -> Path:
    """File of shard ``k``."""
    return shard_dir / f"shard_{k:05d}.parquet"


def open_shard_dir(shard_dir: Path, fingerprint: str, settings: AnalyzeSettings, models: list[str]) -> None:
    """Check the manifest of ``shard_dir`` against this run's ``fingerprint`` (InputError: shards of
    another run), or create the folder and write the manifest."""
    manifest = shard_dir / "manifest.json"
    if manifest.exists():
        prev = read_json(manifest)
        if prev.get("fingerprint") != fingerprint:
            raise InputError(
                f"{shard_dir}: holds shards of a different run (other rollouts, models or settings); "
                "use another output folder"
            )
    else:
        shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, {"fingerprint": fingerprint, "settings": asdict(settings), "models": models})


def compute_shards(model, next_model, prep: Prepared, settings: AnalyzeSettings, shard_dir: Path,
                   shards: list[int], progress: Progress | None = None) -> dict[int, pd.DataFrame]:
    """Raw statistics of the shards numbered ``shards``: read back where the file exists (resume),
    else computed and written atomically; ``progress("tokens", n)`` after each. Returns them by
    shard number."""
    bounds = shard_bounds(prep.n_sequences, settings.shard_size)
    parts = {}
    for k in shards:
        start, stop = bounds[k]
        path = shard_path(shard_dir, k)
        if path.exists():
            part = read_parquet(path)
        else:
            part = shard_frame(model, next_model, prep.packed(start, stop), start, settings)
            atomic_write_parquet(path, part)
        parts[k] = part
        if progress:
            progress("tokens", int(sum(prep.lengths[start:stop])))
    return parts


def run_analyze(
    model,
    tokenizer,
    rollouts: pd.DataFrame,
    settings: AnalyzeSettings,
    shard_dir: Path,
    next_model=None,
    model_names: tuple[str, ...] = ("model",),
    source: str = "<rollouts>",
    progress: Progress | None = None,
    ranks: dist.Ranks = dist.SINGLE,
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Analyze ``rollouts`` (validated frame); returns ``(tokens frame, summary)`` on rank 0 and
    None on the other ranks.

    With several ranks (:mod:`entropy_lens.dist`), rank r computes shards r, r + N, ...; rank 0
    checks or writes the manifest first and merges every shard file at the end, after all ranks
    agreed that their shards are written (a failure on any rank raises
    :class:`entropy_lens.dist.RankFailed` on all of them, before anything is merged). The merged
    frame and summary equal a single process's; ``summary["world_size"]`` records N.
    ``progress("tokens", n)`` is called with the response tokens of each of this rank's finished
    shards. The settings are checked first (:func:`check_settings`) and ``shard_dir`` and its
    manifest are written only once the rollouts are tokenised, so bad input leaves no files behind.
    """
    check_settings(settings)
    with dist.agreed(ranks):
        prep = prepare(rollouts, tokenizer, source)
        fp = _fingerprint(prep.tok, settings, list(model_names), model_dtype(model))
        if ranks.is_main:
            open_shard_dir(shard_dir, fp, settings, list(model_names))
    n_shards = len(shard_bounds(prep.n_sequences, settings.shard_size))
    with dist.agreed(ranks):
        mine = compute_shards(model, next_model, prep, settings, shard_dir,
                              dist.shard_indices(n_shards, ranks.rank, ranks.world_size), progress)
    if not ranks.is_main:
        return None
    parts = [mine[k] if k in mine else read_parquet(shard_path(shard_dir, k)) for k in range(n_shards)]
    raw = pd.concat(parts, ignore_index=True)
    frame, batch = finish_frame(raw, prep, settings, tokenizer)
    summary = summarize_analysis(frame, batch, settings, prep.tok)
    summary["world_size"] = ranks.world_size
    return frame, summary


def finish_frame(raw: pd.DataFrame, prep: Prepared, settings: AnalyzeSettings, tokenizer) -> tuple[pd.DataFrame, TokenBatch]:
    """Batch-wide columns over all shards (float64): advantages, ratio, I_clip, estimators, quadrant."""
    shape = (prep.n_sequences, max(prep.lengths))
    mask = frame_grid(raw, None, shape, torch.bool)
    stats = {k: frame_grid(raw, k, shape, torch.float64) for k in ("logp", "entropy", "sum_p2", "sum_p2_logp")}
    batch = token_batch(stats, frame_grid(raw, "token_id", shape, torch.long), mask, prep.old_logp, prep.reward,
                        prep.group_id, settings.advantage, settings.temperature)
    cols = est.closed_form_columns(batch, settings.lr, settings.eps_low, settings.eps_high, settings.dual_clip)
    if "entropy_next" in raw.columns:
        cols["dh_measured"] = torch.where(mask, frame_grid(raw, "entropy_next", shape, torch.float64) - batch.entropy, 0.0)
    frame = batch.to_frame(extra=cols, token_text=token_texts(tokenizer, prep.tok.response_ids))
    frame["quadrant"] = frame["quadrant"].astype(np.int8)
    return frame, batch


def position_profile(frame: pd.DataFrame, bins: int = 10) -> list[dict[str, float]]:
    """Mean entropy (nats) by relative position in the response, ``bins`` equal-width bins."""
    length = frame.groupby("sample")["pos"].transform("max") + 1
    rel = (frame["pos"] / length).clip(upper=1 - 1e-9)
    b = (rel * bins).astype(int)
    g = frame.groupby(b)["entropy"].agg(["mean", "count"])
    return [{"bin": int(i), "from": i / bins, "to": (i + 1) / bins, "mean_entropy": float(r["mean"]), "n": int(r["count"])}
            for i, r in g.iterrows()]


def summarize_analysis(frame: pd.DataFrame, batch: TokenBatch, settings: AnalyzeSettings, tok: Tokenized) -> dict[str, Any]:
    """summary.json of ``analyze``."""
    L = batch.n_tokens
    top = frame.reindex(frame["omega_paper"].abs().sort_values(ascending=False).index).head(20)
    summary: dict[str, Any] = {
        "n_sequences": int(batch.mask.shape[0]),
        "n_tokens": L,
        "n_groups": int(batch.group_id.unique().numel()),
        "settings": asdict(settings),
        "mean_entropy": float(frame["entropy"].mean()),
        "mean_reward": float(batch.reward.mean()),
        "quadrants": quadrant_table(
            frame["quadrant"].to_numpy(),
            {c: frame[c].to_numpy() for c in ("omega_paper", "dh_all_logit", "dh_cov", "dh_measured") if c in frame.columns},
        ),
        "entropy_by_position": position_profile(frame),
        "top_tokens_by_abs_omega": [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in top[["sample", "pos", "token", "logp", "entropy", "adv", "omega_paper", "quadrant"]].to_dict("records")
        ],
        "retokenized": tok.retokenized,
        "notes": list(tok.notes),
    }
    summary["notes"] += zero_advantage_notes(batch.group_id, batch.adv.abs().amax(-1))
    if "dh_measured" in frame.columns:
        summary["estimators"] = score_frame(frame, settings.lr, L, ("omega_paper", "omega_code", "dh_all_logit", "dh_cov"))
        summary["notes"].append(
            "dh_measured is the change between two checkpoints; closed-form predictions are scaled by --lr "
            "(compare correlations, and totals only if --lr matches the real update)"
        )
    return summary
