"""Additive regularisers: the KL penalty to a reference policy (``kl_ref``) and the entropy bonus
with an adaptive coefficient (``adaptive_entropy``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from entropy_lens.methods.base import (
    KL_ESTIMATORS,
    ClipParams,
    MethodContext,
    MethodTerms,
    Penalty,
    check_choice,
    check_range,
    kl_estimate,
    register_method,
)
from entropy_lens.methods.baselines import plain_terms, valid_mean
from entropy_lens.tokens import TokenBatch

# ------------------------------------------------------------------------------------------ kl_ref


@dataclass(frozen=True)
class KlRefParams(ClipParams):
    """loss += β·KL̂(π‖π_ref) per valid token, with KL̂ the ``k1`` or ``k3`` estimator of
    :func:`~entropy_lens.methods.base.kl_estimate` on the sampled token (needs ``batch.ref_logp``).

    β = 0.001 and k3: verl's actor defaults (``kl_loss_coef: 0.001``, ``kl_loss_type: low_var_kl``);
    GRPO (DeepSeekMath, arXiv 2402.03300) uses the same k3 estimator with β = 0.04. DAPO (arXiv
    2503.14476) and the STEER runs use no KL term. β ≥ 0."""

    SOURCES: ClassVar[dict[str, str]] = {
        "beta": "verl actor default kl_loss_coef = 0.001 (GRPO, arXiv 2402.03300, used 0.04)",
        "estimator": "verl actor default kl_loss_type = low_var_kl (k3; Schulman 2020, GRPO arXiv 2402.03300)",
    }

    beta: float = 0.001
    estimator: str = "k3"

    def validate(self) -> None:
        super().validate()
        check_range("beta", self.beta, 0.0)
        check_choice("estimator", self.estimator, KL_ESTIMATORS)


@register_method(
    "kl_ref",
    summary="add beta*KL(pi||pi_ref) per token, k3 estimator, beta=0.001 (verl kl_loss; GRPO arXiv 2402.03300)",
    factors=("advantage",),
    params=KlRefParams,
    needs=("ref_logp",),
)
def kl_ref(batch: TokenBatch, params: KlRefParams, ctx: MethodContext) -> MethodTerms:
    if batch.ref_logp is None:
        raise ValueError(
            "kl_ref needs reference log-probs (ref_logp): set TokenBatch.ref_logp to log pi_ref of the sampled tokens"
        )
    mask = batch.mask
    base = plain_terms(batch, params)
    touched = base.touched | (mask if params.beta > 0 else torch.zeros_like(mask))
    kl = kl_estimate(batch.logp.detach(), batch.ref_logp.detach(), params.estimator)
    return plain_terms(
        batch,
        params,
        touched=touched,
        penalty=Penalty(kind="kl_ref", coef=params.beta, ref_logp=batch.ref_logp.detach(), estimator=params.estimator),
        stats={"kl_mean": valid_mean(torch.where(mask, kl, 0.0), mask)},
    )


# -------------------------------------------------------------------------------- adaptive_entropy


def adaptive_coefficient(mean_entropy: float, target: float, beta0: float, gain: float, beta_max: float) -> float:
    """β = clamp(β₀ + gain·(H_target − H̄), 0, β_max): the entropy-bonus coefficient of a stateless
    proportional controller on the batch's mean entropy H̄ (nats; gain in 1/nat)."""
    return float(min(max(beta0 + gain * (target - mean_entropy), 0.0), beta_max))


@dataclass(frozen=True)
class AdaptiveEntropyParams(ClipParams):
    """Entropy bonus −β·H with β = :func:`adaptive_coefficient` of the batch's mean entropy.

    Adapted from Skywork-OR1's adaptive entropy control (arXiv 2505.22312), which raises the
    coefficient by a fixed step each step the entropy is below the target and lowers it otherwise,
    and applies it only below the target. Methods keep no state across steps, so the step-wise
    integrator becomes a proportional rule: with β₀ = 0 the bonus is 0 at or above the target and
    grows with the deficit below it. ``target`` = 0.2 nats is Skywork-OR1's target entropy;
    ``gain`` = 0.05 /nat and ``beta_max`` = 0.01 are package choices (β reaches 0.01 only at
    H̄ = 0). ``target``, ``gain`` ≥ 0; 0 ≤ ``beta0`` ≤ ``beta_max``."""

    SOURCES: ClassVar[dict[str, str]] = {
        "target": "Skywork-OR1, arXiv 2505.22312 (target entropy 0.2)",
        "beta0": "Skywork-OR1, arXiv 2505.22312 (no bonus at or above the target)",
        "gain": "package choice: 0.05 per nat of deficit (β = 0.01 at zero entropy)",
        "beta_max": "package choice: 0.01, ten times the entropy_bonus default",
    }

    target: float = 0.2
    beta0: float = 0.0
    gain: float = 0.05
    beta_max: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_range("target", self.target, 0.0, math.inf, hi_open=True)
        check_range("gain", self.gain, 0.0, math.inf, hi_open=True)
        check_range("beta_max", self.beta_max, 0.0, math.inf, hi_open=True)
        check_range("beta0", self.beta0, 0.0, self.beta_max)


@register_method(
    "adaptive_entropy",
    summary="entropy bonus with beta=clamp(beta0+gain*(target-mean H),0,beta_max), target 0.2 (Skywork-OR1, arXiv 2505.22312)",
    factors=("entropy",),
    params=AdaptiveEntropyParams,
)
def adaptive_entropy(batch: TokenBatch, params: AdaptiveEntropyParams, ctx: MethodContext) -> MethodTerms:
    mask = batch.mask
    h_mean = valid_mean(torch.where(mask, batch.entropy.detach(), 0.0), mask)
    beta = adaptive_coefficient(float(h_mean), params.target, params.beta0, params.gain, params.beta_max)
    base = plain_terms(batch, params)
    touched = base.touched | (mask if beta > 0 else torch.zeros_like(mask))
    return plain_terms(
        batch,
        params,
        touched=touched,
        penalty=Penalty(kind="entropy_bonus", coef=beta),
        stats={"entropy_mean": h_mean, "beta": torch.tensor(beta)},
    )
