"""PSR-only and NSR-only (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in
LLM Reasoning", arXiv 2506.01347): train on one polarity of samples only, on raw rewards.

A response is correct when its reward exceeds ``threshold`` (0.5 separates the ±1 and the 0/1
conventions, docs/science.md §5). ``psr_only``: A' = +1 on the tokens of correct responses, weight
0 on the others (maximise their likelihood only). ``nsr_only``: A' = −1 on the tokens of wrong
responses, weight 0 on the others (push their likelihood down only). W-REINFORCE, λ·PSR + NSR, is
``w_reinforce`` (:mod:`entropy_lens.methods.baselines`).
"""

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
from entropy_lens.methods.baselines import (
    THRESHOLD_SOURCE,
    clip_changed,
    correct_tokens,
    plain_terms,
    polarity_advantage,
    valid_mean,
)
from entropy_lens.tokens import TokenBatch


@dataclass(frozen=True)
class PolarityParams(ClipParams):
    """Shared by ``psr_only`` and ``nsr_only``: correct iff reward > ``threshold`` (any finite value)."""

    SOURCES: ClassVar[dict[str, str]] = {"threshold": THRESHOLD_SOURCE}

    threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_range("threshold", self.threshold, -math.inf, math.inf, lo_open=True, hi_open=True)


def polarity_terms(batch: TokenBatch, params: PolarityParams, positive: bool) -> MethodTerms:
    """Terms keeping one polarity: A' = ±1 on the kept responses' tokens, weight 0 elsewhere."""
    mask = batch.mask
    correct = correct_tokens(batch.reward, mask, params.threshold)
    keep = correct if positive else mask & ~correct
    adv = polarity_advantage(correct, mask, 1.0, 1.0).to(batch.adv.dtype)
    adv = torch.where(keep, adv, torch.zeros((), dtype=adv.dtype)).detach()
    weight = torch.where(mask & ~keep, 0.0, 1.0).to(torch.float32)
    changed = mask & ((weight == 0) | (adv != batch.adv))
    touched = changed | clip_changed(batch, adv, params.eps_low, params.eps_high, params.dual_clip)
    return plain_terms(batch, params, weight=weight, adv=adv, touched=touched,
                       stats={"frac_kept": valid_mean(keep.float(), mask)})


@dataclass(frozen=True)
class PsrOnlyParams(PolarityParams):
    """``psr_only`` (positive sample reinforcement only, arXiv 2506.01347)."""


@dataclass(frozen=True)
class NsrOnlyParams(PolarityParams):
    """``nsr_only`` (negative sample reinforcement only, arXiv 2506.01347)."""


@register_method(
    "psr_only",
    summary="train only on correct responses, A'=+1, weight 0 on wrong ones (PSR, arXiv 2506.01347)",
    factors=("advantage",),
    params=PsrOnlyParams,
    needs=("reward",),
)
def psr_only(batch: TokenBatch, params: PsrOnlyParams, ctx: MethodContext) -> MethodTerms:
    return polarity_terms(batch, params, positive=True)


@register_method(
    "nsr_only",
    summary="train only on wrong responses, A'=-1, weight 0 on correct ones (NSR, arXiv 2506.01347)",
    factors=("advantage",),
    params=NsrOnlyParams,
    needs=("reward",),
)
def nsr_only(batch: TokenBatch, params: NsrOnlyParams, ctx: MethodContext) -> MethodTerms:
    return polarity_terms(batch, params, positive=False)
