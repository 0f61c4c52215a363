"""Validate the ΔH estimators against the measured change of one real optimizer step.

Pipeline (no printing; ``progress(stage, advance)`` reports work done):
rollouts → token ids → per-token statistics at θ → advantages → closed-form estimators →
one optimizer step θ → θ' on the GRPO token-mean objective → entropies at θ' (measured ΔH) →
``dh_jvp``: ∇_θ H · (θ' − θ) at θ by forward-mode AD → scores per estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from entropy_lens import estimators as est
from entropy_lens.io.rollouts import Tokenized
from entropy_lens.model.budget import check_budget
from entropy_lens.model.forward import PackedBatch, response_stats
from entropy_lens.model.jvp import jvp_prediction
from entropy_lens.model.update import (
    grpo_token_mean_loss,
    one_step_update,
    restore,
    snapshot,
)
from entropy_lens.pipelines.prepare import (
    BatchSettings,
    Prepared,
    prepare,
    token_batch,
    token_texts,
)
from entropy_lens.scoring import (
    QUADRANT_LABELS,
    quadrant_table,
    score_frame,
    zero_advantage_notes,
)
from entropy_lens.tokens import TokenBatch

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class ValidateSettings(BatchSettings):
    """:class:`BatchSettings` with η = ``lr`` of the one real step, its ``optimizer`` (sgd or
    adamw) and ``weight_decay``, whether to compute ``dh_jvp`` (``jvp``), and ``max_len``: cut
    responses to their first ``max_len`` tokens (None: whole; a note in the summary says so)."""

    lr: float = 1e-4
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    jvp: bool = True
    max_len: int | None = None


def check_memory(model, prep: Prepared, micro_batch: int, jvp: bool, what: str = "validate") -> int | None:
    """:func:`entropy_lens.model.budget.check_budget` for a prepared batch (packed = prompt +
    response tokens per sequence): a one-line ValueError before any work when the estimated peak
    does not fit in the available memory; returns the estimate (bytes) or None."""
    packed = [len(p) + len(r) for p, r in zip(prep.tok.prompt_ids, prep.tok.response_ids)]
    return check_budget(packed, model, micro_batch, jvp, response_lengths=prep.lengths, what=what)


def instrument(
    model, prep: Prepared, settings: ValidateSettings, progress: Progress | None = None
) -> tuple[PackedBatch, TokenBatch, dict[str, torch.Tensor]]:
    """Per-token statistics at the current parameters plus every closed-form estimator.

    Returns the packed batch, the TokenBatch (float32) and a dict of ``[B, T]`` extra columns:
    ``ratio, clip_active, omega_paper, omega_code, dh_all_logit, dh_cov, quadrant``.
    """
    packed = prep.packed()
    stats = response_stats(model, packed, settings.temperature, micro_batch=settings.micro_batch)
    if progress:
        progress("forward", int(packed.mask.shape[0]))
    batch = token_batch(stats, packed.response_ids, packed.mask, prep.old_logp, prep.reward, prep.group_id,
                        settings.advantage, settings.temperature)
    cols = est.closed_form_columns(batch, settings.lr, settings.eps_low, settings.eps_high, settings.dual_clip)
    return packed, batch, cols


def measured_and_jvp(
    model,
    packed: PackedBatch,
    batch: TokenBatch,
    settings: ValidateSettings,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(dh_measured, dh_jvp or None, loss) ``[B, T]``; the model is restored to θ afterwards."""
    theta = snapshot(model)
    loss_fn = grpo_token_mean_loss(batch.old_logp, batch.adv, batch.mask, settings.eps_low, settings.eps_high, settings.dual_clip)
    try:
        delta, loss = one_step_update(
            model, packed, loss_fn, settings.lr, settings.optimizer, settings.temperature,
            settings.micro_batch, settings.weight_decay,
            progress=(lambda n: progress("update", n)) if progress else None,
        )
        after = response_stats(model, packed, settings.temperature, micro_batch=settings.micro_batch)
        if progress:
            progress("forward after", int(packed.mask.shape[0]))
        dh_measured = torch.where(batch.mask, after["entropy"] - batch.entropy, 0.0)
    finally:
        restore(model, theta)
    dh_jvp = None
    if settings.jvp:
        dh_jvp = jvp_prediction(model, packed, theta, delta, settings.temperature, settings.micro_batch, progress)
    return dh_measured, dh_jvp, loss


def run_validate(
    model,
    tokenizer,
    rollouts: pd.DataFrame,
    settings: ValidateSettings,
    source: str = "<rollouts>",
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Full validation on a validated rollouts frame; returns ``(tokens frame, summary dict)``."""
    prep = prepare(rollouts, tokenizer, source, settings.max_len)
    check_memory(model, prep, settings.micro_batch, settings.jvp)
    packed, batch, cols = instrument(model, prep, settings, progress)
    dh_measured, dh_jvp, loss = measured_and_jvp(model, packed, batch, settings, progress)
    cols["dh_measured"] = dh_measured
    if dh_jvp is not None:
        cols["dh_jvp"] = dh_jvp
    frame = batch.to_frame(extra=cols, token_text=token_texts(tokenizer, prep.tok.response_ids))
    frame["quadrant"] = frame["quadrant"].astype(np.int8)
    summary = summarize(frame, batch, settings, prep.tok, loss)
    return frame, summary


def summarize(frame: pd.DataFrame, batch: TokenBatch, settings: ValidateSettings, tok: Tokenized, loss: float) -> dict[str, Any]:
    """summary.json content: estimator scores, settings, per-quadrant shares and notes."""
    L = batch.n_tokens
    notes = list(tok.notes) + zero_advantage_notes(batch.group_id, batch.adv.abs().amax(-1))
    quad = quadrant_table(frame["quadrant"].to_numpy(), {"dh_measured": frame["dh_measured"].to_numpy()},
                          QUADRANT_LABELS[1:])
    return {
        "n_sequences": int(batch.mask.shape[0]),
        "n_tokens": L,
        "n_groups": int(batch.group_id.unique().numel()),
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "loss": loss,
        "mean_entropy": float(frame["entropy"].mean()),
        "clip_active_share": float(frame["clip_active"].mean()),
        "estimators": score_frame(frame, settings.lr, L),
        "scaling": "omega_code scored as -(lr/L)*omega_code; dh_cov = -(lr/L)*c; others are in nats as written",
        "quadrants": quad,
        "retokenized": tok.retokenized,
        "notes": notes,
    }
