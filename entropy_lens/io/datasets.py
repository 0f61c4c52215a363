"""Prompt datasets: the problems ``sample``, ``eval`` and the trainer draw prompts from.

Two layouts are read:

- verl-schema datasets (parquet): ``prompt`` (list of ``{role, content}``), ``reward_model``
  (``{ground_truth, style}``), ``data_source``, ``extra_info`` (``index``, often ``raw_problem``);
- simple problem tables (parquet or JSONL): ``problem`` and ``answer`` columns (e.g. the shipped
  GSM8K demo set); the prompt is the problem and :data:`~entropy_lens.io.prompts.DEFAULT_INSTRUCTION`.

Every row becomes a problem text, a ground truth, the prompt given to the model and a data source
(:func:`load_problems`), with the known defects of the public verl-schema files handled:

- the **problem text** is ``extra_info.raw_problem`` when it is clean, else ``prompt[0].content``
  without its instruction lines (:func:`problem_text`): AIME 2025 and AMC 2023 carry a
  ``raw_problem`` that is a wrong slice of the template, and DAPO-Math-17k has none at all;
- the **prompt** is the dataset's own when its instruction is intact; a template that lost words
  (GSM8K: "form Answer:  (without quotes) where  is the answer") or a bare problem without any
  instruction (MATH-500) is replaced by the problem and our instruction (:func:`model_prompt`);
- **repeated problems** (AIME and AMC repeat each one 32 times, for avg@32) are collapsed to one
  row with a ``count``; repeats that disagree on the answer are an error naming the problem.

verl ``rollout_data_dir`` dumps are rollouts, read by :mod:`entropy_lens.io.rollouts`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens.io.prompts import (
    DEFAULT_INSTRUCTION,
    INTACT_HEADS,
    MATH_INSTRUCTION,
    TEMPLATE_HEADS,
    TEMPLATE_TAILS,
)
from entropy_lens.io.tables import InputError, read_table

#: Dataset names that resolve to files shipped with the package.
SHIPPED = {"gsm8k-demo": "gsm8k_demo.parquet"}

#: Columns of :func:`load_problems`, one row per unique problem.
PROBLEM_COLUMNS = ("problem", "answer", "prompt", "data_source", "index", "count", "row")

#: Text that marks a ``raw_problem`` as a slice of the template rather than the problem.
_TEMPLATE_FRAGMENTS = ("The last line of your response should be", *TEMPLATE_TAILS)

Messages = list[dict[str, str]]


def _as_dict(x: Any) -> dict:
    return dict(x) if isinstance(x, dict) else {}


def resolve_dataset(dataset: str | Path) -> Path:
    """The file of ``dataset``: a shipped name (``gsm8k-demo``) or a path."""
    if str(dataset) in SHIPPED:
        from entropy_lens.data import DATA_DIR

        return DATA_DIR / SHIPPED[str(dataset)]
    return Path(dataset)


def dataset_name(dataset: str | Path) -> str:
    """The short name of a dataset in tables and summaries: a shipped name as given, else the file
    name without its suffix (``/data/math500.parquet`` → ``math500``)."""
    return str(dataset) if str(dataset) in SHIPPED else Path(dataset).stem


# ---------------------------------------------------------------------------------------------
# One row: problem text and prompt
# ---------------------------------------------------------------------------------------------


def split_template(content: str) -> tuple[str | None, list[str], str]:
    """``(head line or None, tail lines, problem text)`` of a templated prompt: leading lines that
    start with a :data:`TEMPLATE_HEADS` entry, trailing lines that start with a
    :data:`TEMPLATE_TAILS` entry, and the text between them (blank lines at either end dropped)."""
    lines = content.split("\n")
    head = None
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and lines[0].startswith(TEMPLATE_HEADS):
        head = lines.pop(0)
    tails: list[str] = []
    while lines and (not lines[-1].strip() or lines[-1].startswith(TEMPLATE_TAILS)):
        line = lines.pop()
        if line.strip():
            tails.insert(0, line)
    return head, tails, "\n".join(lines).strip()


def problem_text(content: str, raw_problem: Any = None) -> str:
    """The problem of one row: ``raw_problem`` when it is given and clean (no template text in it),
    else ``content`` (the user message) without its instruction lines (:func:`split_template`)."""
    if isinstance(raw_problem, str) and raw_problem.strip() and not any(f in raw_problem for f in _TEMPLATE_FRAGMENTS):
        return raw_problem.strip()
    return split_template(content)[2]


def model_prompt(messages: Messages, problem: str, data_source: str) -> Messages:
    """The chat messages given to the model: the dataset's own when its instruction is intact
    (a head line in :data:`INTACT_HEADS`, or only tail lines); otherwise — a head that lost words,
    or no instruction at all — one user message, the problem and our instruction
    (:data:`DEFAULT_INSTRUCTION` for GSM8K's numeric answers, else :data:`MATH_INSTRUCTION`)."""
    head, tails, _ = split_template(_user_content(messages))
    if (head is not None and head in INTACT_HEADS) or (head is None and tails):
        return messages
    instruction = DEFAULT_INSTRUCTION if "gsm8k" in data_source.lower() else MATH_INSTRUCTION
    return [{"role": "user", "content": f"{problem}\n\n{instruction}"}]


def _user_content(messages: Messages) -> str:
    """Content of the first user message (of the last message when none is marked user)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[0] if users else messages[-1]["content"]


def _messages(prompt: Any, path: Path, i: int) -> Messages:
    """A verl ``prompt`` cell as a list of ``{role, content}`` strings; one line on bad input."""
    if isinstance(prompt, np.ndarray):
        prompt = list(prompt)
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) and "content" in m for m in prompt):
        raise InputError(f"{path}: row {i}: prompt is not a list of chat messages")
    return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in prompt]


def _truth(value: Any) -> str | None:
    """A ground truth as text; None when missing or empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


# ---------------------------------------------------------------------------------------------
# Whole files
# ---------------------------------------------------------------------------------------------


def _verl_rows(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Per file row: problem, answer, prompt, data_source (verl schema)."""
    problems, answers, prompts, sources = [], [], [], []
    has_source = "data_source" in df.columns
    for i, row in enumerate(df.itertuples(index=False)):
        truth = _truth(_as_dict(row.reward_model).get("ground_truth"))
        if truth is None:
            raise InputError(f"{path}: row {i}: reward_model has no ground_truth")
        msgs = _messages(row.prompt, path, i)
        source = str(row.data_source) if has_source else path.stem
        problem = problem_text(_user_content(msgs), _as_dict(getattr(row, "extra_info", None)).get("raw_problem"))
        if not problem:
            raise InputError(f"{path}: row {i}: the prompt holds no problem text")
        problems.append(problem)
        answers.append(truth)
        prompts.append(model_prompt(msgs, problem, source))
        sources.append(source)
    return pd.DataFrame({"problem": problems, "answer": answers, "prompt": prompts, "data_source": sources})


def _table_rows(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Per file row: problem, answer, prompt, data_source (a problem/answer table)."""
    answers = []
    for i, a in enumerate(df["answer"].tolist()):
        truth = _truth(a)
        if truth is None:
            raise InputError(f"{path}: row {i}: no answer (ground truth)")
        answers.append(truth)
    problems = [str(p).strip() for p in df["problem"].tolist()]
    return pd.DataFrame({
        "problem": problems,
        "answer": answers,
        "prompt": [[{"role": "user", "content": f"{p}\n\n{DEFAULT_INSTRUCTION}"}] for p in problems],
        "data_source": path.stem,
    })


def collapse_repeats(rows: pd.DataFrame, path: Path, conflicts: str = "error") -> pd.DataFrame:
    """One row per unique problem text (whitespace-insensitive), in order of first appearance, with
    ``index`` (0, 1, …), ``count`` (rows holding it) and ``row`` (its first row in the file).

    Repeats whose answers differ: ``conflicts="error"`` → :class:`InputError` naming the file, the
    problem index (as it would have been) and two rows; ``"drop"`` → every row of such a problem is
    left out, and ``out.attrs["dropped"]`` lists their first rows."""
    if conflicts not in ("error", "drop"):
        raise ValueError(f"conflicts must be 'error' or 'drop', got {conflicts!r}")
    keys = [" ".join(p.split()) for p in rows["problem"]]
    answers = rows["answer"].tolist()
    first: dict[str, int] = {}  # problem text -> its first row
    counts: dict[str, int] = {}
    bad: dict[str, int] = {}
    for r, key in enumerate(keys):
        f = first.setdefault(key, r)
        counts[key] = counts.get(key, 0) + 1
        if answers[r] != answers[f] and key not in bad:
            if conflicts == "error":
                raise InputError(
                    f"{path}: problem {list(first).index(key)} (rows {f} and {r}) is repeated with different "
                    f"answers ({answers[f]!r} vs {answers[r]!r})"
                )
            bad[key] = f
    order = [r for key, r in first.items() if key not in bad]
    out = rows.iloc[order].reset_index(drop=True)
    out["index"] = np.arange(len(out))
    out["count"] = [counts[keys[r]] for r in order]
    out["row"] = order
    out = out[list(PROBLEM_COLUMNS)]
    out.attrs["dropped"] = sorted(bad.values())
    return out


def load_problems(dataset: str | Path, limit: int | None = None, conflicts: str = "error") -> pd.DataFrame:
    """The unique problems of a dataset file, columns :data:`PROBLEM_COLUMNS`: ``problem`` (text,
    instruction lines removed), ``answer`` (ground truth, str), ``prompt`` (chat messages for the
    model), ``data_source``, ``index`` (0-based unique-problem index), ``count`` (times the file
    repeats it) and ``row`` (its first row in the file). ``limit``: the first ``limit`` problems.

    ``dataset``: a shipped name (``gsm8k-demo``), a verl-schema parquet, or a parquet/JSONL with
    ``problem`` and ``answer`` columns. A file without ground truth, an empty file, or (with
    ``conflicts="error"``) repeats with different answers raise :class:`InputError` (one line naming
    the file); ``conflicts="drop"`` leaves such problems out instead (:func:`collapse_repeats`; the
    public DAPO-Math-17k file holds five of them, so a trainer reading it passes ``"drop"``)."""
    path = resolve_dataset(dataset)
    df = read_table(path)
    if "prompt" in df.columns and "reward_model" in df.columns:
        rows = _verl_rows(df, path)
    elif "problem" in df.columns and "answer" in df.columns:
        rows = _table_rows(df, path)
    elif "prompt" in df.columns or "problem" in df.columns:
        raise InputError(f"{path}: no ground truth (expected a reward_model column with ground_truth, or an answer column)")
    else:
        raise InputError(
            f"{path}: not a prompt dataset (expected verl schema prompt+reward_model, or problem+answer columns)"
        )
    if len(rows) == 0:
        raise InputError(f"{path}: no prompts")
    out = collapse_repeats(rows, path, conflicts)
    if limit:
        dropped = out.attrs["dropped"]
        out = out.head(limit).reset_index(drop=True)
        out.attrs["dropped"] = dropped
    return out


def load_prompts(dataset: str | Path, limit: int | None = None) -> pd.DataFrame:
    """Prompts to sample from, one per unique problem (:func:`load_problems`): ``prompt`` (chat
    messages), ``ground_truth`` (str), ``data_source``, plus ``problem``, ``index`` and ``count``."""
    p = load_problems(dataset, limit)
    return pd.DataFrame({"prompt": p["prompt"], "ground_truth": p["answer"], "data_source": p["data_source"],
                         "problem": p["problem"], "index": p["index"], "count": p["count"]})
