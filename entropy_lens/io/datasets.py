"""Prompt datasets: the problems ``sample`` and the trainer draw prompts from.

- verl-schema datasets (parquet): ``prompt`` (list of ``{role, content}``), ``reward_model``
  (``{ground_truth, style}``), ``data_source``, ``extra_info``. For GSM8K rows the shipped template
  lost a word ("form Answer:  (without quotes) where  is the answer"), so ``extra_info.raw_problem``
  is used with our own instruction instead.
- simple problem tables: ``problem`` and ``answer`` columns (e.g. the shipped GSM8K demo set).

verl ``rollout_data_dir`` dumps are rollouts, read by :mod:`entropy_lens.io.rollouts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens.io.prompts import DEFAULT_INSTRUCTION
from entropy_lens.io.tables import InputError, read_table

#: Dataset names that resolve to files shipped with the package.
SHIPPED = {"gsm8k-demo": "gsm8k_demo.parquet"}


def _as_dict(x: Any) -> dict:
    return dict(x) if isinstance(x, dict) else {}


def load_prompts(dataset: str | Path, limit: int | None = None) -> pd.DataFrame:
    """Prompts to sample from: a frame with ``prompt`` (chat messages), ``ground_truth`` (str)
    and ``data_source``. ``dataset``: a shipped name (``gsm8k-demo``), a verl-schema parquet, or a
    parquet/JSONL with ``problem`` and ``answer`` columns."""
    if str(dataset) in SHIPPED:
        from entropy_lens.data import DATA_DIR

        path = DATA_DIR / SHIPPED[str(dataset)]
    else:
        path = Path(dataset)
    df = read_table(path)
    if "prompt" in df.columns and "reward_model" in df.columns:
        out = _from_verl_schema(df, path)
    elif "problem" in df.columns and "answer" in df.columns:
        out = pd.DataFrame({
            "prompt": [[{"role": "user", "content": f"{p}\n\n{DEFAULT_INSTRUCTION}"}] for p in df["problem"].astype(str)],
            "ground_truth": df["answer"].astype(str).tolist(),
            "data_source": path.stem,
        })
    else:
        raise InputError(
            f"{path}: not a prompt dataset (expected verl schema prompt+reward_model, or problem+answer columns)"
        )
    if len(out) == 0:
        raise InputError(f"{path}: no prompts")
    return out.head(limit) if limit else out


def _from_verl_schema(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    prompts, truths = [], []
    for i, row in enumerate(df.itertuples(index=False)):
        rm = _as_dict(row.reward_model)
        if rm.get("ground_truth") is None:
            raise InputError(f"{path}: row {i}: reward_model has no ground_truth")
        extra = _as_dict(getattr(row, "extra_info", None))
        source = str(getattr(row, "data_source", ""))
        msgs = row.prompt
        if isinstance(msgs, np.ndarray):
            msgs = list(msgs)
        if "gsm8k" in source.lower() and extra.get("raw_problem"):
            msgs = [{"role": "user", "content": f"{extra['raw_problem']}\n\n{DEFAULT_INSTRUCTION}"}]
        elif not isinstance(msgs, list) or not msgs:
            raise InputError(f"{path}: row {i}: prompt is not a list of chat messages")
        prompts.append([{"role": str(m["role"]), "content": str(m["content"])} for m in msgs])
        truths.append(str(rm["ground_truth"]))
    return pd.DataFrame({"prompt": prompts, "ground_truth": truths,
                         "data_source": df["data_source"].astype(str).tolist() if "data_source" in df else path.stem})
