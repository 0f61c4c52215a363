"""`sample`: real rollouts from a model on a prompt dataset, scored by a verifier."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from entropy_lens.io.prompts import chat_prompt_ids
from entropy_lens.model.generate import sample_responses
from entropy_lens.rewards import score_batch


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
    """``n`` responses per prompt of ``prompts`` (columns prompt, ground_truth) as a rollout frame:
    ``prompt, response, reward, ground_truth, group, prompt_ids, response_ids, old_logp, finished``.
    ``reward``: verifier name (``math`` or ``dapo``); ``convention``: ``pm1`` (±1) or ``01``;
    ``top_p``: nucleus sampling (1: the full softmax). ``old_logp`` is always the log-prob under
    the full softmax at τ (:func:`entropy_lens.model.generate.generate`). The sampling settings are
    kept in ``frame.attrs["sampling"]`` (stored in a parquet file's metadata)."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    pids = [chat_prompt_ids(tokenizer, list(m)) for m in prompts["prompt"]]
    outs = sample_responses(model, tokenizer, pids, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                            seed=seed, batch_size=batch_size, progress=progress, top_p=top_p)
    texts = [tokenizer.decode(o["response_ids"], skip_special_tokens=True) for o in outs]
    gts = [str(prompts["ground_truth"].iloc[o["prompt_index"]]) for o in outs]
    rewards = score_batch(texts, gts, reward, convention)
    frame = pd.DataFrame({
        "prompt": [list(prompts["prompt"].iloc[o["prompt_index"]]) for o in outs],
        "response": texts,
        "reward": rewards,
        "ground_truth": gts,
        "group": [str(o["prompt_index"]) for o in outs],
        "prompt_ids": [o["prompt_ids"] for o in outs],
        "response_ids": [o["response_ids"] for o in outs],
        "old_logp": [o["old_logp"] for o in outs],
        "finished": [o["finished"] for o in outs],
    })
    frame.attrs["sampling"] = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                               "seed": seed, "reward": reward, "convention": convention, "batch_size": batch_size}
    return frame
