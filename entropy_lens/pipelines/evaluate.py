"""`eval`: k sampled answers per unique problem of one or more datasets, graded by a verifier;
avg@k and unbiased pass@k (:mod:`entropy_lens.passk`).

Work is split into chunks of problems; each chunk's graded rows are written atomically to
``chunk_dir/<dataset>/chunk_XXXXX.parquet`` and read back instead of recomputed on a rerun, so an
interrupted evaluation continues where it stopped. Every chunk draws from its own seed
(:func:`chunk_seed`), so a resumed evaluation gives the same samples as an uninterrupted one.
``chunk_dir/manifest.json`` records the settings; a rerun with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens.io.prompts import chat_prompt_ids
from entropy_lens.io.tables import read_json, read_table, read_yaml
from entropy_lens.io.writers import atomic_write_json, atomic_write_parquet
from entropy_lens.model.generate import check_top_p, generate
from entropy_lens.passk import avg_at_k, pass_at_k_table
from entropy_lens.rewards import REWARDS, score_batch

#: Columns of eval.parquet, one row per sampled response.
EVAL_COLUMNS = ("dataset", "problem", "sample", "prompt", "response", "ground_truth", "correct", "reward", "length",
                "truncated")


@dataclass(frozen=True)
class EvalSettings:
    """``k`` samples per problem at temperature τ (nucleus ``top_p``), at most ``max_new_tokens``
    response tokens each, graded by ``reward`` (``math`` or ``dapo``); ``limit``: the first problems
    of each dataset (None: all); ``batch_size``: responses generated together; ``kv_cache``: the
    generation loop's cache (:data:`entropy_lens.model.generate.KV_CACHES`)."""

    k: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    reward: str = "math"
    seed: int = 0
    limit: int | None = None
    batch_size: int = 16
    kv_cache: str = "dynamic"


def check_settings(s: EvalSettings) -> None:
    """Every setting in range (``ValueError``, one line naming the setting)."""
    for name in ("k", "max_new_tokens", "batch_size"):
        if not (isinstance(getattr(s, name), int) and getattr(s, name) >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(s, name)}")
    if s.limit is not None and not s.limit >= 1:
        raise ValueError(f"limit must be an integer >= 1, got {s.limit}")
    if not (np.isfinite(s.temperature) and s.temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite, got {s.temperature}")
    check_top_p(s.top_p)
    if s.reward not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {s.reward!r}")


def chunk_size(k: int, batch_size: int) -> int:
    """Problems per chunk: as many as fill one generation batch of ``batch_size`` responses (≥ 1)."""
    return max(1, batch_size // k)


def chunk_seed(seed: int, dataset: str, chunk: int) -> int:
    """The sampling seed of one chunk: a hash of (seed, dataset name, chunk index) in [0, 2³¹)."""
    digest = hashlib.sha256(json.dumps([int(seed), str(dataset), int(chunk)]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompt_text(messages: list[dict[str, str]]) -> str:
    """A prompt's chat messages as one text (their contents, blank-line separated)."""
    return "\n\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------------------------------------
# One chunk
# ---------------------------------------------------------------------------------------------


def eval_chunk(model, tokenizer, dataset: str, problems: pd.DataFrame, settings: EvalSettings, seed: int) -> pd.DataFrame:
    """Graded rows (:data:`EVAL_COLUMNS`) of ``settings.k`` samples of each problem in ``problems``
    (columns of :func:`entropy_lens.io.datasets.load_problems`), problem-major. ``correct``: the
    grader's verdict; ``reward``: 1.0 or 0.0 (the ``01`` convention); ``length``: response tokens
    (the final EOS included when emitted); ``truncated``: no EOS within ``max_new_tokens``."""
    pids = [chat_prompt_ids(tokenizer, list(m)) for m in problems["prompt"]]
    outs = generate(model, tokenizer, pids, settings.k, settings.max_new_tokens, settings.batch_size,
                    settings.temperature, seed, top_p=settings.top_p, kv_cache=settings.kv_cache)
    texts = [tokenizer.decode(o["response_ids"], skip_special_tokens=True) for o in outs]
    truths = [str(problems["answer"].iat[o["prompt_index"]]) for o in outs]
    rewards = score_batch(texts, truths, settings.reward, "01")
    pi = [o["prompt_index"] for o in outs]
    return pd.DataFrame({
        "dataset": dataset,
        "problem": [int(problems["index"].iat[i]) for i in pi],
        "sample": np.tile(np.arange(settings.k), len(problems)),
        "prompt": [prompt_text(list(problems["prompt"].iat[i])) for i in pi],
        "response": texts,
        "ground_truth": truths,
        "correct": [r > 0 for r in rewards],
        "reward": np.asarray(rewards, dtype=np.float64),
        "length": [len(o["response_ids"]) for o in outs],
        "truncated": [not o["finished"] for o in outs],
    })


def _read_chunk(path: Path, expected_rows: int) -> pd.DataFrame:
    """A finished chunk, checked for its columns and row count."""
    part = read_table(path)
    if list(part.columns) != list(EVAL_COLUMNS) or len(part) != expected_rows:
        raise ValueError(f"{path}: not a chunk of this evaluation (columns or rows differ); remove it to redo it")
    return part


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------


def check_manifest(chunk_dir: Path, record: dict[str, Any]) -> None:
    """Write ``chunk_dir/manifest.json`` (``record``: settings, model, datasets), or refuse a
    chunk folder whose manifest records another evaluation."""
    manifest = chunk_dir / "manifest.json"
    if manifest.exists():
        before = read_json(manifest)
        if before != json.loads(json.dumps(record)):
            diff = [k for k in record if before.get(k) != record[k]]
            raise ValueError(f"{chunk_dir}: holds samples of a different evaluation (other {', '.join(diff) or 'settings'}); "
                             "use another output folder or remove it")
        return
    chunk_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, record)


def run_eval(
    model,
    tokenizer,
    problems: dict[str, pd.DataFrame],
    settings: EvalSettings,
    chunk_dir: str | Path,
    model_name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Evaluate every dataset of ``problems`` (name → :func:`~entropy_lens.io.datasets.load_problems`
    frame), chunk by chunk (resumable in ``chunk_dir``). Returns ``(rows, timing)``: all graded rows
    (:data:`EVAL_COLUMNS`, dataset by dataset, problem-major) and ``{"wall_s", "gen_s", "tokens"}``
    summed over every chunk, including chunks finished by an earlier run (kept in each chunk file's
    metadata). ``progress(responses, tokens)`` after each chunk (tokens 0 for a chunk read back)."""
    check_settings(settings)
    chunk_dir = Path(chunk_dir)
    check_manifest(chunk_dir, {"settings": asdict(settings), "model": model_name,
                               "datasets": {name: len(df) for name, df in problems.items()}})
    size = chunk_size(settings.k, settings.batch_size)
    parts: list[pd.DataFrame] = []
    timing = {"wall_s": 0.0, "gen_s": 0.0, "tokens": 0}
    for name, df in problems.items():
        for c, start in enumerate(range(0, len(df), size)):
            chunk = df.iloc[start : start + size]
            path = chunk_dir / name / f"chunk_{c:05d}.parquet"
            if path.exists():
                part = _read_chunk(path, len(chunk) * settings.k)
                done = part.attrs.get("timing", {})
                fresh = 0
            else:
                t0 = time.perf_counter()
                part = eval_chunk(model, tokenizer, name, chunk, settings, chunk_seed(settings.seed, name, c))
                wall = time.perf_counter() - t0
                done = {"wall_s": wall, "tokens": int(part["length"].sum())}
                part.attrs["timing"] = done
                atomic_write_parquet(path, part)
                fresh = done["tokens"]
            timing["wall_s"] += float(done.get("wall_s", 0.0))
            timing["tokens"] += int(done.get("tokens", 0))
            parts.append(part)
            if progress:
                progress(len(part), fresh)
    rows = pd.concat(parts, ignore_index=True)
    rows.attrs = {}
    return rows, timing


def summarize(rows: pd.DataFrame, settings: EvalSettings) -> dict[str, dict[str, Any]]:
    """Per dataset: ``n_problems``, ``k``, ``avg_at_k`` (mean correctness over all samples),
    ``pass_at_k`` (``{"1", "2", "4", …, str(k)}``, unbiased, :func:`entropy_lens.passk.pass_at_k_table`),
    ``mean_length`` (response tokens) and ``truncated_frac``."""
    out: dict[str, dict[str, Any]] = {}
    for name, d in rows.groupby("dataset", sort=False):
        per = d.groupby("problem", sort=True)["correct"].agg(["size", "sum"])
        n, c = per["size"].to_numpy(), per["sum"].to_numpy()
        out[str(name)] = {
            "n_problems": len(per),
            "k": int(settings.k),
            "avg_at_k": avg_at_k(n, c),
            "pass_at_k": pass_at_k_table(n, c),
            "mean_length": float(d["length"].mean()),
            "truncated_frac": float(d["truncated"].mean()),
        }
    return out


def checkpoint_tags(model_path: str | Path | None) -> dict[str, str]:
    """Tags of a trainer checkpoint (``<run>/checkpoints/step_NNNNNN/``, see
    :mod:`entropy_lens.train.checkpoint`): ``method`` and ``seed`` from the run's config.yaml,
    ``step`` from trainer_state.json (else the folder name), ``run`` = the run folder's name.
    Empty for anything else (the bundled model, a plain Hugging Face folder)."""
    if model_path is None:
        return {}
    p = Path(model_path)
    run = p.parent.parent
    if not (p.name.startswith("step_") and p.parent.name == "checkpoints" and (run / "config.yaml").is_file()):
        return {}
    config = read_yaml(run / "config.yaml").get("config")
    config = config if isinstance(config, dict) else {}
    tags = {"run": run.resolve().name}
    for key in ("method", "seed"):
        if config.get(key) is not None:
            tags[key] = str(config[key])
    state = p / "trainer_state.json"
    step = read_json(state).get("step") if state.is_file() else None
    suffix = p.name[len("step_"):]
    tags["step"] = str(int(step)) if isinstance(step, int) else (str(int(suffix)) if suffix.isdigit() else suffix)
    return tags
