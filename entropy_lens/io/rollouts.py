"""Rollout files: one row per response (parquet or JSONL).

Columns: ``prompt`` (text, or chat messages ``[{role, content}, ...]``), ``response`` (text),
``reward`` or ``ground_truth`` (scored by a verifier), optional ``group`` (default: rows with the
same prompt form a group), optional exact ``prompt_ids`` / ``response_ids`` (token ids) and
``old_logp`` (per response token, the behaviour policy's log-probs).

The schema is strict, because a value that is read "somehow" gives a wrong number without an
error. Every violation raises :class:`~entropy_lens.io.tables.InputError` with one line
``FILE: row R: column C: problem`` (rows count from 0, in file order):

- ``prompt_ids`` and ``response_ids`` come together (or neither: the text is re-tokenised); each is
  a non-empty list of integer token ids — integers, or floats that are exactly integral; text
  (``"123"`` is not ``[1, 2, 3]``), booleans, NaN, fractions, nested lists are refused — within the
  tokenizer's vocabulary (checked by :func:`tokenize_rollouts`);
- ``old_logp``: one finite log-probability (nats) per response token, in
  [:data:`MIN_LOGP`, 0]; values up to :data:`LOGP_TOLERANCE` above 0 are accepted as float rounding;
- ``reward``: a finite number with |reward| ≤ :data:`MAX_ABS_REWARD` (not text, not a boolean);
- ``prompt``: text or a non-empty list of ``{role, content}`` messages with text values;
  ``response``: text; ``group``: a label (text or number), present in every row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens.io.prompts import as_messages, chat_prompt_ids
from entropy_lens.io.tables import InputError, read_table

REQUIRED = ("prompt", "response")

#: Largest accepted |reward|. Rewards of verifiable tasks are O(1); far larger values overflow the
#: group statistics (std of ±1e308 is inf, so every GRPO advantage silently becomes 0).
MAX_ABS_REWARD = 1e6

#: How far above 0 an ``old_logp`` value may be (nats) and still count as a log-probability
#: (float32 rounding of log p ≈ 0); larger positive values are probabilities or negated log-probs.
LOGP_TOLERANCE = 1e-6

#: Lowest accepted ``old_logp`` (nats). A sampled token had a probability > 0, and e^-1000 is 0 in
#: every float format (float64 ends near e^-745), so lower values are not behaviour log-probs.
MIN_LOGP = -1000.0

ID_COLUMNS = ("prompt_ids", "response_ids")


def _show(value: Any, limit: int = 40) -> str:
    """A short one-line ``repr`` of a value for an error message (numpy scalars as plain numbers)."""
    if isinstance(value, np.generic):
        value = value.item()
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(value: Any) -> str:
    """What a value is, in words: ``text '12'``, ``a boolean (True)``, ``a dict {...}``."""
    if isinstance(value, str):
        return f"text {_show(value)}"
    if isinstance(value, (bool, np.bool_)):
        return f"a boolean ({_show(value)})"
    return f"{type(value).__name__} {_show(value)}"


def _count(n: int, noun: str) -> str:
    """``"1 value"``, ``"3 values"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _is_missing(value: Any) -> bool:
    """True for None, NaN and pandas' missing markers (a JSONL row without the key)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _as_sequence(value: Any, where: str, what: str) -> list | np.ndarray:
    """``value`` as a list or 1-D array; InputError (``where: problem``) for anything else."""
    if _is_missing(value):
        raise InputError(f"{where}: missing (expected {what})")
    if isinstance(value, (str, bytes)):
        raise InputError(f"{where}: is {_kind(value)}, expected {what} (text is not split into ids)")
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InputError(f"{where}: is a {value.ndim}-D array, expected {what}")
        return value
    if isinstance(value, (list, tuple)):
        return value
    raise InputError(f"{where}: is {_kind(value)}, expected {what}")


def _integral(x: Any, where: str, j: int) -> int:
    """One token id: an int (not a bool), or a float that is exactly integral."""
    if isinstance(x, (bool, np.bool_)):
        raise InputError(f"{where}: element {j} is a boolean ({x}), expected an integer token id")
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x):
            raise InputError(f"{where}: element {j} is {float(x)}, expected an integer token id")
        if x != int(x):
            raise InputError(f"{where}: element {j} is {float(x)!r}, not an integer token id")
        return int(x)
    raise InputError(f"{where}: element {j} is {_kind(x)}, expected an integer token id")


def parse_token_ids(value: Any, where: str) -> list[int]:
    """A cell of ``prompt_ids`` / ``response_ids`` as a list of non-negative Python ints.

    Accepts a list/tuple/1-D array of integers, or of floats that are exactly integral (JSON and
    parquet may store ids as doubles). Refuses text, booleans, NaN/inf, fractions, nested lists
    and negative ids with InputError ``where: problem`` (``where`` names file, row and column).
    The upper bound (the vocabulary) needs the tokenizer: :func:`check_vocab`.
    """
    seq = _as_sequence(value, where, "a list of integer token ids")
    if isinstance(seq, np.ndarray) and seq.dtype.kind in "iu":
        ids = seq.tolist()
    elif isinstance(seq, list) and all(type(x) is int for x in seq):  # the common JSONL case, fast
        ids = list(seq)
    else:
        ids = [_integral(x, where, j) for j, x in enumerate(seq)]
    bad = next((j for j, x in enumerate(ids) if not 0 <= x < 2**63), None)
    if bad is not None:
        what = "token ids are >= 0" if ids[bad] < 0 else "too large to be a token id"
        raise InputError(f"{where}: element {bad} is {_show(ids[bad], 24)}, {what}")
    return ids


def check_vocab(ids: list[int], vocab: int, where: str) -> None:
    """InputError if a token id is outside ``[0, vocab)`` (the tokenizer's vocabulary)."""
    bad = next((j for j, x in enumerate(ids) if not 0 <= x < vocab), None)
    if bad is not None:
        raise InputError(
            f"{where}: token id {ids[bad]} (element {bad}) is outside the tokenizer's vocabulary of {vocab} (0..{vocab - 1})"
        )


def _to_float(x: Any) -> float:
    """``float(x)``, with integers too large for a float as inf (refused as non-finite)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def parse_logps(value: Any, where: str) -> np.ndarray:
    """A cell of ``old_logp`` as a float64 array of log-probabilities in
    [:data:`MIN_LOGP`, :data:`LOGP_TOLERANCE`] (nats).

    Refuses text, booleans, None, NaN/inf, positive values (probabilities or negated log-probs)
    and values below :data:`MIN_LOGP` with InputError ``where: problem``.
    """
    seq = _as_sequence(value, where, "a list of log-probabilities (one per response token)")
    if isinstance(seq, np.ndarray) and seq.dtype.kind in "iuf":
        vals = seq.astype(np.float64)
    else:
        for j, x in enumerate(seq):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
                raise InputError(f"{where}: element {j} is {_kind(x)}, expected a number (a log-probability)")
        vals = np.array([_to_float(x) for x in seq], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(vals))
    if len(bad):
        raise InputError(f"{where}: element {int(bad[0])} is {vals[bad[0]]}, expected a finite log-probability")
    pos = np.flatnonzero(vals > LOGP_TOLERANCE)
    if len(pos):
        raise InputError(
            f"{where}: element {int(pos[0])} is {vals[pos[0]]:g} > 0; log-probabilities are <= 0 "
            "(probabilities or negated log-probs given?)"
        )
    low = np.flatnonzero(vals < MIN_LOGP)
    if len(low):
        raise InputError(
            f"{where}: element {int(low[0])} is {vals[low[0]]:g} < {MIN_LOGP:g}: a sampled token's log-probability "
            f"is above {MIN_LOGP:g} nats (e^{MIN_LOGP:g} is 0 in every float format)"
        )
    return vals


def check_reward(value: Any, where: str) -> float:
    """A ``reward`` cell as a float: a finite number with |r| ≤ :data:`MAX_ABS_REWARD`."""
    if _is_missing(value):
        raise InputError(f"{where}: missing (expected a number)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{where}: is {_kind(value)}, expected a number")
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        raise InputError(f"{where}: is {value}, expected a finite number")
    if abs(int(value) if isinstance(value, np.integer) else value) > MAX_ABS_REWARD:  # int(): no int64 overflow
        size = f"{float(value):g}" if isinstance(value, (float, np.floating)) else _show(int(value), 24)
        raise InputError(f"{where}: reward {size} is outside the accepted range |reward| <= {MAX_ABS_REWARD:g}; rescale the rewards")
    return float(value)


def check_text(value: str, where: str) -> None:
    """InputError if ``value`` is not valid Unicode (a lone surrogate such as JSON's ``"\\ud800"``
    cannot be encoded, so no tokenizer can read it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: character {exc.start} is a lone surrogate ({value[exc.start]!r}), not valid text") from None


def check_prompt(value: Any, where: str) -> None:
    """A ``prompt`` cell: text, or a non-empty list of ``{role, content}`` messages with text values."""
    if isinstance(value, str):
        check_text(value, where)
        return
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = list(value)
    if not isinstance(value, (list, tuple)) or not value:
        what = "an empty list" if isinstance(value, (list, tuple)) else _kind(value)
        if _is_missing(value):
            what = "missing"
        raise InputError(f"{where}: is {what}, expected text or a list of {{role, content}} messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {j} is {_kind(m)}, expected {{\"role\": text, \"content\": text}}")
        check_text(m["role"] + m["content"], f"{where}: message {j}")


def check_group(value: Any, where: str) -> None:
    """A ``group`` cell: a present scalar label (text or number)."""
    if _is_missing(value):
        raise InputError(f"{where}: missing (every row needs a group label when the column is given)")
    if isinstance(value, (list, tuple, dict, np.ndarray, set)):
        raise InputError(f"{where}: is {_kind(value)}, expected a text or number label")


def prompt_key(prompt: Any) -> str:
    """Hashable identity of a prompt (text, or JSON of its messages)."""
    msgs = as_messages(prompt)
    return json.dumps(msgs, sort_keys=True) if msgs is not None else str(prompt)


def _locator(df: pd.DataFrame, path: str | Path):
    """``where(row, column)`` → ``"FILE: row R: column C"``, with the file's own column names
    (``df.attrs["source_columns"]``: e.g. a verl dump's ``score`` for ``reward``)."""
    names = df.attrs.get("source_columns", {})
    return lambda row, column: f"{path}: row {row}: column {names.get(column, column)}"


def _check_id_pair(df: pd.DataFrame, path: str | Path) -> None:
    """InputError when only one of ``prompt_ids`` / ``response_ids`` is given."""
    has = [c for c in ID_COLUMNS if c in df.columns]
    if len(has) == 1:
        lacking = ID_COLUMNS[1 - ID_COLUMNS.index(has[0])]
        raise InputError(
            f"{path}: column {has[0]} without {lacking}: give both (exact token ids) or neither (the text is re-tokenised)"
        )


def _check_columns(df: pd.DataFrame, path: str | Path) -> None:
    """InputError for a file without rows, without the required columns, or with only one of
    ``prompt_ids`` / ``response_ids``."""
    if len(df) == 0:
        raise InputError(f"{path}: no rows" + ("" if len(df.columns) else " (the file is empty)"))
    missing = [c for c in REQUIRED if c not in df.columns]
    if "reward" not in df.columns and "ground_truth" not in df.columns:
        missing.append("reward (or ground_truth)")
    if missing:
        raise InputError(f"{path}: missing column(s): {', '.join(missing)}")
    _check_id_pair(df, path)


def _rewards(values: pd.Series, where) -> pd.Series:
    """The ``reward`` column as float64 after :func:`check_reward` on every row (vectorised when
    the column is already numeric)."""
    if values.dtype.kind in "iuf":
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.flatnonzero(~(np.abs(arr) <= MAX_ABS_REWARD))  # NaN compares False
        if len(bad):
            check_reward(values.iloc[int(bad[0])], where(int(bad[0]), "reward"))
        return pd.Series(arr, index=values.index, dtype=np.float64)
    return pd.Series([check_reward(v, where(i, "reward")) for i, v in enumerate(values.tolist())],
                     index=values.index, dtype=np.float64)


def exact_ids(df: pd.DataFrame, path: str | Path) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt_ids, response_ids)`` of a frame with both id columns, every cell checked by
    :func:`parse_token_ids`; an empty prompt or response is an InputError."""
    where = _locator(df, path)
    p_ids, r_ids = [], []
    for i, (p, r) in enumerate(zip(df["prompt_ids"].tolist(), df["response_ids"].tolist())):
        p_ids.append(parse_token_ids(p, where(i, "prompt_ids")))
        r_ids.append(parse_token_ids(r, where(i, "response_ids")))
        if not p_ids[-1]:
            raise InputError(f"{where(i, 'prompt_ids')}: empty (a response token needs a prompt token before it)")
        if not r_ids[-1]:
            raise InputError(f"{path}: row {i}: empty response (column response_ids has no ids)")
    return p_ids, r_ids


def _check_cells(df: pd.DataFrame, path: str | Path) -> None:
    """Per-row checks of ``prompt``, ``response``, ``group`` and (without ``reward``) ``ground_truth``."""
    where = _locator(df, path)
    has_ids = "response_ids" in df.columns
    for i, (prompt, resp) in enumerate(zip(df["prompt"].tolist(), df["response"].tolist())):
        check_prompt(prompt, where(i, "prompt"))
        if not isinstance(resp, str):
            raise InputError(f"{where(i, 'response')}: is {_kind(resp) if not _is_missing(resp) else 'missing'}, expected text")
        check_text(resp, where(i, "response"))
        if not resp and not has_ids:
            raise InputError(f"{path}: row {i}: empty response (column response is empty text)")
    if "group" in df.columns:
        for i, g in enumerate(df["group"].tolist()):
            check_group(g, where(i, "group"))
    if "reward" not in df.columns:
        for i, gt in enumerate(df["ground_truth"].tolist()):
            if _is_missing(gt):
                raise InputError(f"{where(i, 'ground_truth')}: missing (needed to score the response)")


def validate_rollouts(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Check the schema (module docstring) and return a clean frame: ``reward`` as float64, id
    and ``old_logp`` cells as lists of Python ints / floats, and an integer ``group_id`` column.

    Every problem raises InputError ``FILE: row R: column C: problem`` (one line). The vocabulary
    bound of the ids is checked by :func:`tokenize_rollouts`, which knows the tokenizer.
    """
    _check_columns(df, path)
    out = df.reset_index(drop=True).copy()
    where = _locator(out, path)
    _check_cells(out, path)
    if "reward" in out.columns:
        out["reward"] = _rewards(out["reward"], where)
    r_ids = None
    if "response_ids" in out.columns:
        p_ids, r_ids = exact_ids(out, path)
        out["prompt_ids"] = pd.Series(p_ids, index=out.index, dtype=object)
        out["response_ids"] = pd.Series(r_ids, index=out.index, dtype=object)
    if "old_logp" in out.columns:
        logps = [parse_logps(v, where(i, "old_logp")) for i, v in enumerate(out["old_logp"].tolist())]
        for i, vals in enumerate(logps if r_ids is not None else []):
            if len(vals) != len(r_ids[i]):
                raise InputError(f"{where(i, 'old_logp')}: {_count(len(vals), 'value')} for "
                                 f"{_count(len(r_ids[i]), 'response token')} (column response_ids)")
        out["old_logp"] = pd.Series([v.tolist() for v in logps], index=out.index, dtype=object)
    keys = out["group"].astype(str) if "group" in out.columns else out["prompt"].map(prompt_key)
    out["group_id"] = pd.factorize(keys)[0].astype(np.int64)
    return out


def load_rollouts(path: str | Path) -> pd.DataFrame:
    """Read and validate rollouts: our format (see module docstring), a verl rollout dump file
    (``{step}.jsonl`` with input/output/gts/score), or a verl ``rollout_data_dir`` folder (last step)."""
    p = Path(path)
    if p.is_dir():
        df = read_verl_dump_dir(p)
        return validate_rollouts(df, df.attrs.get("source_path", p))
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
    """Token ids for every row: exact ids when given (checked against the tokenizer's vocabulary),
    else the chat template (messages or a plain text prompt as one user message) for the prompt and
    plain encoding for the response."""
    vocab = len(tokenizer)
    where = _locator(df, path)
    _check_id_pair(df, path)
    if len(df) == 0:
        raise InputError(f"{path}: no rows")
    if "prompt_ids" in df.columns:
        p_ids, r_ids = exact_ids(df, path)
        for i, (p, r) in enumerate(zip(p_ids, r_ids)):
            check_vocab(p, vocab, where(i, "prompt_ids"))
            check_vocab(r, vocab, where(i, "response_ids"))
        return Tokenized(p_ids, r_ids, retokenized=False)
    p_ids = []
    templated = df["prompt_is_templated"].tolist() if "prompt_is_templated" in df.columns else [False] * len(df)
    for i, (prompt, is_templated) in enumerate(zip(df["prompt"].tolist(), templated)):
        check_prompt(prompt, where(i, "prompt"))
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
    notes = ["token ids were re-tokenised from text (lossy): provide prompt_ids/response_ids for exact ids"]
    return Tokenized(p_ids, [list(map(int, r)) for r in r_ids], retokenized=True, notes=notes)


def old_logp_grid(df: pd.DataFrame, lengths: list[int], path: str | Path = "<rollouts>"):
    """``[B, T]`` float32 tensor of the recorded behaviour log-probs (nats, 0 on padding), or None
    when the column is absent. ``lengths``: response tokens per row; each row's ``old_logp`` must
    have exactly that many values (:func:`parse_logps`)."""
    import torch

    if "old_logp" not in df.columns:
        return None
    where = _locator(df, path)
    T = max(lengths)
    out = torch.zeros(len(lengths), T, dtype=torch.float32)
    for i, (cell, n) in enumerate(zip(df["old_logp"].tolist(), lengths)):
        vals = parse_logps(cell, where(i, "old_logp"))
        if len(vals) != n:
            how = "" if "response_ids" in df.columns else (
                " (the response was re-tokenised from text; give prompt_ids and response_ids with old_logp)")
            raise InputError(f"{where(i, 'old_logp')}: {_count(len(vals), 'value')} for {_count(n, 'response token')}{how}")
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
    the prompt is marked ``prompt_is_templated`` and tokenised without a chat template. Values are
    kept as they are, so that :func:`validate_rollouts` reports a bad one under the dump's own
    column name (``score``, ``output``, ...)."""
    missing = [c for c in VERL_DUMP_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: verl dump lacks column(s): {', '.join(missing)}")
    out = pd.DataFrame({"prompt": df["input"], "response": df["output"], "reward": df["score"]})
    names = {"prompt": "input", "response": "output", "reward": "score"}
    if "gts" in df.columns:
        out["ground_truth"] = df["gts"].astype(str)
        names["ground_truth"] = "gts"
    if "step" in df.columns:
        out["step"] = df["step"]
    out["prompt_is_templated"] = True
    out.attrs["source_columns"] = names
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
    out = from_verl_dump(read_table(chosen), chosen)
    out.attrs["source_path"] = str(chosen)
    return out
