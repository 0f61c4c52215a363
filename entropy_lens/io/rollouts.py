"""Rollout files: one row per response (parquet or JSONL).

Columns: ``prompt`` (text, or chat messages ``[{role, content}, ...]``), ``response`` (text),
``reward`` or ``ground_truth`` (scored by a verifier), optional ``group`` (default: rows with the
same prompt form a group), optional exact ``prompt_ids`` / ``response_ids`` (token ids) and
``old_logp`` (per response token, the behaviour policy's log-probs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens.io.prompts import as_messages, chat_prompt_ids
from entropy_lens.io.tables import InputError, read_table

REQUIRED = ("prompt", "response")


def prompt_key(prompt: Any) -> str:
    """Hashable identity of a prompt (text, or JSON of its messages)."""
    msgs = as_messages(prompt)
    return json.dumps(msgs, sort_keys=True) if msgs is not None else str(prompt)


def validate_rollouts(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Check columns and values; return a clean frame with an integer ``group_id`` column."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if "reward" not in df.columns and "ground_truth" not in df.columns:
        missing.append("reward (or ground_truth)")
    if missing:
        raise InputError(f"{path}: missing column(s): {', '.join(missing)}")
    if len(df) == 0:
        raise InputError(f"{path}: no rows")
    has_ids = "response_ids" in df.columns
    for i, resp in enumerate(df["response"].tolist()):
        if not isinstance(resp, str):
            raise InputError(f"{path}: row {i}: response is {type(resp).__name__}, expected text")
        empty_ids = has_ids and (df["response_ids"].iloc[i] is None or len(df["response_ids"].iloc[i]) == 0)
        if (not resp and not has_ids) or empty_ids:
            raise InputError(f"{path}: row {i}: empty response")
    if "reward" in df.columns:
        r = pd.to_numeric(df["reward"], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(r.to_numpy(dtype=float)))
        if len(bad):
            raise InputError(f"{path}: row {int(bad[0])}: reward is not a finite number")
    out = df.reset_index(drop=True).copy()
    keys = out["group"].astype(str) if "group" in out.columns else out["prompt"].map(prompt_key)
    out["group_id"] = pd.factorize(keys)[0].astype(np.int64)
    return out


def load_rollouts(path: str | Path) -> pd.DataFrame:
    """Read and validate rollouts: our format (see module docstring), a verl rollout dump file
    (``{step}.jsonl`` with input/output/gts/score), or a verl ``rollout_data_dir`` folder (last step)."""
    p = Path(path)
    if p.is_dir():
        return validate_rollouts(read_verl_dump_dir(p), p)
    df = read_table(p)
    if is_verl_dump(df):
        df = from_verl_dump(df, p)
    return validate_rollouts(df, p)


@dataclass
class Tokenized:
    """Token ids of each row: ``prompt_ids[i]``, ``response_ids[i]``; ``retokenized`` is True when
    ids came from re-tokenising text (lossy: may differ from what the policy sampled)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    retokenized: bool
    notes: list[str] = field(default_factory=list)


def tokenize_rollouts(df: pd.DataFrame, tokenizer, path: str | Path = "<rollouts>") -> Tokenized:
    """Token ids for every row: exact ids when given, else the chat template (messages or a plain
    text prompt as one user message) for the prompt and plain encoding for the response."""
    notes = []
    vocab = len(tokenizer)
    if "prompt_ids" in df.columns and "response_ids" in df.columns:
        p_ids = [[int(x) for x in ids] for ids in df["prompt_ids"]]
        r_ids = [[int(x) for x in ids] for ids in df["response_ids"]]
        for i, ids in enumerate(p_ids + r_ids):
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                row = i % len(df)
                raise InputError(f"{path}: row {row}: token id outside the tokenizer's vocabulary of {vocab}")
        return Tokenized(p_ids, r_ids, retokenized=False, notes=notes)
    p_ids = []
    templated = df["prompt_is_templated"].tolist() if "prompt_is_templated" in df.columns else [False] * len(df)
    for prompt, is_templated in zip(df["prompt"].tolist(), templated):
        msgs = as_messages(prompt) or [{"role": "user", "content": str(prompt)}]
        if is_templated:  # e.g. verl dumps: the text already went through the chat template
            ids = tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
        else:
            ids = chat_prompt_ids(tokenizer, msgs)
        p_ids.append([int(x) for x in ids])
    r_ids = [tokenizer(str(r), add_special_tokens=False)["input_ids"] for r in df["response"].tolist()]
    for i, ids in enumerate(r_ids):
        if not ids:
            raise InputError(f"{path}: row {i}: empty response after tokenisation")
    notes.append("token ids were re-tokenised from text (lossy): provide prompt_ids/response_ids for exact ids")
    return Tokenized(p_ids, [list(map(int, r)) for r in r_ids], retokenized=True, notes=notes)


def old_logp_grid(df: pd.DataFrame, lengths: list[int], path: str | Path = "<rollouts>"):
    """``[B, T]`` tensor of the recorded behaviour log-probs, or None when the column is absent."""
    import torch

    if "old_logp" not in df.columns:
        return None
    T = max(lengths)
    out = torch.zeros(len(lengths), T, dtype=torch.float32)
    for i, (vals, n) in enumerate(zip(df["old_logp"].tolist(), lengths)):
        vals = np.array(vals, dtype=np.float64)
        if len(vals) != n:
            raise InputError(f"{path}: row {i}: old_logp has {len(vals)} values for {n} response tokens")
        if not np.isfinite(vals).all():
            raise InputError(f"{path}: row {i}: old_logp has a non-finite value")
        out[i, :n] = torch.as_tensor(vals, dtype=torch.float32)
    return out


# verl ``trainer.rollout_data_dir`` dumps: ``{step}.jsonl`` lines with ``input`` (the prompt text,
# already chat-templated), ``output``, ``gts``, ``score``, ``step``.

VERL_DUMP_COLUMNS = ("input", "output", "score")


def is_verl_dump(df: pd.DataFrame) -> bool:
    """True when a JSONL frame has verl's rollout-dump columns (input, output, score)."""
    return all(c in df.columns for c in VERL_DUMP_COLUMNS) and "response" not in df.columns


def from_verl_dump(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Convert a verl dump frame into our rollout columns. ``input`` is already templated text, so
    the prompt is marked ``prompt_is_text_templated`` and tokenised without a chat template."""
    missing = [c for c in VERL_DUMP_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: verl dump lacks column(s): {', '.join(missing)}")
    out = pd.DataFrame({
        "prompt": df["input"].astype(str),
        "response": df["output"].astype(str),
        "reward": pd.to_numeric(df["score"], errors="coerce"),
    })
    if "gts" in df.columns:
        out["ground_truth"] = df["gts"].astype(str)
    if "step" in df.columns:
        out["step"] = df["step"]
    out["prompt_is_templated"] = True
    return out


def read_verl_dump_dir(folder: str | Path, step: int | None = None) -> pd.DataFrame:
    """Rollouts of one step (default: the last) from a verl ``rollout_data_dir``."""
    folder = Path(folder)
    files = sorted((int(p.stem), p) for p in folder.glob("*.jsonl") if p.stem.isdigit())
    if not files:
        raise InputError(f"{folder}: no {{step}}.jsonl files (not a verl rollout_data_dir)")
    chosen = dict(files).get(step) if step is not None else files[-1][1]
    if chosen is None:
        raise InputError(f"{folder}: no {step}.jsonl (steps present: {', '.join(str(s) for s, _ in files)})")
    return from_verl_dump(read_table(chosen), chosen)
