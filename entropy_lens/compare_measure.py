"""Counterfactual one-step comparison: the measured ΔH after one real optimizer step per method.

From the same checkpoint and the same batch, each method's terms (``entropy_lens.methods``) go
through the one objective (``methods.loss``, token-mean), one SGD/AdamW step is taken, the batch
is re-forwarded, and the model is restored before the next method.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .forward import pack, response_stats
from .io.rollouts import old_logp_grid, tokenize_rollouts
from .measure import one_step_update, restore, snapshot, token_mean_loss
from .methods import apply_method, make_context, params_from_dict
from .validate import ValidateSettings, instrument


def measure_methods(
    model,
    tokenizer,
    rollouts: pd.DataFrame,
    methods: list[str],
    overrides: dict[str, dict[str, Any]] | None,
    settings: ValidateSettings,
    seed: int = 0,
    source: str = "<rollouts>",
    progress: Callable[[str, int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Measured per-token ΔH of one step under each method.

    Returns ``(long frame: method, sample, pos, dh_measured_step)`` and per method
    ``{dh_measured (batch sum, nats), per-quadrant sums Q1..Q4, loss}``.
    """
    overrides = overrides or {}
    params = {m: params_from_dict(m, overrides.get(m)) for m in methods}  # fail before any work
    tok = tokenize_rollouts(rollouts, tokenizer, source)
    packed = pack(tok.prompt_ids, tok.response_ids, tokenizer.pad_token_id)
    old = old_logp_grid(rollouts, [len(r) for r in tok.response_ids], source)
    reward = torch.tensor(rollouts["reward"].to_numpy(np.float64), dtype=torch.float32)
    group_id = torch.tensor(rollouts["group_id"].to_numpy(np.int64))
    batch, cols = instrument(model, packed, reward, group_id, old, settings)
    theta = snapshot(model)
    b_idx, t_idx = torch.nonzero(batch.mask, as_tuple=True)
    frames, totals = [], {}
    for name in methods:  # loop over methods only
        terms = apply_method(name, batch, params[name], make_context(seed, settings.lr))
        loss_fn = token_mean_loss(terms, batch.old_logp, batch.adv, batch.mask)
        try:
            _, loss = one_step_update(model, packed, loss_fn, settings.lr, settings.optimizer, settings.temperature,
                                      settings.micro_batch, settings.weight_decay)
            after = response_stats(model, packed, settings.temperature, micro_batch=settings.micro_batch)
        finally:
            restore(model, theta)
        dh = (after["entropy"] - batch.entropy)[batch.mask].double().numpy()
        q = cols["quadrant"][batch.mask].numpy()
        totals[name] = {"dh_measured": float(dh.sum()), "loss": loss,
                        **{f"Q{k}": float(dh[q == k].sum()) for k in (1, 2, 3, 4)}}
        frames.append(pd.DataFrame({"method": name, "sample": b_idx.numpy(), "pos": t_idx.numpy(), "dh_measured_step": dh}))
        if progress:
            progress("methods", 1)
    return pd.concat(frames, ignore_index=True), totals
