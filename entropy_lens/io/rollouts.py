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


class RolloutError(ValueError):
    """Bad rollout input; the message names the file and the problem on one line."""


REQUIRED = ("prompt", "response")


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RolloutError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RolloutError(f"{path}: line {i}: invalid UTF-8 at byte {exc.start}") from exc
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RolloutError(f"{path}: line {i}: malformed JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise RolloutError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return pd.DataFrame(rows)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a parquet or JSONL file into a frame (format by suffix; ``.json`` read as JSONL)."""
    path = Path(path)
    if not path.exists():
        raise RolloutError(f"{path}: no such file")
    if path.is_dir():
        raise RolloutError(f"{path}: is a folder, expected a parquet or JSONL file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RolloutError(f"{path}: cannot read parquet ({msg})") from exc
    raise RolloutError(f"{path}: unknown file type {suffix!r} (expected .parquet or .jsonl)")


def _as_messages(prompt: Any) -> list[dict[str, str]] | None:
    """Chat messages if ``prompt`` is a list of {role, content}; None for plain text."""
    if isinstance(prompt, np.ndarray):
        prompt = list(prompt)
    if isinstance(prompt, (list, tuple)):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    return None


def prompt_key(prompt: Any) -> str:
    """Hashable identity of a prompt (text, or JSON of its messages)."""
    msgs = _as_messages(prompt)
    return json.dumps(msgs, sort_keys=True) if msgs is not None else str(prompt)


def validate_rollouts(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Check columns and values; return a clean frame with an integer ``group_id`` column."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if "reward" not in df.columns and "ground_truth" not in df.columns:
        missing.append("reward (or ground_truth)")
    if missing:
        raise RolloutError(f"{path}: missing column(s): {', '.join(missing)}")
    if len(df) == 0:
        raise RolloutError(f"{path}: no rows")
    has_ids = "response_ids" in df.columns
    for i, resp in enumerate(df["response"].tolist()):
        if not isinstance(resp, str):
            raise RolloutError(f"{path}: row {i}: response is {type(resp).__name__}, expected text")
        empty_ids = has_ids and (df["response_ids"].iloc[i] is None or len(df["response_ids"].iloc[i]) == 0)
        if (not resp and not has_ids) or empty_ids:
            raise RolloutError(f"{path}: row {i}: empty response")
    if "reward" in df.columns:
        r = pd.to_numeric(df["reward"], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(r.to_numpy(dtype=float)))
        if len(bad):
            raise RolloutError(f"{path}: row {int(bad[0])}: reward is not a finite number")
    out = df.reset_index(drop=True).copy()
    keys = out["group"].astype(str) if "group" in out.columns else out["prompt"].map(prompt_key)
    out["group_id"] = pd.factorize(keys)[0].astype(np.int64)
    return out


def load_rollouts(path: str | Path) -> pd.DataFrame:
    """Read and validate rollouts: our format (see module docstring), a verl rollout dump file
    (``{step}.jsonl`` with input/output/gts/score), or a verl ``rollout_data_dir`` folder (last step)."""
    from .datasets import from_verl_dump, is_verl_dump, read_verl_dump_dir

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
                raise RolloutError(f"{path}: row {row}: token id outside the tokenizer's vocabulary of {vocab}")
        return Tokenized(p_ids, r_ids, retokenized=False, notes=notes)
    p_ids = []
    templated = df["prompt_is_templated"].tolist() if "prompt_is_templated" in df.columns else [False] * len(df)
    for prompt, is_templated in zip(df["prompt"].tolist(), templated):
        msgs = _as_messages(prompt) or [{"role": "user", "content": str(prompt)}]
        if is_templated:  # e.g. verl dumps: the text already went through the chat template
            ids = tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
        elif getattr(tokenizer, "chat_template", None):
            enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
        else:
            ids = tokenizer("\n".join(m["content"] for m in msgs), add_special_tokens=True)["input_ids"]
        p_ids.append([int(x) for x in ids])
    r_ids = [tokenizer(str(r), add_special_tokens=False)["input_ids"] for r in df["response"].tolist()]
    for i, ids in enumerate(r_ids):
        if not ids:
            raise RolloutError(f"{path}: row {i}: empty response after tokenisation")
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
            raise RolloutError(f"{path}: row {i}: old_logp has {len(vals)} values for {n} response tokens")
        if not np.isfinite(vals).all():
            raise RolloutError(f"{path}: row {i}: old_logp has a non-finite value")
        out[i, :n] = torch.as_tensor(vals, dtype=torch.float32)
    return out
