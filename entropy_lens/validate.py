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

from . import estimators as est
from .advantages import compute_advantages
from .forward import PackedBatch, pack, response_entropy_fn, response_stats, scatter_rows
from .io.models import set_attention
from .io.rollouts import Tokenized, old_logp_grid, tokenize_rollouts
from .measure import grpo_token_mean_loss, one_step_update, restore, snapshot
from .objective import clip_active as clip_active_fn
from .tokens import TokenBatch

Progress = Callable[[str, int], None]


def score_estimator(pred: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Agreement of a per-token prediction with the measured ΔH (both in nats, same tokens).

    ``pcc``: Pearson; ``srcc``: Spearman (Pearson of average ranks); ``mse``: mean squared error;
    ``sign_agreement``: share of tokens with a non-zero prediction whose sign matches; ``total_pred``
    and ``total_measured``: batch sums. Correlations are NaN when either side is constant.
    """
    pred = np.asarray(pred, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        den = np.sqrt((a * a).sum() * (b * b).sum())
        return float((a * b).sum() / den) if den > 0 else float("nan")

    nz = pred != 0
    return {
        "pcc": pearson(pred, measured),
        "srcc": pearson(pd.Series(pred).rank().to_numpy(), pd.Series(measured).rank().to_numpy()),
        "mse": float(np.mean((pred - measured) ** 2)),
        "sign_agreement": float(np.mean(np.sign(pred[nz]) == np.sign(measured[nz]))) if nz.any() else float("nan"),
        "total_pred": float(pred.sum()),
        "total_measured": float(measured.sum()),
        "n": int(len(pred)),
    }


@dataclass(frozen=True)
class ValidateSettings:
    """Settings of one validation step (flat values; no nesting)."""

    lr: float = 1e-4
    optimizer: str = "sgd"
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    advantage: str = "grpo"
    micro_batch: int = 4
    weight_decay: float = 0.0
    jvp: bool = True


def instrument(
    model,
    packed: PackedBatch,
    reward: torch.Tensor,
    group_id: torch.Tensor,
    old_logp: torch.Tensor | None,
    settings: ValidateSettings,
    progress: Progress | None = None,
) -> tuple[TokenBatch, dict[str, torch.Tensor]]:
    """Per-token statistics at the current parameters plus every closed-form estimator.

    Returns the TokenBatch and a dict of ``[B, T]`` extra columns: ``ratio, clip_active,
    omega_paper, omega_code, dh_all_logit, dh_cov, quadrant``.
    """
    stats = response_stats(model, packed, settings.temperature, micro_batch=settings.micro_batch)
    if progress:
        progress("forward", int(packed.mask.shape[0]))
    mask = packed.mask
    if old_logp is None:
        old_logp = stats["logp"].clone()
    lengths = mask.sum(-1)
    seq_adv = compute_advantages(settings.advantage, reward, group_id, lengths=lengths)
    adv = torch.where(mask, seq_adv[:, None].expand_as(mask), 0.0).float()
    batch = TokenBatch(
        token_ids=packed.response_ids,
        mask=mask,
        logp=stats["logp"],
        old_logp=torch.where(mask, old_logp, 0.0),
        entropy=stats["entropy"],
        sum_p2=stats["sum_p2"],
        sum_p2_logp=stats["sum_p2_logp"],
        adv=adv,
        group_id=group_id,
        reward=reward.float(),
        meta={"temperature": settings.temperature},
    )
    return batch, closed_form_columns(batch, settings.lr, settings.eps_low, settings.eps_high, settings.dual_clip)


def closed_form_columns(
    batch: TokenBatch, lr: float, eps_low: float, eps_high: float, dual_clip: float | None
) -> dict[str, torch.Tensor]:
    """``ratio, clip_active, omega_paper, omega_code, dh_all_logit, dh_cov, quadrant`` ([B, T])."""
    m = batch.mask
    L = batch.n_tokens
    ratio = batch.ratio
    ica = clip_active_fn(ratio, batch.adv, eps_low, eps_high, dual_clip) & m
    icf = ica.float()
    zero = torch.zeros_like(batch.logp)
    cols = {
        "ratio": ratio,
        "clip_active": ica,
        "omega_paper": est.omega_paper(batch.logp, batch.entropy, batch.adv, ratio, icf, lr, L),
        "omega_code": est.omega_code(batch.logp, batch.old_logp, batch.entropy, batch.adv),
        "dh_all_logit": est.dh_all_logit(
            batch.logp, batch.entropy, batch.sum_p2, batch.sum_p2_logp, batch.adv, ratio, icf, lr, L
        ),
        "dh_cov": est.dh_cov(batch.logp, batch.adv, m, lr),
        "quadrant": est.quadrant(batch.logp, batch.entropy, batch.adv),
    }
    return {k: (torch.where(m, v, zero) if v.is_floating_point() else v) for k, v in cols.items()}


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
        dh_jvp = jvp_prediction(model, packed, theta, delta, settings, progress)
    return dh_measured, dh_jvp, loss


def jvp_prediction(
    model,
    packed: PackedBatch,
    theta: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    settings: ValidateSettings,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``dh_jvp`` ``[B, T]``: ∇_θ H_t · Δθ at θ for every response token, per micro-batch.

    Switches the model to eager attention for the duration (forward-mode AD does not pass
    through fused SDPA kernels) and back afterwards.
    """
    prev = getattr(model.config, "_attn_implementation", "sdpa")
    set_attention(model, "eager")
    out = torch.zeros(packed.mask.shape, dtype=torch.float32)
    moved = {n: d for n, d in delta.items() if bool(d.abs().max() > 0)}
    try:
        B = packed.mask.shape[0]
        for i in range(0, B, settings.micro_batch):
            rows = slice(i, min(i + settings.micro_batch, B))
            sub = packed.select(rows)
            fn = response_entropy_fn(model, sub, settings.temperature)
            with torch.no_grad():
                tangent = est.dh_jvp(fn, theta, moved) if moved else torch.zeros(int(sub.mask.sum()))
            out[rows] = scatter_rows(tangent.float(), sub.mask)
            if progress:
                progress("jvp", rows.stop - rows.start)
    finally:
        set_attention(model, prev)
    return out


def run_validate(
    model,
    tokenizer,
    rollouts: pd.DataFrame,
    settings: ValidateSettings,
    source: str = "<rollouts>",
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Full validation on a validated rollouts frame; returns ``(tokens frame, summary dict)``."""
    tok: Tokenized = tokenize_rollouts(rollouts, tokenizer, source)
    packed = pack(tok.prompt_ids, tok.response_ids, tokenizer.pad_token_id)
    lengths = [len(r) for r in tok.response_ids]
    old = old_logp_grid(rollouts, lengths, source)
    reward = torch.tensor(rollouts["reward"].to_numpy(np.float64), dtype=torch.float32)
    group_id = torch.tensor(rollouts["group_id"].to_numpy(np.int64))
    batch, cols = instrument(model, packed, reward, group_id, old, settings, progress)
    dh_measured, dh_jvp, loss = measured_and_jvp(model, packed, batch, settings, progress)
    cols["dh_measured"] = dh_measured
    if dh_jvp is not None:
        cols["dh_jvp"] = dh_jvp
    texts = [[tokenizer.decode([t]) for t in ids] for ids in tok.response_ids]
    frame = batch.to_frame(extra=cols, token_text=texts)
    frame["quadrant"] = frame["quadrant"].astype(np.int8)
    summary = summarize(frame, batch, settings, tok, loss)
    return frame, summary


def zero_advantage_notes(batch: TokenBatch) -> list[str]:
    """A note when some groups have all-equal rewards (advantage 0: no update from them)."""
    seq_adv = batch.adv.abs().amax(-1)
    groups = batch.group_id.unique()
    zero = int(sum(1 for g in groups if bool((seq_adv[batch.group_id == g] == 0).all())))  # loop over groups
    if not zero:
        return []
    return [f"{zero} of {len(groups)} groups have equal rewards: advantage 0, no update from them"]


def summarize(frame: pd.DataFrame, batch: TokenBatch, settings: ValidateSettings, tok: Tokenized, loss: float) -> dict[str, Any]:
    """summary.json content: estimator scores, settings, per-quadrant shares and notes."""
    L = batch.n_tokens
    meas = frame["dh_measured"].to_numpy()
    scores = {}
    for name in est.ESTIMATORS:
        if name in frame.columns:
            pred = est.scaled_prediction(name, torch.tensor(frame[name].to_numpy()), settings.lr, L).numpy()
            scores[name] = score_estimator(pred, meas)
    n_groups = int(batch.group_id.unique().numel())
    notes = list(tok.notes) + zero_advantage_notes(batch)
    quad = {}
    for q in (1, 2, 3, 4):
        sel = frame["quadrant"] == q
        quad[f"Q{q}"] = {"token_share": float(sel.mean()), "dh_measured": float(frame.loc[sel, "dh_measured"].sum())}
    return {
        "n_sequences": int(batch.mask.shape[0]),
        "n_tokens": L,
        "n_groups": n_groups,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "loss": loss,
        "mean_entropy": float(frame["entropy"].mean()),
        "clip_active_share": float(frame["clip_active"].mean()),
        "estimators": scores,
        "scaling": "omega_code scored as -(lr/L)*omega_code; dh_cov = -(lr/L)*c; others are in nats as written",
        "quadrants": quad,
        "retokenized": tok.retokenized,
        "notes": notes,
    }
