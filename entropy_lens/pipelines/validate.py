"""Validate the ΔH estimators against the measured change of one real optimizer step.

Pipeline (no printing; ``progress(stage, advance)`` reports work done):
rollouts → token ids → per-token statistics at θ → advantages → closed-form estimators →
one optimizer step θ → θ' on the GRPO token-mean objective → entropies at θ' (measured ΔH) →
``dh_jvp``: ∇_θ H · (θ' − θ) at θ by forward-mode AD → scores per estimator.

Device: the model's. The packed batch goes there once; the loss's per-token inputs, the
parameter snapshots, the update and the JVP stay there; the per-token statistics come back to
the CPU per micro-batch (:func:`entropy_lens.model.forward.response_stats`) and the JVP once.

Several processes (:mod:`entropy_lens.dist`, ``ranks``): rank r of N takes the contiguous block
of sequences ``⌊rB/N⌋ … ⌊(r+1)B/N⌋ − 1`` (:func:`rank_rows`; ranks beyond B sequences stay idle)
for every model pass. The statistics at θ of all ranks are merged (exact), so every rank holds
the whole batch's advantages, estimators and token count L; each rank accumulates the gradient of
(1/L) · Σ over its own tokens of the per-token loss, the gradients are summed across ranks
(:mod:`entropy_lens.collectives`) and every rank takes the same optimizer step (data-parallel
semantics: the single-process update); then each rank measures ΔH, the η = 0 floor and ``dh_jvp``
on its own sequences and the grids are merged again. Rank 0 builds the same tokens frame and
summary as one process (``summary["world_size"]`` records N); a failure on any rank fails every
rank (:func:`entropy_lens.dist.agreed`) before anything is merged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from entropy_lens import dist
from entropy_lens import estimators as est
from entropy_lens.collectives import gather_rows, grad_sum
from entropy_lens.io.rollouts import Tokenized
from entropy_lens.model.budget import check_budget
from entropy_lens.model.forward import PackedBatch, response_stats
from entropy_lens.model.jvp import jvp_prediction
from entropy_lens.model.load import model_device, model_dtype
from entropy_lens.model.update import (
    LOW_PRECISION,
    grpo_token_mean_loss,
    one_step_update,
    restore,
    snapshot,
    trainable_params,
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


def rank_rows(n_sequences: int, rank: int = 0, world_size: int = 1) -> slice:
    """The sequences rank ``rank`` of ``world_size`` processes: the contiguous block
    ``⌊rank·B/N⌋ : ⌊(rank+1)·B/N⌋`` of the B = ``n_sequences`` (sizes differ by at most one; empty
    for some ranks when B < N). One process: every sequence."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: need 0 <= rank < world size")
    return slice(rank * n_sequences // world_size, (rank + 1) * n_sequences // world_size)


def check_memory(model, prep: Prepared, micro_batch: int, jvp: bool, what: str = "validate",
                 rows: slice | None = None) -> int | None:
    """:func:`entropy_lens.model.budget.check_budget` for a prepared batch (packed = prompt +
    response tokens per sequence; ``rows``: only those sequences, a rank's share): a one-line
    ValueError before any work when the estimated peak does not fit in the available memory of
    the model's device; returns the estimate (bytes) or None."""
    rows = rows or slice(None)
    packed = [len(p) + len(r) for p, r in zip(prep.tok.prompt_ids[rows], prep.tok.response_ids[rows])]
    return check_budget(packed, model, micro_batch, jvp, response_lengths=prep.lengths[rows], what=what)


def instrument(
    model, prep: Prepared, settings: ValidateSettings, progress: Progress | None = None,
    ranks: dist.Ranks = dist.SINGLE,
) -> tuple[PackedBatch, TokenBatch, dict[str, torch.Tensor]]:
    """Per-token statistics at the current parameters plus every closed-form estimator.

    Returns the packed batch (all B sequences, on the CPU), the TokenBatch (float32, ``[B, T]``,
    CPU) and a dict of ``[B, T]`` extra columns: ``ratio, clip_active, omega_paper, omega_code,
    dh_all_logit, dh_cov, quadrant``. The forward runs on the model's device, on this rank's
    sequences (:func:`rank_rows`); the statistics of all ranks are merged, so every rank returns
    the whole batch. ``progress("forward", n)``: n = this rank's sequences.
    """
    packed = prep.packed()
    B = packed.mask.shape[0]
    rows = rank_rows(B, ranks.rank, ranks.world_size)
    with dist.agreed(ranks):
        own = response_stats(model, packed.select(rows).to(model_device(model)), settings.temperature,
                             micro_batch=settings.micro_batch)
    stats = gather_rows(own, rows, B, ranks)
    if progress:
        progress("forward", rows.stop - rows.start)
    with dist.agreed(ranks):
        batch = token_batch(stats, packed.response_ids, packed.mask, prep.old_logp, prep.reward, prep.group_id,
                            settings.advantage, settings.temperature)
        cols = est.closed_form_columns(batch, settings.lr, settings.eps_low, settings.eps_high, settings.dual_clip)
    return packed, batch, cols


def measuring_model(model):
    """The model the entropies are measured with: ``model`` itself when its parameters are fp32
    (or fp64), else an fp32 copy, so that a small step is not lost to bf16/fp16 rounding of the
    parameters or of the measuring forward."""
    if next(model.parameters()).dtype not in LOW_PRECISION:
        return model
    return copy.deepcopy(model).float()


@torch.no_grad()
def entropy_after(meter, packed: PackedBatch, theta: dict[str, torch.Tensor], delta: dict[str, torch.Tensor] | None,
                  settings: ValidateSettings) -> torch.Tensor:
    """Entropies ``[B, T]`` (nats, fp32, on the CPU) of the measuring model at θ + Δθ (fp32 arithmetic;
    ``delta`` None: at θ, the η = 0 floor); ``packed``, ``theta`` and ``delta`` on the model's
    device. ``theta`` may be in a lower precision than the measuring model (the model's own bf16
    parameters): each is copied up exactly. The parameters are set one at a time in place (no
    second copy of the model) and restored to θ afterwards."""
    params = trainable_params(meter)
    try:
        for n, p in params.items():
            p.copy_(theta[n])
            if delta is not None:
                p.add_(delta[n].to(p.dtype))
        return response_stats(meter, packed, settings.temperature, micro_batch=settings.micro_batch)["entropy"]
    finally:
        restore(meter, theta)


def abs_quantiles(values: torch.Tensor) -> dict[str, float]:
    """Quantiles p50, p90, p99 and the max of |values| (a 1-d tensor), as floats."""
    a = values.abs().double()
    if a.numel() == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    q = torch.quantile(a, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(a.max())}


def noise_floor(dh_step: torch.Tensor, dh_zero: torch.Tensor, mask: torch.Tensor, meter_dtype: torch.dtype) -> dict[str, Any]:
    """The η = 0 run of the measuring path against the real step: per-token |ΔH| quantiles of
    both, their p50 ratio, and a note when the step's median is below 10× the floor's."""
    floor, signal = abs_quantiles(dh_zero[mask]), abs_quantiles(dh_step[mask])
    ratio = signal["p50"] / floor["p50"] if floor["p50"] > 0 else None
    note = None
    if ratio is not None and ratio < 10:
        note = (f"the measured |ΔH| median is only {ratio:.1f}× the noise floor (the same measurement with η = 0); "
                "raise --lr or measure in float32")
    return {"method": "the measuring path re-run with η = 0 (Δθ = 0)", "measuring_dtype": str(meter_dtype).replace("torch.", ""),
            "floor_abs_dh": floor, "step_abs_dh": signal, "p50_ratio": ratio, "note": note}


def measured_and_jvp(
    model,
    packed: PackedBatch,
    batch: TokenBatch,
    settings: ValidateSettings,
    progress: Progress | None = None,
    ranks: dist.Ranks = dist.SINGLE,
) -> tuple[torch.Tensor, torch.Tensor | None, float, dict[str, Any]]:
    """(dh_measured, dh_jvp or None, loss, noise floor) with ``[B, T]`` fp32 tensors on the CPU
    (nats; 0 on padding); the model is restored to θ afterwards.

    ΔH_t = H_t(θ') − H_t(θ) with θ' = θ + Δθ the real step; dh_jvp_t = ∇_θ H_t · Δθ. The step is
    taken with the model in its own dtype (fp32 master update for bf16/fp16,
    :func:`entropy_lens.model.update.one_step_update`); entropies before and after it, the η = 0
    floor and the JVP use :func:`measuring_model` (fp32). ``packed`` and ``batch``: the whole
    batch (any device); this rank's sequences (:func:`rank_rows`) go to the model's device once.
    With several ranks the loss is normalised by the whole batch's token count L and the
    gradients are summed across ranks before the step (:func:`entropy_lens.collectives.grad_sum`);
    every rank returns the whole batch's grids and the summed loss.
    """
    B = batch.mask.shape[0]
    rows = rank_rows(B, ranks.rank, ranks.world_size)
    device = model_device(model)
    with dist.agreed(ranks):
        mine = packed.select(rows).to(device)
        theta = snapshot(model)
        loss_fn = grpo_token_mean_loss(batch.old_logp[rows], batch.adv[rows], batch.mask[rows], settings.eps_low,
                                       settings.eps_high, settings.dual_clip, n_tokens=batch.n_tokens, device=device)
        try:
            delta, loss = one_step_update(
                model, mine, loss_fn, settings.lr, settings.optimizer, settings.temperature,
                settings.micro_batch, settings.weight_decay,
                progress=(lambda n: progress("update", n)) if progress else None,
                reduce=grad_sum(ranks), first_row=rows.start, before=theta,
            )
        finally:
            restore(model, theta)
        meter = measuring_model(model)
        if meter is not model:  # θ of the fp32 copy: the model's own parameters, copied up exactly
            del theta
            theta = {n: q.detach() for n, q in trainable_params(model).items()}
        own: dict[str, torch.Tensor] = {}
        if meter is not model:
            own["before"] = response_stats(meter, mine, settings.temperature, micro_batch=settings.micro_batch)["entropy"]
        own["after"] = entropy_after(meter, mine, theta, delta, settings)
        if progress:
            progress("forward after", rows.stop - rows.start)
        own["zero"] = entropy_after(meter, mine, theta, None, settings)
        if settings.jvp:
            theta_m = {n: q.detach() for n, q in trainable_params(meter).items()}  # the meter at θ: views, no copy
            own["jvp"] = jvp_prediction(meter, mine, theta_m, {n: d.to(theta_m[n].dtype) for n, d in delta.items()},
                                        settings.temperature, settings.micro_batch, progress)
        meter_dtype = next(meter.parameters()).dtype
    grids = gather_rows(own, rows, B, ranks)
    mask = batch.mask.cpu()
    before = grids["before"] if "before" in grids else batch.entropy.cpu()
    dh_measured = torch.where(mask, grids["after"] - before, 0.0)
    dh_zero = torch.where(mask, grids["zero"] - before, 0.0)
    floor = noise_floor(dh_measured, dh_zero, mask, meter_dtype)
    dh_jvp = torch.where(mask, grids["jvp"], 0.0) if settings.jvp else None
    return dh_measured, dh_jvp, loss, floor


def run_validate(
    model,
    tokenizer,
    rollouts: pd.DataFrame,
    settings: ValidateSettings,
    source: str = "<rollouts>",
    progress: Progress | None = None,
    ranks: dist.Ranks = dist.SINGLE,
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Full validation on a validated rollouts frame; returns ``(tokens frame, summary dict)`` on
    rank 0 and None on the other ranks (``ranks``: the processes of a torchrun launch; one
    process by default). The tokens frame and summary equal a single process's within
    floating-point tolerance; ``summary["world_size"]`` records N. The memory check covers this
    rank's share of the sequences on the model's device."""
    with dist.agreed(ranks):
        prep = prepare(rollouts, tokenizer, source, settings.max_len)
        check_memory(model, prep, settings.micro_batch, settings.jvp,
                     rows=rank_rows(prep.n_sequences, ranks.rank, ranks.world_size))
    packed, batch, cols = instrument(model, prep, settings, progress, ranks)
    dh_measured, dh_jvp, loss, floor = measured_and_jvp(model, packed, batch, settings, progress, ranks)
    if not ranks.is_main:
        return None
    cols["dh_measured"] = dh_measured
    if dh_jvp is not None:
        cols["dh_jvp"] = dh_jvp
    frame = batch.to_frame(extra=cols, token_text=token_texts(tokenizer, prep.tok.response_ids))
    frame["quadrant"] = frame["quadrant"].astype(np.int8)
    summary = summarize(frame, batch, settings, prep.tok, loss)
    low = next(model.parameters()).dtype in LOW_PRECISION
    summary["precision"] = {"model_dtype": model_dtype(model),
                            "update": "fp32 master copy of the parameters" if low else "in the model's dtype",
                            "measuring_dtype": floor["measuring_dtype"]}
    summary["noise_floor"] = floor
    summary["world_size"] = ranks.world_size
    if floor["note"]:
        summary["notes"].append(floor["note"])
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
