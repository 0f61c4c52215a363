"""Other surrogates through the one objective: GSPO's sequence-level ratio and gradient-preserving
clipping (GPPO / CE-GPPO). Both are modes of :func:`entropy_lens.objective.clipped_surrogate`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from entropy_lens.methods.base import (
    ClipParams,
    MethodContext,
    MethodTerms,
    check_range,
    register_method,
)
from entropy_lens.methods.baselines import clip_changed, plain_terms, valid_mean
from entropy_lens.objective import clip_active, sequence_log_ratio
from entropy_lens.tokens import TokenBatch

# -------------------------------------------------------------------------------------------- gspo


@dataclass(frozen=True)
class GspoParams(ClipParams):
    """GSPO-token (Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071).

    The ratio of every token of response i is s_i = exp(mean_t(log p − log p_old)) in value, with
    the per-token gradient s_i·∂log p_t (:func:`entropy_lens.objective.sequence_log_ratio`), clipped
    at the sequence level with the paper's ε_low = 3e-4, ε_high = 4e-4 and no dual clip (the paper
    has none). With A constant over a response and ``seq-mean-token-mean`` aggregation this is
    GSPO's sequence objective exactly; under ``token-mean`` longer responses weigh more."""

    SOURCES: ClassVar[dict[str, str]] = {
        "eps_low": "GSPO, arXiv 2507.18071 (left clip 3e-4)",
        "eps_high": "GSPO, arXiv 2507.18071 (right clip 4e-4)",
        "dual_clip": "GSPO, arXiv 2507.18071 (no dual clip)",
    }

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    dual_clip: float | None = None


@register_method(
    "gspo",
    summary="sequence-level ratio s=exp(mean(log p - log p_old)), clipped at 3e-4/4e-4 (GSPO, arXiv 2507.18071)",
    factors=("clip", "probability"),
    params=GspoParams,
)
def gspo(batch: TokenBatch, params: GspoParams, ctx: MethodContext) -> MethodTerms:
    mask = batch.mask
    log_r = torch.where(mask, batch.logp - batch.old_logp, 0.0).detach()
    log_s = sequence_log_ratio(batch.logp.detach(), batch.old_logp, mask)
    s = torch.exp(log_s)
    mine = clip_active(s, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    grpo_like = clip_changed(batch, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    ref = clip_active(batch.ratio, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    touched = mask & ((log_s != log_r) | (mine != ref)) | grpo_like
    return plain_terms(
        batch,
        params,
        touched=touched,
        ratio_level="sequence",
        stats={
            "seq_ratio_mean": valid_mean(torch.where(mask, s, 0.0), mask),
            "frac_seq_clipped": valid_mean((~mine).float(), mask),
        },
    )


# -------------------------------------------------------------------------------------------- gppo


@dataclass(frozen=True)
class GppoParams(ClipParams):
    """Gradient-preserving clipping, CE-GPPO form (Su et al., arXiv 2509.20712): where the PPO clip
    would cut a token's gradient (A > 0, r > 1+ε_high; A < 0, r < 1−ε_low) the loss keeps the
    clipped value scaled by β and the gradient −β·(1±ε)·A·∂log p
    (:func:`entropy_lens.objective.clipped_surrogate`, ``clip_mode="gradient_preserving"``).

    β_low = β_high = 1 is GPPO (Klear-Reasoner, arXiv 2508.07629), the default; CE-GPPO tunes
    β_low (negative advantages below the clip, exploitation) and β_high (positive advantages above
    it, exploration) to steer entropy: set them explicitly. β ≥ 0; the clip bounds are GRPO's."""

    SOURCES: ClassVar[dict[str, str]] = {
        "beta_low": "GPPO, arXiv 2508.07629 (β = 1; CE-GPPO arXiv 2509.20712 tunes it)",
        "beta_high": "GPPO, arXiv 2508.07629 (β = 1; CE-GPPO arXiv 2509.20712 tunes it)",
    }

    beta_low: float = 1.0
    beta_high: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_range("beta_low", self.beta_low, 0.0, math.inf, hi_open=True)
        check_range("beta_high", self.beta_high, 0.0, math.inf, hi_open=True)


@register_method(
    "gppo",
    summary="keep a beta-scaled gradient on clipped tokens, beta_low=beta_high=1 (GPPO/CE-GPPO, arXiv 2508.07629, 2509.20712)",
    factors=("clip",),
    params=GppoParams,
)
def gppo(batch: TokenBatch, params: GppoParams, ctx: MethodContext) -> MethodTerms:
    mask, r, a = batch.mask, batch.ratio.detach(), batch.adv
    up = mask & (a > 0) & (r > 1 + params.eps_high)
    down = mask & (a < 0) & (r < 1 - params.eps_low)
    revived = (up & (params.beta_high > 0)) | (down & (params.beta_low > 0))
    touched = revived | clip_changed(batch, a, params.eps_low, params.eps_high, params.dual_clip)
    return plain_terms(
        batch,
        params,
        touched=touched,
        clip_mode="gradient_preserving",
        beta_low=params.beta_low,
        beta_high=params.beta_high,
        stats={"frac_revived": valid_mean(revived.float(), mask)},
    )
