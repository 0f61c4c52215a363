"""GRPO and the simple interventions of docs/science.md §4.3: clip-higher, entropy bonus, fork tokens,
W-REINFORCE and the entropy-aware advantage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from entropy_lens.methods.base import (
    GRPO_DUAL_CLIP,
    GRPO_EPS_HIGH,
    GRPO_EPS_LOW,
    SCOPES,
    ClipParams,
    MethodContext,
    MethodTerms,
    Penalty,
    check_choice,
    check_range,
    register_method,
)
from entropy_lens.methods.scopes import (
    fraction_count,
    scope_count,
    select_top_per_scope,
)
from entropy_lens.objective import clip_active
from entropy_lens.tokens import TokenBatch


def clip_changed(
    batch: TokenBatch,
    adv: torch.Tensor,
    eps_low: float | torch.Tensor,
    eps_high: float | torch.Tensor,
    dual_clip: float | None,
) -> torch.Tensor:
    """Valid tokens whose I_clip under (adv, bounds) differs from plain GRPO's, ``[B, T]`` bool."""
    r = batch.ratio
    mine = clip_active(r, adv, eps_low, eps_high, dual_clip)
    ref = clip_active(r, batch.adv, GRPO_EPS_LOW, GRPO_EPS_HIGH, GRPO_DUAL_CLIP)
    return batch.mask & (mine != ref)


def plain_terms(batch: TokenBatch, params: ClipParams, **changes) -> MethodTerms:
    """Terms with weight 1, the params' clip bounds and ``touched`` = clip changes vs GRPO."""
    touched = clip_changed(batch, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    base = {
        "weight": torch.ones_like(batch.logp, dtype=torch.float32).detach(),
        "touched": touched,
        "eps_low": params.eps_low,
        "eps_high": params.eps_high,
        "dual_clip": params.dual_clip,
        "log_ratio_clamp": params.log_ratio_clamp,
    }
    base.update(changes)
    return MethodTerms(**base)


def valid_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- grpo


@dataclass(frozen=True)
class GrpoParams(ClipParams):
    """PPO-clip surrogate: ε_low = ε_high = 0.2 (DeepSeekMath GRPO, arXiv 2402.03300; the STEER
    paper's GRPO baseline), dual-clip 10 and log-ratio clamp 20 (STEER reference, verl 0.4.1)."""


@register_method(
    "grpo",
    summary="PPO-clip surrogate with dual-clip, no intervention (DeepSeekMath, arXiv 2402.03300)",
    factors=(),
    params=GrpoParams,
)
def grpo(batch: TokenBatch, params: GrpoParams, ctx: MethodContext) -> MethodTerms:
    return plain_terms(batch, params)


# -------------------------------------------------------------------------------------- clip_higher


@dataclass(frozen=True)
class ClipHigherParams(ClipParams):
    """Decoupled clip with a larger upper bound ε_high = 0.28 (DAPO, arXiv 2503.14476)."""

    SOURCES: ClassVar[dict[str, str]] = {"eps_high": "DAPO clip-higher, arXiv 2503.14476"}

    eps_high: float = 0.28


@register_method(
    "clip_higher",
    summary="raise the upper clip bound to eps_high=0.28 (DAPO, arXiv 2503.14476)",
    factors=("clip",),
    params=ClipHigherParams,
)
def clip_higher(batch: TokenBatch, params: ClipHigherParams, ctx: MethodContext) -> MethodTerms:
    touched = clip_changed(batch, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    return plain_terms(batch, params, stats={"frac_touched": valid_mean(touched.float(), batch.mask)})


# ------------------------------------------------------------------------------------ entropy_bonus


@dataclass(frozen=True)
class EntropyBonusParams(ClipParams):
    """loss −= β · H on every valid token (gradient through the full softmax); β ≥ 0.

    Classic entropy regularisation (A3C, Mnih et al., arXiv 1602.01783); β = 0.001 is a package
    choice (docs/science.md §4.3), small enough not to dominate a token-mean surrogate."""

    SOURCES: ClassVar[dict[str, str]] = {
        "beta": "package choice (classic entropy regularisation, arXiv 1602.01783)",
    }

    beta: float = 0.001

    def validate(self) -> None:
        super().validate()
        check_range("beta", self.beta, 0.0)


@register_method(
    "entropy_bonus",
    summary="add -beta*H to every token's loss, beta=0.001 (classic entropy regularisation)",
    factors=("entropy",),
    params=EntropyBonusParams,
)
def entropy_bonus(batch: TokenBatch, params: EntropyBonusParams, ctx: MethodContext) -> MethodTerms:
    terms = plain_terms(batch, params)
    touched = terms.touched | (batch.mask if params.beta > 0 else torch.zeros_like(batch.mask))
    return plain_terms(
        batch,
        params,
        touched=touched,
        penalty=Penalty(kind="entropy_bonus", coef=params.beta),
        stats={"entropy_mean": valid_mean(batch.entropy.detach(), batch.mask)},
    )


# ------------------------------------------------------------------------------------- fork_tokens


@dataclass(frozen=True)
class ForkTokensParams(ClipParams):
    """Gradient only on the top-ρ highest-entropy ("forking") tokens of each scope.

    Wang et al., "Beyond the 80/20 rule", arXiv 2506.01939 (TRL ``top_entropy_quantile``).
    ``rho`` ∈ (0, 1]; the scope keeps ⌈ρ·N⌉ of its N valid tokens, ties by position.
    """

    SOURCES: ClassVar[dict[str, str]] = {
        "rho": "Wang et al., arXiv 2506.01939 (top 20% forking tokens)",
        "scope": "STEER reference code: micro-batch normalisation (arXiv 2510.10150)",
    }

    rho: float = 0.2
    scope: str = "micro"

    def validate(self) -> None:
        super().validate()
        check_range("rho", self.rho, 0.0, 1.0, lo_open=True)
        check_choice("scope", self.scope, SCOPES)


@register_method(
    "fork_tokens",
    summary="train only the top rho=0.2 highest-entropy tokens of each scope (arXiv 2506.01939)",
    factors=("entropy",),
    params=ForkTokensParams,
)
def fork_tokens(batch: TokenBatch, params: ForkTokensParams, ctx: MethodContext) -> MethodTerms:
    seq_scope = ctx.scope_ids(params.scope, batch.mask.shape[0])
    k = fraction_count(params.rho, scope_count(batch.mask, seq_scope), min_count=0, rounding="ceil")
    keep = select_top_per_scope(batch.entropy.detach(), batch.mask, seq_scope, k)
    weight = torch.where(batch.mask & ~keep, 0.0, 1.0).to(torch.float32)
    base = plain_terms(batch, params)
    return plain_terms(
        batch,
        params,
        weight=weight,
        touched=base.touched | (batch.mask & ~keep),
        stats={"frac_kept": valid_mean(keep.float(), batch.mask), "n_kept": keep.sum()},
    )


# ------------------------------------------------------------------------------------- w_reinforce

#: Advantage sources of the polarity methods: raw ±1 rewards (the source) or the batch's advantages.
POLARITY_ADVANTAGES = ("raw", "grpo")
#: Source of the correctness threshold shared by w_reinforce, psr_only and nsr_only.
THRESHOLD_SOURCE = "package choice: correct iff reward > 0.5, right for both ±1 and 0/1 rewards"


def correct_tokens(reward: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Valid tokens of correct responses, ``[B, T]`` bool: reward_b > ``threshold`` (``reward`` [B]).

    0.5 separates both reward conventions: ±1 (DAPO) and 0/1 (docs/science.md §5).
    """
    return mask & (reward.to(mask.device) > threshold)[:, None]


def polarity_advantage(correct: torch.Tensor, mask: torch.Tensor, pos: float, neg: float) -> torch.Tensor:
    """Raw-reward advantage ``[B, T]``: ``pos`` on correct tokens, −``neg`` on the other valid
    tokens, 0 on padding (Zhu et al., arXiv 2506.01347: λ·PSR + NSR has pos = λ, neg = 1)."""
    adv = torch.where(correct, pos, -neg).to(torch.float32)
    return torch.where(mask, adv, 0.0)


@dataclass(frozen=True)
class WReinforceParams(ClipParams):
    """W-REINFORCE, λ·PSR + NSR (Zhu et al., "The Surprising Effectiveness of Negative
    Reinforcement in LLM Reasoning", arXiv 2506.01347). ``lam`` ≥ 0.

    ``advantage="raw"`` (the source): A' = +λ on the tokens of correct responses (reward >
    ``threshold``), −1 on the others, weight 1, so all-correct and all-wrong groups still give
    signal. ``advantage="grpo"``: the batch's advantages, weight λ on tokens with A > 0 (this
    package's earlier form)."""

    SOURCES: ClassVar[dict[str, str]] = {
        "lam": "Zhu et al., arXiv 2506.01347 (λ = 0.1)",
        "advantage": "Zhu et al., arXiv 2506.01347 (raw ±1 rewards)",
        "threshold": THRESHOLD_SOURCE,
    }

    lam: float = 0.1
    advantage: str = "raw"
    threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_range("lam", self.lam, 0.0)
        check_choice("advantage", self.advantage, POLARITY_ADVANTAGES)
        check_range("threshold", self.threshold, -math.inf, math.inf, lo_open=True, hi_open=True)

    def required_inputs(self) -> tuple[str, ...]:
        return ("reward",) if self.advantage == "raw" else ()


@register_method(
    "w_reinforce",
    summary="lam*PSR + NSR on raw rewards: A'=+lam on correct, -1 on wrong responses, lam=0.1 (arXiv 2506.01347)",
    factors=("advantage",),
    params=WReinforceParams,
    needs=("reward",),
)
def w_reinforce(batch: TokenBatch, params: WReinforceParams, ctx: MethodContext) -> MethodTerms:
    if params.advantage == "raw":
        correct = correct_tokens(batch.reward, batch.mask, params.threshold)
        adv = polarity_advantage(correct, batch.mask, params.lam, 1.0).to(batch.adv.dtype)
        touched = (batch.mask & (adv != batch.adv)) | clip_changed(
            batch, adv, params.eps_low, params.eps_high, params.dual_clip
        )
        stats = {"frac_correct": valid_mean(correct.float(), batch.mask)}
        return plain_terms(batch, params, adv=adv.detach(), touched=touched, stats=stats)
    pos = batch.mask & (batch.adv > 0)
    weight = torch.where(pos, params.lam, 1.0).to(torch.float32)
    base = plain_terms(batch, params)
    touched = base.touched | (pos if params.lam != 1.0 else torch.zeros_like(pos))
    return plain_terms(
        batch, params, weight=weight, touched=touched, stats={"frac_positive": valid_mean(pos.float(), batch.mask)}
    )


# ------------------------------------------------------------------------------------- entropy_adv


@dataclass(frozen=True)
class EntropyAdvParams(ClipParams):
    """A ← A + min(α·H_detached, |A|/κ) (Cheng et al., "Reasoning with Exploration: An Entropy
    Perspective", arXiv 2506.14758). α ≥ 0, κ > 0."""

    SOURCES: ClassVar[dict[str, str]] = {
        "alpha": "Cheng et al., arXiv 2506.14758 (α = 0.4)",
        "kappa": "Cheng et al., arXiv 2506.14758 (κ = 2)",
    }

    alpha: float = 0.4
    kappa: float = 2.0

    def validate(self) -> None:
        super().validate()
        check_range("alpha", self.alpha, 0.0)
        check_range("kappa", self.kappa, 0.0, lo_open=True)


def entropy_shaped_advantage(adv: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """ψ = min(α·H, |A|/κ) added to A (H detached), arXiv 2506.14758."""
    psi = torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)
    return adv + psi


@register_method(
    "entropy_adv",
    summary="add min(alpha*H, |A|/kappa) to the advantage, alpha=0.4, kappa=2 (arXiv 2506.14758)",
    factors=("advantage", "entropy"),
    params=EntropyAdvParams,
)
def entropy_adv(batch: TokenBatch, params: EntropyAdvParams, ctx: MethodContext) -> MethodTerms:
    shaped = entropy_shaped_advantage(batch.adv, batch.entropy, params.alpha, params.kappa)
    adv = torch.where(batch.mask, shaped, batch.adv).detach()
    shifted = batch.mask & (adv != batch.adv)
    touched = shifted | clip_changed(batch, adv, params.eps_low, params.eps_high, params.dual_clip)
    return plain_terms(
        batch,
        params,
        adv=adv,
        touched=touched,
        stats={"adv_shift_mean": valid_mean(adv - batch.adv, batch.mask)},
    )
