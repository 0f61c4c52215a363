"""GRPO and the simple interventions of docs/science.md §4.3: clip-higher, entropy bonus, fork tokens,
W-REINFORCE and the entropy-aware advantage."""

from __future__ import annotations

from dataclasses import dataclass

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
    base = dict(
        weight=torch.ones_like(batch.logp, dtype=torch.float32).detach(),
        touched=touched,
        eps_low=params.eps_low,
        eps_high=params.eps_high,
        dual_clip=params.dual_clip,
    )
    base.update(changes)
    return MethodTerms(**base)


def valid_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- grpo


@dataclass(frozen=True)
class GrpoParams(ClipParams):
    """PPO-clip surrogate, ε_low = ε_high = 0.2, dual-clip 3 (STEER's runs use 10)."""


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
    """loss −= β · H on every valid token (gradient through the full softmax); β ≥ 0."""

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


@dataclass(frozen=True)
class WReinforceParams(ClipParams):
    """Weight ``lam`` on positive-advantage tokens, 1 on the others (W-REINFORCE,
    Zhu et al., "The Surprising Effectiveness of Negative Reinforcement", arXiv 2506.01347). ``lam`` ≥ 0."""

    lam: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_range("lam", self.lam, 0.0)


@register_method(
    "w_reinforce",
    summary="down-weight positive-advantage samples by lam=0.1 (W-REINFORCE, arXiv 2506.01347)",
    factors=("advantage",),
    params=WReinforceParams,
)
def w_reinforce(batch: TokenBatch, params: WReinforceParams, ctx: MethodContext) -> MethodTerms:
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
