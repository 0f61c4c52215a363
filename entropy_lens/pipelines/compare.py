"""Offline comparison of entropy-intervention methods on one recorded batch (``tokens.parquet``).

For every method, :func:`compare_methods` runs the method on the batch, takes its effective
per-token coefficient and clip bounds, and recomputes the closed-form first-order ΔH estimators of
docs/science.md §2 (``omega_paper``, ``dh_all_logit``, ``dh_cov``) with them:

- the method's advantage A_m (its override, else the batch's ``adv``) and weight w give the
  effective advantage w·A_m; I_clip is recomputed with A_m and the method's own clip bounds from
  the ratio r = exp(logp − old_logp);
- a penalty whose gradient only goes through log p of the sampled token (KL-Cov's
  β·|log p − log p_old|, gradient g = β·sign(log p − log p_old)) acts on log p like an advantage
  −g/r, so it is folded in: the estimators see the coefficient q = I_clip·w·A_m − g/r with I_clip
  already applied, and ``adv_eff`` = w·A_m − g/r;
- ``dh_cov`` uses the same coefficient q (so a method's clip bounds count); for an off-policy
  frame it therefore differs from the frame's own ``dh_cov`` column, which ignores I_clip;
- the entropy bonus moves the whole distribution: its tabular first-order ΔH is
  (η·β/L)·Σ_v π_v²(log π_v + H)², which needs Σπ²(log π)², not a column of tokens.parquet, so it is
  reported as null with the reason, plus the Cauchy–Schwarz lower bound
  (η·β/L)·(Σπ² log π + H·Σπ²)²/Σπ² that the available columns allow.

:func:`measure_methods` adds what really happens: one real optimizer step per method on the same
rollouts, and the measured ΔH of every token.

The library returns values and never prints or writes; the CLI (``entropy_lens_cli.compare_cmd``)
writes ``compare.parquet`` / ``summary.json``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from entropy_lens import estimators as est
from entropy_lens.io.writers import json_ready
from entropy_lens.methods import (
    apply_method,
    get_method,
    make_context,
    params_from_dict,
)
from entropy_lens.model.forward import response_stats
from entropy_lens.model.load import model_device
from entropy_lens.model.update import (
    one_step_update,
    restore,
    snapshot,
    token_mean_loss,
)
from entropy_lens.objective import clip_active
from entropy_lens.pipelines.prepare import prepare
from entropy_lens.pipelines.validate import ValidateSettings, check_memory, instrument
from entropy_lens.scoring import QUADRANT_LABELS, quadrant_table
from entropy_lens.tokens import TOKEN_FIELDS, TokenBatch, frame_grid

#: Columns a tokens.parquet frame must have for ``compare`` (dh_jvp / dh_measured are optional).
REQUIRED_COLUMNS = (
    "sample",
    "group",
    "pos",
    "token_id",
    "logp",
    "old_logp",
    "entropy",
    "sum_p2",
    "sum_p2_logp",
    "adv",
    "ratio",
    "clip_active",
    "omega_paper",
    "omega_code",
    "dh_all_logit",
    "dh_cov",
    "quadrant",
)

#: Estimators recomputed per method (each a per-token ΔH prediction in nats).
COMPARE_ESTIMATORS = ("omega_paper", "dh_all_logit", "dh_cov")

#: Columns of the long frame, in order (the estimator columns are per-token ΔH predictions).
LONG_COLUMNS = ("method", "sample", "pos", "weight", "adv_eff", "touched", "clip_active") + COMPARE_ESTIMATORS

ENTROPY_BONUS_REASON = (
    "the first-order dH of an entropy bonus is (lr*beta/L)*sum_v pi_v^2 (log pi_v + H)^2, which needs "
    "sum_v pi_v^2 (log pi_v)^2; tokens.parquet carries only sum_p2 and sum_p2_logp "
    "(lower_bound: Cauchy-Schwarz, (lr*beta/L)*(sum_p2_logp + H*sum_p2)^2/sum_p2)"
)


#: Columns of :data:`REQUIRED_COLUMNS` that hold integers (indices, ids, labels).
INTEGER_COLUMNS = ("sample", "group", "pos", "token_id", "quadrant")

#: Columns that must be finite numbers (the inputs of every prediction).
FINITE_COLUMNS = ("logp", "old_logp", "entropy", "sum_p2", "sum_p2_logp", "adv")

#: A frame's [B, T] grid ((max sample + 1) × (max pos + 1)) may hold at most this many cells per
#: token row (plus a fixed allowance): sample / pos must count from 0 without huge gaps.
GRID_CELLS_PER_ROW = 1024
GRID_CELLS_ALLOWANCE = 2**20


def _column_kind_problem(df: pd.DataFrame, c: str) -> str | None:
    """Why column ``c`` has the wrong type for compare, or None: integer columns need integer
    values (an integer dtype, or floats that are all finite and integral), the others numbers
    (``clip_active`` may be boolean); text, objects and booleans elsewhere are refused."""
    kind = df[c].dtype.kind
    if c in INTEGER_COLUMNS + ("clip_active",) and df[c].isna().any():
        return f"column {c} has missing values"
    if c == "clip_active" and kind == "b":
        return None
    if kind not in "iuf":
        return f"column {c} holds {df[c].dtype} values, expected {'integers' if c in INTEGER_COLUMNS else 'numbers'}"
    if c in INTEGER_COLUMNS and kind == "f":
        v = df[c].to_numpy(np.float64)
        if not (np.isfinite(v).all() and (v == np.round(v)).all()):
            return f"column {c} holds non-integer values, expected integers"
    return None


def validate_tokens_frame(df: pd.DataFrame) -> None:
    """Raise ValueError (one line naming the column) if ``df`` cannot be compared: missing columns,
    no rows, a column of the wrong type (:func:`_column_kind_problem`), negative or sparse
    sample / pos, duplicate (sample, pos) rows, a quadrant outside 0..4, or non-finite inputs."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns: {', '.join(missing)}")
    if len(df) == 0:
        raise ValueError("no token rows")
    for c in REQUIRED_COLUMNS + tuple(c for c in ("dh_jvp", "dh_measured", "reward") if c in df.columns):
        problem = _column_kind_problem(df, c)
        if problem:
            raise ValueError(problem)
    if (df["sample"] < 0).any() or (df["pos"] < 0).any():
        raise ValueError("negative sample or pos")
    cells = (float(df["sample"].max()) + 1) * (float(df["pos"].max()) + 1)
    if cells > GRID_CELLS_PER_ROW * len(df) + GRID_CELLS_ALLOWANCE:
        raise ValueError(f"sample / pos span {cells:.3g} cells for {len(df)} token rows: they must count from 0 "
                         "without large gaps (not a tokens.parquet of this toolkit?)")
    if df.duplicated(["sample", "pos"]).any():
        raise ValueError("duplicate (sample, pos) rows")
    if not df["quadrant"].between(0, len(QUADRANT_LABELS) - 1).all():
        raise ValueError(f"column quadrant holds values outside 0..{len(QUADRANT_LABELS) - 1}")
    for c in FINITE_COLUMNS:
        if not np.isfinite(df[c].to_numpy(np.float64)).all():
            raise ValueError(f"non-finite values in column {c}")


def _bound(v: float | torch.Tensor) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return "per-token"
    return float(v)


def compare_methods(
    tokens_df: pd.DataFrame,
    methods: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
    lr: float = 1e-6,
    seed: int = 0,
    micro_batch: int | None = None,
    skip_missing: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predicted entropy change of each method on one recorded batch.

    ``tokens_df``: a tokens.parquet frame (:data:`REQUIRED_COLUMNS`). ``methods``: registered names.
    ``overrides``: ``{method: {param: value}}``. ``lr``: η of the predictions. ``seed``: every
    method gets a fresh generator seeded with ``seed`` (results do not depend on method order).
    Scopes: ``micro_batch`` consecutive samples form one micro-batch (the ``micro`` scope of
    STEER, Clip-Cov, KL-Cov, fork tokens; the STEER reference normalises over 8 sequences per GPU);
    ``None``: the whole batch is one micro-batch. The mini-batch scope is the batch.
    A method needing an input the table lacks (``ref_logp`` for ``kl_ref``) is left out and named
    in ``summary["skipped"]`` (``skip_missing=False``: ``ValueError`` instead).

    Returns ``(long_df, summary)``: ``long_df`` has one row per (method, valid token) with
    :data:`LONG_COLUMNS`; ``summary`` (JSON-ready) has ``lr, seed, n_tokens, n_samples,
    estimators, input_totals`` and ``methods[name]`` with ``params, factors, summary, eps_low,
    eps_high, dual_clip, penalty, predicted_dh`` (batch sums, nats), ``penalty_dh`` (the penalty's
    own part: ``predicted_dh`` when folded in, else null with ``reason`` and ``lower_bound``),
    ``penalty_included`` (whether ``predicted_dh`` contains the penalty), ``quadrants``
    (Q0..Q4: n_tokens, n_touched, touched_share and each estimator's sum), ``n_touched``,
    ``touched_share``, ``weight_mean``, ``adv_eff_mean`` and the method's ``stats``.
    """
    overrides = dict(overrides or {})
    methods = list(methods)
    _check_request(methods, overrides, lr)
    params = {m: params_from_dict(m, overrides.get(m)) for m in methods}  # all errors before any work
    validate_tokens_frame(tokens_df)
    batch = _batch_from_frame(tokens_df)
    skipped = _missing_inputs(methods, params, batch, skip_missing)
    methods = [m for m in methods if m not in skipped]
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    B = batch.mask.shape[0]

    def context():
        return make_context(seed, lr, batch_size=B, micro_batch_size=micro_batch)

    quad = frame_grid(tokens_df, "quadrant", tuple(batch.mask.shape), torch.long)
    frames: list[pd.DataFrame] = []
    out_methods: dict[str, Any] = {}
    for name in methods:  # loop over methods only
        out_methods[name], frame = _one_method(name, params[name], batch, quad, lr, context())
        frames.append(frame)
    long_df = pd.concat(frames, ignore_index=True)[list(LONG_COLUMNS)]
    input_totals = {
        c: float(tokens_df[c].sum())
        for c in ("omega_paper", "dh_all_logit", "dh_cov", "dh_jvp", "dh_measured")
        if c in tokens_df.columns
    }
    summary = {
        "lr": lr,
        "seed": seed,
        "n_tokens": batch.n_tokens,
        "n_samples": int(batch.mask.any(-1).sum()),
        "estimators": list(COMPARE_ESTIMATORS),
        "micro_batch": micro_batch,
        "scope_note": (
            f"micro scope: consecutive micro-batches of {micro_batch} samples; mini = batch scope"
            if micro_batch else "one recorded batch without micro-batch assignment: micro = mini = batch scope"
        ),
        "input_totals": input_totals,
        "skipped": skipped,
        "methods": out_methods,
    }
    return long_df, json_ready(summary)


def _missing_inputs(methods: list[str], params: dict[str, Any], batch: TokenBatch, skip: bool) -> dict[str, str]:
    """``{method: reason}`` of the methods whose required inputs the batch lacks (ValueError
    naming the first one unless ``skip``); raises when every method would be skipped."""
    out = {}
    for m in methods:
        missing = get_method(m).missing_inputs(batch, params[m])
        if missing:
            reason = f"needs {', '.join(missing)}, which the tokens table does not have"
            if not skip:
                raise ValueError(f"method {m} {reason}")
            out[m] = reason
    if out and len(out) == len(methods):
        raise ValueError(f"no method can run on this table: {'; '.join(f'{m} {r}' for m, r in out.items())}")
    return out


def _check_request(methods: list[str], overrides: dict[str, Any], lr: float) -> None:
    """Raise ValueError (one line) for an empty or repeated method list, unknown methods,
    overrides of methods not compared, or a non-finite / negative η."""
    if not methods:
        raise ValueError("no methods to compare")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ValueError(f"method(s) listed more than once: {', '.join(dup)}")
    for m in methods:
        get_method(m)
    stray = sorted(set(overrides) - set(methods))
    if stray:
        raise ValueError(f"overrides given for method(s) not compared: {', '.join(stray)}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")


def _batch_from_frame(tokens_df: pd.DataFrame) -> TokenBatch:
    """The TokenBatch of a tokens frame with float64 per-token fields (the predictions are sums of
    many small terms that cancel)."""
    with warnings.catch_warnings():  # from_frame hands read-only pandas arrays to torch (harmless)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        batch = TokenBatch.from_frame(tokens_df)
    shape = tuple(batch.mask.shape)
    return batch.replace(**{n: frame_grid(tokens_df, n, shape, torch.float64) for n in TOKEN_FIELDS})


def _penalty_part(terms: Any, batch: TokenBatch, g: torch.Tensor | None, lr: float) -> dict[str, Any] | None:
    """The penalty's own share of the predicted ΔH: folded into the coefficient as −g/r when it
    acts on log p only (KL-Cov), else null with the reason and the Cauchy–Schwarz lower bound."""
    if terms.penalty is None:
        return None
    mask, L = batch.mask, batch.n_tokens
    if g is not None:
        fold = est.penalty_coefficient(g, batch.ratio, mask)
        return {
            "folded_into": "adv_eff",
            "predicted_dh": {e: float(col[mask].sum()) for e, col in _predict(fold, batch, lr, L).items()},
            "reason": None,
        }
    cs = (batch.sum_p2_logp + batch.entropy * batch.sum_p2) ** 2 / batch.sum_p2.clamp(min=1e-30)
    lower = (lr * terms.penalty.coef / max(L, 1)) * cs
    return {"folded_into": None, "predicted_dh": None, "reason": ENTROPY_BONUS_REASON,
            "lower_bound": float(lower[mask].sum())}


def _one_method(
    name: str, params: Any, batch: TokenBatch, quad: torch.Tensor, lr: float, ctx: Any
) -> tuple[dict[str, Any], pd.DataFrame]:
    """One method's summary entry and its rows of the long frame (:data:`LONG_COLUMNS`); ``ctx``:
    a fresh :class:`~entropy_lens.methods.MethodContext`."""
    spec = get_method(name)
    mask, L = batch.mask, batch.n_tokens
    terms = spec(batch, params, ctx)
    a_m = terms.adv if terms.adv is not None else batch.adv
    w = terms.weight.to(torch.float32)
    iclip = clip_active(batch.ratio, a_m, terms.eps_low, terms.eps_high, terms.dual_clip) & mask
    g = terms.penalty.dlogp(batch.logp, batch.old_logp) if terms.penalty is not None else None
    penalty_dh = _penalty_part(terms, batch, g, lr)
    adv_eff = est.effective_coefficient(w, a_m, mask, batch.ratio, g)
    q = est.effective_coefficient(iclip.to(a_m.dtype) * w, a_m, mask, batch.ratio, g)
    preds = _predict(q, batch, lr, L)
    touched = terms.touched & mask
    quadrants = quadrant_table(
        quad[mask].numpy(),
        {"n_touched": touched[mask].numpy(), **{e: col[mask].numpy() for e, col in preds.items()}},
    )
    for row in quadrants.values():  # five quadrants
        row["n_touched"] = int(row["n_touched"])
        row["touched_share"] = row["n_touched"] / row["n_tokens"] if row["n_tokens"] else None
    n_touched = int(touched.sum())
    entry = {
        "summary": spec.summary,
        "factors": list(spec.factors),
        "params": params.to_dict(),
        "eps_low": _bound(terms.eps_low),
        "eps_high": _bound(terms.eps_high),
        "dual_clip": terms.dual_clip,
        "penalty": terms.penalty.describe() if terms.penalty is not None else None,
        "predicted_dh": {e: float(col[mask].sum()) for e, col in preds.items()},
        "penalty_dh": penalty_dh,
        "penalty_included": penalty_dh is None or penalty_dh["folded_into"] is not None,
        "quadrants": quadrants,
        "n_touched": n_touched,
        "touched_share": n_touched / L,
        "weight_mean": float(w[mask].mean()),
        "adv_eff_mean": float(adv_eff[mask].mean()),
        "stats": {k: v.detach().cpu() for k, v in terms.stats.items()},
    }
    b_idx, t_idx = torch.nonzero(mask, as_tuple=True)
    frame = pd.DataFrame({
        "method": name,
        "sample": b_idx.numpy().astype(np.int64),
        "pos": t_idx.numpy().astype(np.int64),
        "weight": w[mask].double().numpy(),
        "adv_eff": adv_eff[mask].double().numpy(),
        "touched": touched[mask].numpy(),
        "clip_active": iclip[mask].numpy(),
        **{e: col[mask].double().numpy() for e, col in preds.items()},
    })
    return entry, frame


def _predict(q: torch.Tensor, batch: TokenBatch, lr: float, L: int) -> dict[str, torch.Tensor]:
    """Per-token ΔH predictions for the effective coefficient ``q`` (I_clip already applied)."""
    r = batch.ratio
    return {
        "omega_paper": est.omega_paper(batch.logp, batch.entropy, q, r, 1.0, lr, L),
        "dh_all_logit": est.dh_all_logit(
            batch.logp, batch.entropy, batch.sum_p2, batch.sum_p2_logp, q, r, 1.0, lr, L
        ),
        "dh_cov": est.dh_cov(batch.logp, q, batch.mask, lr),
    }


# ---------------------------------------------------------------------------------------------
# Measured: one real optimizer step per method (``compare --measure``)
# ---------------------------------------------------------------------------------------------


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
    scope_micro_batch: int | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Measured per-token ΔH (nats) of one real optimizer step under each method
    (``scope_micro_batch``: the methods' micro scope, as in :func:`compare_methods`).

    From the same checkpoint and batch, each method's terms go through the one objective
    (:mod:`entropy_lens.methods.loss`, token-mean), one SGD/AdamW step is taken (``settings``),
    the batch is re-forwarded, and the model is restored before the next method. The methods'
    terms are computed on the CPU batch and moved to the model's device once per method; the
    packed batch goes there once; the per-token entropies come back to the CPU.
    Returns ``(long frame: method, sample, pos, dh_measured_step)`` and per method
    ``{dh_measured (batch sum, nats), per-quadrant sums Q1..Q4, loss}``.
    """
    overrides = overrides or {}
    params = {m: params_from_dict(m, overrides.get(m)) for m in methods}  # fail before any work
    prep = prepare(rollouts, tokenizer, source, settings.max_len)
    check_memory(model, prep, settings.micro_batch, jvp=False, what="compare --measure")
    packed, batch, cols = instrument(model, prep, settings)
    device = model_device(model)
    packed = packed.to(device)  # once; the statistics come back to the CPU (response_stats)
    theta = snapshot(model)
    b_idx, t_idx = torch.nonzero(batch.mask, as_tuple=True)
    q = cols["quadrant"][batch.mask].numpy()
    frames, totals = [], {}
    for name in methods:  # loop over methods only
        ctx = make_context(seed, settings.lr, batch_size=batch.mask.shape[0], micro_batch_size=scope_micro_batch)
        terms = apply_method(name, batch, params[name], ctx)
        loss_fn = token_mean_loss(terms, batch.old_logp, batch.adv, batch.mask, device=device)
        try:
            _, loss = one_step_update(model, packed, loss_fn, settings.lr, settings.optimizer, settings.temperature,
                                      settings.micro_batch, settings.weight_decay, before=theta)
            after = response_stats(model, packed, settings.temperature, micro_batch=settings.micro_batch)
        finally:
            restore(model, theta)
        dh = (after["entropy"] - batch.entropy)[batch.mask].double().numpy()
        quads = quadrant_table(q, {"dh": dh}, QUADRANT_LABELS[1:])
        totals[name] = {"dh_measured": float(dh.sum()), "loss": loss, **{k: v["dh"] for k, v in quads.items()}}
        frames.append(pd.DataFrame({"method": name, "sample": b_idx.numpy(), "pos": t_idx.numpy(), "dh_measured_step": dh}))
        if progress:
            progress("methods", 1)
    return pd.concat(frames, ignore_index=True), totals
