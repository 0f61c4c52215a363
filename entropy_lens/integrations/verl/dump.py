"""Rollout dump in entropy_lens' rollout format (:mod:`entropy_lens.io.rollouts`)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from entropy_lens.io.writers import atomic_write_parquet


def _split_rows(values: torch.Tensor, valid: torch.Tensor) -> list[np.ndarray]:
    """Valid entries of each row of ``[B, T]`` ``values`` as B 1-D arrays (any padding side)."""
    valid = valid.bool()
    lengths = valid.sum(-1).cpu().numpy()
    flat = values[valid].detach().cpu().numpy()
    return np.split(flat, np.cumsum(lengths)[:-1])


def _per_sample(t: torch.Tensor, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """A nested ``(B, j)`` tensor, or a right-padded ``[B, T]`` one cut to ``lengths``, as B arrays."""
    if t.is_nested:
        return [x.detach().cpu().numpy() for x in t.unbind()]
    if lengths is None:
        raise ValueError(f"expected a nested (jagged) tensor, got a dense one of shape {tuple(t.shape)}")
    T = t.shape[-1]
    valid = torch.arange(T, device=t.device)[None, :] < torch.as_tensor(lengths, device=t.device)[:, None]
    return _split_rows(t, valid)


def rollout_frame(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    old_logp: Sequence[Sequence[float]],
    adv: Sequence[Sequence[float]],
    reward: Sequence[float],
    group: Sequence[Any],
    entropy: Sequence[Sequence[float]] | None = None,
    tokenizer: Any = None,
    step: int | None = None,
) -> pd.DataFrame:
    """One row per response in entropy_lens' rollout format (:mod:`entropy_lens.io.rollouts`).

    Per-token lists (one per response, each as long as its ``response_ids``): ``old_logp`` (log
    π_old of the sampled token, nats), ``adv``, optional ``entropy`` (H_old, nats). Per response:
    ``reward``, ``group``. ``prompt``/``response`` text is decoded with ``tokenizer`` when given
    (special tokens dropped; the ids stay exact), else empty. ``step``: the training step.
    """
    n = len(response_ids)
    columns = {"old_logp": old_logp, "adv": adv, "reward": reward, "group": group, "prompt_ids": prompt_ids}
    if entropy is not None:
        columns["entropy"] = entropy
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"rollout_frame: {name} has {len(col)} rows, response_ids has {n}")
    lengths = np.array([len(r) for r in response_ids])
    for name in ("old_logp", "adv") + (("entropy",) if entropy is not None else ()):
        bad = np.flatnonzero(np.array([len(x) for x in columns[name]]) != lengths)
        if len(bad):
            raise ValueError(f"rollout_frame: row {int(bad[0])}: {name} does not match the response length")
    frame = {
        "prompt": tokenizer.batch_decode([list(map(int, p)) for p in prompt_ids], skip_special_tokens=True)
        if tokenizer is not None
        else [""] * n,
        "response": tokenizer.batch_decode([list(map(int, r)) for r in response_ids], skip_special_tokens=True)
        if tokenizer is not None
        else [""] * n,
        "reward": np.asarray(reward, dtype=np.float64),
        "group": [str(g) for g in group],
        "prompt_ids": [np.asarray(p, dtype=np.int64) for p in prompt_ids],
        "response_ids": [np.asarray(r, dtype=np.int64) for r in response_ids],
        "old_logp": [np.asarray(x, dtype=np.float64) for x in old_logp],
        "adv": [np.asarray(x, dtype=np.float64) for x in adv],
    }
    if entropy is not None:
        frame["entropy"] = [np.asarray(x, dtype=np.float64) for x in entropy]
    if step is not None:
        frame["step"] = np.full(n, int(step), dtype=np.int64)
    return pd.DataFrame(frame)


def _frame_from_dataproto(batch: Any, tokenizer: Any, step: int | None) -> pd.DataFrame:
    """Rollout frame from the legacy trainer's batch (a ``DataProto`` after the actor update)."""
    b = batch.batch
    prompts, responses = b["prompts"], b["responses"]
    P = prompts.shape[1]
    attn = b["attention_mask"].bool()
    p_valid, r_valid = attn[:, :P], attn[:, P:]
    keys = set(b.keys())
    uid = batch.non_tensor_batch.get("uid") if getattr(batch, "non_tensor_batch", None) is not None else None
    return rollout_frame(
        prompt_ids=_split_rows(prompts, p_valid),
        response_ids=_split_rows(responses, r_valid),
        old_logp=_split_rows(b["old_log_probs"], r_valid),
        adv=_split_rows(b["advantages"], r_valid),
        reward=b["token_level_scores"].sum(-1).cpu().tolist(),
        group=list(uid) if uid is not None else list(range(prompts.shape[0])),
        entropy=_split_rows(b["old_entropy"], r_valid) if "old_entropy" in keys else None,
        tokenizer=tokenizer,
        step=step,
    )


#: Fields the v1 trainer keeps in its TransferQueue that the dump reads.
_V1_FIELDS = ["uid", "prompts", "responses", "rm_scores", "old_log_probs", "advantages", "entropy"]


def _frame_from_v1(batch: Any, tokenizer: Any, step: int | None) -> pd.DataFrame:
    """Rollout frame from the v1 trainer's ``KVBatchMeta`` (fields fetched from TransferQueue)."""
    import transfer_queue as tq

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=_V1_FIELDS[:-1])
    try:  # H_old is absent when verl skipped recomputing the old log-probs (bypass mode)
        entropy = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy"])["entropy"]
    except Exception:  # the store's error type for a missing field is not part of its API
        entropy = None
    prompts = _per_sample(data["prompts"])
    responses = _per_sample(data["responses"])
    lengths = np.array([len(r) for r in responses])
    scores = data["rm_scores"]
    reward = [float(x.sum()) for x in scores.unbind()] if scores.is_nested else scores.sum(-1).cpu().tolist()
    uid = data["uid"]
    return rollout_frame(
        prompt_ids=prompts,
        response_ids=responses,
        old_logp=_per_sample(data["old_log_probs"], lengths),
        adv=_per_sample(data["advantages"], lengths),
        reward=reward,
        group=list(uid.tolist() if hasattr(uid, "tolist") else uid),
        entropy=None if entropy is None else _per_sample(entropy, lengths),
        tokenizer=tokenizer,
        step=step,
    )


def _write_dump(trainer: Any, frame: pd.DataFrame, rollout_data_dir: str) -> str:
    """Write ``rollout_data_dir/entropy_lens/{step}.parquet`` (atomic), on verl's dump thread when
    the trainer has one."""
    path = os.path.join(rollout_data_dir, "entropy_lens", f"{int(getattr(trainer, 'global_steps', 0))}.parquet")
    executor = getattr(trainer, "_dump_executor", None)
    if executor is not None and not getattr(executor, "_shutdown", False):
        future = executor.submit(atomic_write_parquet, path, frame)
        futures = getattr(trainer, "_dump_futures", None)
        if isinstance(futures, list):
            futures.append(future)
    else:
        atomic_write_parquet(path, frame)
    return path
