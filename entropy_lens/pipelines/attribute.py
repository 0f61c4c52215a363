"""Where each token's entropy change comes from: the exact splits of ``dh_jvp`` and the LM-head
kernel estimators on one real step (docs/attribution.md).

Pipeline (no printing; ``progress(stage, advance)`` reports work done): rollouts → statistics and
closed forms at θ (:func:`entropy_lens.pipelines.validate.instrument`) → one real optimizer step
(Δθ, measured ΔH) → ``dh_jvp`` → the LM-head estimators → per split, one JVP per part along the
part's share of Δθ (:mod:`entropy_lens.attribution`) → scores and tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from entropy_lens import attribution as att
from entropy_lens import estimators as est
from entropy_lens.advantages import compute_advantages
from entropy_lens.model.forward import (
    PackedBatch,
    ResponseEntropy,
    response_logp_entropy,
    response_stats,
    scatter_rows,
)
from entropy_lens.model.head import final_hidden, head_weights
from entropy_lens.model.jvp import forward_ad_attention, jvp_prediction
from entropy_lens.model.update import (
    grpo_token_mean_loss,
    one_step_update,
    restore,
    snapshot,
    trainable_params,
)
from entropy_lens.pipelines.prepare import BatchSettings, prepare, token_texts
from entropy_lens.pipelines.validate import check_memory, instrument
from entropy_lens.scoring import QUADRANT_LABELS, score_frame, zero_advantage_notes
from entropy_lens.tokens import TokenBatch

Progress = Callable[[str, int], None]

#: Estimator columns scored by ``attribute`` (the package's and the LM-head kernel's).
ATTRIBUTE_ESTIMATORS = (*est.ESTIMATORS, "dh_lm_head", "dh_self_kernel")


@dataclass(frozen=True)
class AttributeSettings(BatchSettings):
    """:class:`BatchSettings` with η = ``lr`` and the ``optimizer`` (sgd or adamw) of the one real
    step, the splits ``by`` (:data:`entropy_lens.attribution.SPLITS`), ``max_len`` (cut responses
    to their first N tokens) and ``chunk_rows`` tokens per LM-head chunk."""

    lr: float = 1e-4
    optimizer: str = "sgd"
    by: tuple[str, ...] = ("layer", "source")
    max_len: int | None = None
    chunk_rows: int = 256


def check_splits(by: tuple[str, ...]) -> None:
    """ValueError (one line) for an empty or unknown split name."""
    bad = [b for b in by if b not in att.SPLITS]
    if bad or not by:
        raise ValueError(f"--by: unknown part {', '.join(map(repr, bad)) or '(none)'}; choose from {', '.join(att.SPLITS)}")


def check_advantages(reward: torch.Tensor, group_id: torch.Tensor, advantage: str = "grpo") -> None:
    """ValueError (one line) when no rollout has a non-zero advantage: nothing moves, nothing to attribute."""
    if reward.numel() == 0:
        raise ValueError("no rollouts: nothing to attribute")
    adv = compute_advantages(advantage, reward.double(), group_id, lengths=torch.ones_like(reward))
    if not bool((adv != 0).any()):
        raise ValueError("every advantage is zero (each group has equal rewards): no update, nothing to attribute")


# ---------------------------------------------------------------------------------------------
# JVPs with the tied LM head's two roles kept apart
# ---------------------------------------------------------------------------------------------


def head_roles(model) -> tuple[str | None, str | None]:
    """(input-embedding name, LM-head name) when the two share one matrix, else (None, None)."""
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    head = model.get_output_embeddings().weight
    if head is not model.get_input_embeddings().weight:
        return None, None
    shared = names[id(head)]
    emb = next(n for n in shared if att.param_group(n) == "embed")
    return emb, next(n for n in shared if n != emb)


def role_entropy_fn(model, packed: PackedBatch, temperature: float):
    """``params -> H [M]`` with tied weights untied: the input embedding and the LM head take the
    values given under their own names, so a tangent can move one role of a shared matrix."""
    view = ResponseEntropy(model, packed, temperature, promote=True)

    def fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(view, {f"model.{k}": v for k, v in params.items()}, (), tie_weights=False, strict=False)

    return fn


def with_roles(tensors: dict[str, torch.Tensor], roles: tuple[str | None, str | None]) -> dict[str, torch.Tensor]:
    """``tensors`` with the shared matrix also under the LM head's name (both roles move)."""
    emb, head = roles
    return {**tensors, head: tensors[emb]} if emb is not None and emb in tensors else dict(tensors)


def jvp_rows(model, packed: PackedBatch, primals: dict, tangent: dict, temperature: float, micro_batch: int) -> torch.Tensor:
    """∇_θH·t ``[B, T]`` (nats) of every response token of ``packed`` along ``tangent`` (names ⊆
    ``primals``, roles untied), ``micro_batch`` sequences at a time; the model must be in eager attention."""
    moved = {n: t for n, t in tangent.items() if bool(t.abs().max() > 0)}
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tangent.values()) else torch.float32
    out = torch.zeros(packed.mask.shape, dtype=dtype)
    if not moved:
        return out
    B = packed.mask.shape[0]
    for i in range(0, B, micro_batch):
        sub = packed.select(slice(i, min(i + micro_batch, B)))
        with torch.no_grad():
            tan = est.dh_jvp(role_entropy_fn(model, sub, temperature), primals, moved)
        out[i : i + micro_batch] = scatter_rows(tan.to(dtype), sub.mask)
    return out


# ---------------------------------------------------------------------------------------------
# Gradients of parts of the loss
# ---------------------------------------------------------------------------------------------


def batch_gradient(model, packed: PackedBatch, loss_fn, slices: list[slice], temperature: float) -> dict:
    """∇_θ of the part of the batch loss carried by the sequences ``slices`` (each one forward +
    backward; ``loss_fn`` keeps the batch normaliser L), zeros for parameters without a gradient."""
    params = trainable_params(model)
    for p in params.values():
        p.grad = None
    for rows in slices:
        logp, ent = response_logp_entropy(model, packed.select(rows), temperature)
        loss_fn(rows, logp, ent).backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads


def micro_slices(active: torch.Tensor, micro_batch: int) -> list[slice]:
    """Micro-batches of ``micro_batch`` sequences that hold at least one ``active`` ``[B]`` sequence."""
    B = int(active.shape[0])
    return [slice(i, min(i + micro_batch, B)) for i in range(0, B, micro_batch) if bool(active[i : i + micro_batch].any())]


# ---------------------------------------------------------------------------------------------
# The splits (docs/attribution.md eq. 2–5)
# ---------------------------------------------------------------------------------------------


@dataclass
class StepState:
    """One real step and what every split needs: ``theta`` (parameters before, tied roles both
    named), ``delta`` Δθ (same names), ``scale`` D = Δθ/g (eq. 3), ``roles`` of a tied head, the
    ``loss_fn`` of the step, ``dh_jvp`` ``[B, T]`` and the token ``batch``."""

    theta: dict
    delta: dict
    scale: dict | None
    roles: tuple[str | None, str | None]
    loss_fn: Any
    dh_jvp: torch.Tensor
    batch: TokenBatch


def group_split(model, packed: PackedBatch, st: StepState, s: AttributeSettings, progress: Progress | None,
                kind: str = "layer") -> dict:
    """``{group: [B, T]}``: ∇_θH·Δθ_group for every parameter group (eq. 2) — per block (``layer``:
    ``block{i}.attn`` …) or summed over blocks (``kind``: ``attn``, ``mlp``, ``norm``). A tied matrix
    counts once in ``embed`` (its input role) and once in ``lm_head`` (its output role), both with Δθ."""
    head = st.roles[1]
    groups = {n: att.param_group(n) for n in st.delta}
    if head is not None:
        groups[head] = "lm_head"
    if kind == "kind":
        groups = {n: att.group_kind(g) for n, g in groups.items()}
    tangents = with_roles(st.delta, st.roles)
    out = {}
    for g, names in att.split_by_group(list(tangents), groups).items():  # a few dozen groups
        out[g] = jvp_rows(model, packed, st.theta, {n: tangents[n] for n in names}, s.temperature, s.micro_batch)
        if progress:
            progress(kind, 1)
    return out


def _scaled(scale: dict, grad: dict, roles) -> dict:
    """D ⊙ g_s with the tied roles both named (the source's share of the real step, eq. 3)."""
    return with_roles({n: scale[n] * grad[n] for n in scale}, roles)


def source_split(model, packed: PackedBatch, st: StepState, s: AttributeSettings, progress: Progress | None) -> dict:
    """``{own, group, other: [B, T]}`` (eq. 4): the step made from the receiver's own sequence, from
    the other sequences of its group, and the rest of Δθ (the other groups)."""
    own = torch.zeros_like(st.dh_jvp, dtype=torch.float64)
    grp = torch.zeros_like(own)
    seq_adv = st.batch.adv.abs().amax(-1)
    for gid in st.batch.group_id.unique().tolist():  # per group of the batch
        idx = torch.nonzero(st.batch.group_id == gid).flatten()
        sub = packed.select(idx)
        for b in idx.tolist():  # per source sequence of the group
            if float(seq_adv[b]) > 0:
                g_b = batch_gradient(model, packed, st.loss_fn, [slice(b, b + 1)], s.temperature)
                contrib = jvp_rows(model, sub, st.theta, _scaled(st.scale, g_b, st.roles), s.temperature, s.micro_batch)
                for r, recv in enumerate(idx.tolist()):
                    (own if recv == b else grp)[recv] += contrib[r]
            if progress:
                progress("source", 1)
    return {"own": own, "group": grp, "other": st.dh_jvp.double() - own - grp}


def quadrant_split(model, packed: PackedBatch, st: StepState, s: AttributeSettings, progress: Progress | None) -> dict:
    """``{Q1..Q4: [B, T]}`` (eq. 5): the step made from the source tokens of each quadrant alone
    (the loss with A set to 0 outside the quadrant; tokens with A = 0 give no update)."""
    b = st.batch
    quad = est.quadrant(b.logp, b.entropy, b.adv)
    out = {}
    for q, name in enumerate(att.QUADRANT_PARTS, start=1):
        adv_q = torch.where(quad == q, b.adv, torch.zeros_like(b.adv))
        active = (adv_q != 0).any(-1)
        part = torch.zeros_like(st.dh_jvp)
        if bool(active.any()):
            loss_q = grpo_token_mean_loss(b.old_logp, adv_q, b.mask, s.eps_low, s.eps_high, s.dual_clip)
            g_q = batch_gradient(model, packed, loss_q, micro_slices(active, s.micro_batch), s.temperature)
            part = jvp_rows(model, packed, st.theta, _scaled(st.scale, g_q, st.roles), s.temperature, s.micro_batch)
        out[name] = part
        if progress:
            progress("quadrant", 1)
    return out


SPLIT_FUNCTIONS = {"layer": group_split, "kind": partial(group_split, kind="kind"), "source": source_split, "quadrant": quadrant_split}


# ---------------------------------------------------------------------------------------------
# The LM-head estimators
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def lm_head_columns(model, packed: PackedBatch, cols: dict, batch: TokenBatch, s: AttributeSettings) -> dict:
    """``dh_lm_head`` and ``dh_self_kernel`` ``[B, T]`` (nats, eq. 8–9), ``omega_lm_head`` and
    ``omega_lm_head_source`` (eq. 8 and 12 per unit η/L, the inputs of STEER's ``omega=lm_head`` /
    ``lm_head_source``) from the final hidden states
    (one decoder forward, ``micro_batch`` sequences at a time); ``{}`` when the head soft-caps its
    logits (the closed forms assume a linear head)."""
    if getattr(model.config, "final_logit_softcapping", None):
        return {}
    hidden = final_hidden(model, packed, s.micro_batch)
    weight, bias = head_weights(model)
    m = batch.mask
    coef = (cols["clip_active"].to(batch.adv.dtype) * batch.adv * cols["ratio"])[m]
    ids = packed.response_ids[m]
    dh = att.dh_lm_head(hidden, weight, bias, ids, coef, s.lr, batch.n_tokens, s.temperature, s.chunk_rows)
    sq = (hidden.double() ** 2).sum(-1) + (1.0 if bias is not None else 0.0)
    self_k = att.dh_self_kernel(cols["dh_all_logit"].double()[m], sq, s.temperature)
    # per unit η/L: the inputs of STEER's omega=lm_head / lm_head_source (model/head.py)
    omega = dh.double() * (max(batch.n_tokens, 1) / s.lr)
    source = att.dh_lm_head_source(hidden, weight, bias, ids, coef, 1.0, 1, s.temperature, s.chunk_rows)
    return {"dh_lm_head": scatter_rows(dh.double(), m), "dh_self_kernel": scatter_rows(self_k, m),
            "omega_lm_head": scatter_rows(omega, m), "omega_lm_head_source": scatter_rows(source.double(), m)}


def lm_head_timed(model, packed: PackedBatch, cols: dict, batch: TokenBatch, s: AttributeSettings) -> tuple[dict, float]:
    """:func:`lm_head_columns` and its wall time (s)."""
    t0 = time.perf_counter()
    out = lm_head_columns(model, packed, cols, batch, s)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _timed(timings: dict, key: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall time stored under ``timings[key]`` (s)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[key] = time.perf_counter() - t0
    return out


def real_step(model, packed: PackedBatch, batch: TokenBatch, s: AttributeSettings, timings: dict, progress: Progress | None):
    """``(theta, delta, loss_fn, loss, dh_measured)``: one real step from θ, the measured ΔH
    ``[B, T]``, and the model restored to θ."""
    theta = snapshot(model)
    loss_fn = grpo_token_mean_loss(batch.old_logp, batch.adv, batch.mask, s.eps_low, s.eps_high, s.dual_clip)
    try:
        delta, loss = _timed(timings, "forward_backward", one_step_update, model, packed, loss_fn, s.lr, s.optimizer,
                             s.temperature, s.micro_batch, progress=(lambda n: progress("update", n)) if progress else None,
                             before=theta)
        after = response_stats(model, packed, s.temperature, micro_batch=s.micro_batch)
        if progress:
            progress("forward after", int(packed.mask.shape[0]))
    finally:
        restore(model, theta)
    return theta, delta, loss_fn, loss, torch.where(batch.mask, after["entropy"] - batch.entropy, 0.0)


def run_splits(model, packed: PackedBatch, st: StepState, s: AttributeSettings, timings: dict, progress: Progress | None) -> dict:
    """``{kind: {part: [B, T]}}`` for every split in ``s.by``, eager attention for the duration
    (:func:`entropy_lens.model.jvp.forward_ad_attention`)."""
    with forward_ad_attention(model):
        return {kind: _timed(timings, f"split_{kind}", SPLIT_FUNCTIONS[kind], model, packed, st, s, progress) for kind in s.by}


def long_frame(splits: dict, mask: torch.Tensor) -> pd.DataFrame:
    """attribution.parquet: one row per (valid token, split, part): ``sample, pos, by, part, dh``."""
    b_idx, t_idx = torch.nonzero(mask, as_tuple=True)
    frames = [
        pd.DataFrame({"sample": b_idx.numpy(), "pos": t_idx.numpy(), "by": kind, "part": part, "dh": v[mask].double().numpy()})
        for kind, parts in splits.items()
        for part, v in parts.items()
    ]
    cols = {"sample": "int64", "pos": "int64", "by": "object", "part": "object", "dh": "float64"}
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({k: pd.Series(dtype=v) for k, v in cols.items()})


def run_attribute(
    model, tokenizer, rollouts: pd.DataFrame, settings: AttributeSettings, source: str = "<rollouts>",
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """``(tokens frame, attribution frame, summary)`` of one real step on a validated rollouts frame."""
    check_splits(settings.by)
    prep = prepare(rollouts, tokenizer, source, settings.max_len)
    check_advantages(prep.reward, prep.group_id, settings.advantage)
    check_memory(model, prep, settings.micro_batch, True, what="attribute")
    timings: dict[str, float] = {}
    packed, batch, cols = _timed(timings, "forward", instrument, model, prep, settings, progress)
    theta, delta, loss_fn, loss, cols["dh_measured"] = real_step(model, packed, batch, settings, timings, progress)
    cols["dh_jvp"] = _timed(timings, "jvp", jvp_prediction, model, packed, theta, delta, settings.temperature,
                            settings.micro_batch, progress)
    lm, timings["lm_head"] = lm_head_timed(model, packed, cols, batch, settings)
    cols.update(lm)
    roles = head_roles(model)
    scale = None
    if {"source", "quadrant"} & set(settings.by):
        g = _timed(timings, "gradient", batch_gradient, model, packed, loss_fn,
                   micro_slices(torch.ones(batch.mask.shape[0], dtype=torch.bool), settings.micro_batch), settings.temperature)
        scale = {n: att.step_scale(delta[n], g[n]) for n in delta}
        del g
    st = StepState(with_roles(theta, roles), delta, scale, roles, loss_fn, cols["dh_jvp"], batch)
    splits = run_splits(model, packed, st, settings, timings, progress)
    frame = batch.to_frame(extra=cols, token_text=token_texts(tokenizer, prep.tok.response_ids))
    frame["quadrant"] = frame["quadrant"].astype(np.int8)
    notes = list(prep.tok.notes) + zero_advantage_notes(batch.group_id, batch.adv.abs().amax(-1))
    if not lm:
        notes.append("the LM head soft-caps its logits: dh_lm_head and dh_self_kernel are not computed")
    summary = summarize(frame, splits, batch, settings, timings, loss, roles, notes)
    summary["retokenized"] = prep.tok.retokenized
    return frame, long_frame(splits, batch.mask), summary


def estimator_costs(timings: dict) -> dict[str, float]:
    """Seconds each estimator needs on this batch: the closed forms one statistics forward, dh_jvp the
    step's forward + backward and the JVP, the LM-head forms the hidden states and their kernel."""
    fwd = timings["forward"]
    return {"omega_paper": fwd, "omega_code": fwd, "dh_all_logit": fwd, "dh_cov": fwd,
            "dh_jvp": timings["forward_backward"] + timings["jvp"], "dh_lm_head": timings["lm_head"],
            "dh_self_kernel": timings["lm_head"]}


def summarize(frame: pd.DataFrame, splits: dict, batch: TokenBatch, s: AttributeSettings, timings: dict, loss: float,
              roles: tuple, notes: list[str]) -> dict[str, Any]:
    """summary.json: estimator scores (with ``total_ratio`` and cost vs one forward + backward), the
    attribution table of every split (:func:`entropy_lens.attribution.part_table`), timings, notes."""
    L = batch.n_tokens
    scores = score_frame(frame, s.lr, L, names=ATTRIBUTE_ESTIMATORS)
    costs = estimator_costs(timings)
    fb = timings["forward_backward"]
    for name, sc in scores.items():
        sc["total_ratio"] = sc["total_pred"] / sc["total_measured"] if sc["total_measured"] else float("nan")
        sc["cost_seconds"] = costs.get(name, float("nan"))
        sc["cost_vs_forward_backward"] = sc["cost_seconds"] / fb if fb > 0 else float("nan")
    m = batch.mask
    total = frame["dh_jvp"].to_numpy(np.float64)
    recv = frame["quadrant"].to_numpy()
    table = {}
    for kind, parts in splits.items():
        wide = pd.DataFrame({p: v[m].double().numpy() for p, v in parts.items()})
        table[kind] = {"parts": att.part_table(wide, total, recv),
                       "residual": att.parts_residual({p: v[m] for p, v in parts.items()}, torch.as_tensor(total.copy()))}
    return {
        "n_sequences": int(m.shape[0]), "n_tokens": L, "n_groups": int(batch.group_id.unique().numel()),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(s, k)) for k in s.__dataclass_fields__)},
        "loss": loss, "mean_entropy": float(frame["entropy"].mean()),
        "tied_embeddings": roles[0] is not None,
        "estimators": scores,
        "scaling": "omega_code scored as -(lr/L)*omega_code; dh_cov = -(lr/L)*c; others are in nats as written",
        "attribution": table,
        "receiver_quadrants": list(QUADRANT_LABELS),
        "timings_seconds": timings,
        "notes": notes,
    }


def stage_totals(model, n_sequences: int, by: tuple[str, ...]) -> dict[str, int]:
    """Progress totals of a run: sequences per model pass, groups per ``layer``/``kind`` split,
    source sequences per ``source``, quadrants per ``quadrant`` (the stages ``run_attribute`` reports)."""
    names = list(trainable_params(model))
    groups = {att.param_group(n) for n in names} | ({"lm_head"} if head_roles(model)[1] else set())
    sizes = {"layer": len(groups), "kind": len({att.group_kind(g) for g in groups}),
             "source": n_sequences, "quadrant": len(att.QUADRANT_PARTS)}
    stages = {"forward": n_sequences, "update": n_sequences, "forward after": n_sequences, "jvp": n_sequences}
    return {**stages, **{k: sizes[k] for k in by}}
