"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv 2505.22617, §4).

Both rank tokens by the centred cross product c = (log p − mean log p)·(A − mean A) of
:func:`entropy_lens.estimators.cov_term`, with the means taken over the valid tokens of the
method's *scope* (micro-batch, mini-batch or batch — explicit, because a per-micro-batch selection
changes with the micro-batch size, verl issue #7818).

Token counts (N = valid tokens of the scope, fractions in (0, 1]):
n = min(#eligible, max(min_select, ⌊frac·N⌋)). ``min_select`` = 1 by default (verl's convention:
at least one token whenever one is eligible); ``min_select`` = 0 gives the literal ⌊frac·N⌋, which
is 0 whenever frac·N < 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from entropy_lens.estimators import cov_term
from entropy_lens.methods.base import (
    SCOPES,
    ClipParams,
    MethodContext,
    MethodTerms,
    Penalty,
    check_choice,
    check_range,
    register_method,
)
from entropy_lens.methods.baselines import clip_changed, plain_terms, valid_mean
from entropy_lens.methods.scopes import (
    fraction_count,
    n_scopes,
    scope_count,
    select_top_per_scope,
)
from entropy_lens.objective import clip_active
from entropy_lens.tokens import TokenBatch


def scoped_cov_term(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, seq_scope: torch.Tensor) -> torch.Tensor:
    """c of :func:`~entropy_lens.estimators.cov_term` with means over each scope's valid tokens."""
    out = torch.zeros_like(logp)
    for s in range(n_scopes(seq_scope)):  # loop over scopes only
        in_scope = mask & (seq_scope.to(mask.device) == s)[:, None]
        out = out + cov_term(logp, adv, in_scope)
    return out


# ---------------------------------------------------------------------------------------- clip_cov


@dataclass(frozen=True)
class ClipCovParams(ClipParams):
    """Clip-Cov: detach ``clip_ratio``·N random tokens with ``lb`` < c < ``ub`` that the PPO clip
    has not already removed. ``clip_ratio`` ∈ (0, 1] (a fraction, 2e-4), lb < ub, min_select ≥ 0."""

    SOURCES: ClassVar[dict[str, str]] = {
        "clip_ratio": "Cui et al., arXiv 2505.22617 §4 (r = 2e-4)",
        "lb": "Cui et al., arXiv 2505.22617 §4 (ω_low = 1)",
        "ub": "Cui et al., arXiv 2505.22617 §4 (ω_high = 5)",
        "min_select": "verl clip_cov: at least one token when one is eligible",
        "scope": "STEER reference code: micro-batch normalisation (arXiv 2510.10150)",
    }

    clip_ratio: float = 2e-4
    lb: float = 1.0
    ub: float = 5.0
    min_select: int = 1
    scope: str = "micro"

    def validate(self) -> None:
        super().validate()
        check_range("clip_ratio", self.clip_ratio, 0.0, 1.0, lo_open=True)
        check_range("lb", self.lb, -math.inf, math.inf, lo_open=True, hi_open=True)
        check_range("ub", self.ub, self.lb, math.inf, lo_open=True)
        check_range("min_select", self.min_select, 0)
        check_choice("scope", self.scope, SCOPES)


@register_method(
    "clip_cov",
    summary="detach r=2e-4 of tokens drawn at random among those with 1 < cov < 5 (Clip-Cov, arXiv 2505.22617)",
    factors=("clip", "advantage", "probability"),
    params=ClipCovParams,
)
def clip_cov(batch: TokenBatch, params: ClipCovParams, ctx: MethodContext) -> MethodTerms:
    """Selected tokens get weight 0: same gradient as detaching them (they stay in the token-mean
    denominator). The random draw is one uniform key per ``[B, T]`` slot from ``ctx.generator``,
    always drawn, so the generator advances the same way whatever is selected."""
    mask = batch.mask
    seq_scope = ctx.scope_ids(params.scope, mask.shape[0])
    c = scoped_cov_term(batch.logp.detach(), batch.adv, mask, seq_scope)
    active = clip_active(batch.ratio, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    eligible = mask & (c > params.lb) & (c < params.ub) & active
    keys = torch.rand(mask.shape, generator=ctx.generator, device=ctx.generator.device).to(mask.device)
    k = fraction_count(params.clip_ratio, scope_count(mask, seq_scope), min_count=params.min_select)
    chosen = select_top_per_scope(keys, eligible, seq_scope, k)
    weight = torch.where(chosen, 0.0, 1.0).to(torch.float32)
    touched = chosen | clip_changed(batch, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    return plain_terms(
        batch,
        params,
        weight=weight,
        touched=touched,
        stats={
            "n_selected": chosen.sum(),
            "n_eligible": eligible.sum(),
            "cov_mean": valid_mean(c, mask),
        },
    )


# ----------------------------------------------------------------------------------------- kl_cov


@dataclass(frozen=True)
class KLCovParams(ClipParams):
    """KL-Cov: add β·|log p − log p_old| on the top-k·N tokens by c, with no PPO clip (ε = ∞,
    no dual clip). ``k`` ∈ (0, 1] is a fraction (2e-3 for 7B; the original code took a percent,
    verl a fraction); β ≥ 0. Inert on-policy: |log p − log p_old| = 0 and its gradient
    (sign(0) = 0) vanishes before the first update of the batch."""

    SOURCES: ClassVar[dict[str, str]] = {
        "eps_low": "Cui et al., arXiv 2505.22617 §4 (KL-Cov replaces the PPO clip)",
        "eps_high": "Cui et al., arXiv 2505.22617 §4 (KL-Cov replaces the PPO clip)",
        "dual_clip": "Cui et al., arXiv 2505.22617 §4 (KL-Cov replaces the PPO clip)",
        "k": "Cui et al., arXiv 2505.22617 §4 (k = 2e-3 for 7B, as a fraction like verl)",
        "beta": "Cui et al., arXiv 2505.22617 §4 (β = 1)",
        "min_select": "verl kl_cov: at least one token",
        "scope": "STEER reference code: micro-batch normalisation (arXiv 2510.10150)",
    }

    eps_low: float = math.inf
    eps_high: float = math.inf
    dual_clip: float | None = None
    k: float = 2e-3
    beta: float = 1.0
    min_select: int = 1
    scope: str = "micro"

    def validate(self) -> None:
        super().validate()
        check_range("k", self.k, 0.0, 1.0, lo_open=True)
        check_range("beta", self.beta, 0.0)
        check_range("min_select", self.min_select, 0)
        check_choice("scope", self.scope, SCOPES)


@register_method(
    "kl_cov",
    summary="beta*|logp-old_logp| on the top k=2e-3 tokens by cov, no PPO clip (KL-Cov, arXiv 2505.22617)",
    factors=("clip", "advantage", "probability"),
    params=KLCovParams,
)
def kl_cov(batch: TokenBatch, params: KLCovParams, ctx: MethodContext) -> MethodTerms:
    mask = batch.mask
    seq_scope = ctx.scope_ids(params.scope, mask.shape[0])
    c = scoped_cov_term(batch.logp.detach(), batch.adv, mask, seq_scope)
    k = fraction_count(params.k, scope_count(mask, seq_scope), min_count=params.min_select)
    chosen = select_top_per_scope(c, mask, seq_scope, k)
    changed = clip_changed(batch, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    touched = changed | (chosen if params.beta > 0 else torch.zeros_like(chosen))
    return plain_terms(
        batch,
        params,
        touched=touched,
        penalty=Penalty(kind="abs_logratio", coef=params.beta, select=chosen),
        stats={
            "n_selected": chosen.sum(),
            "abs_logratio_mean_selected": valid_mean((batch.logp - batch.old_logp).abs().detach(), chosen),
        },
    )
