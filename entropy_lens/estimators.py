"""First-order predictions of each token's entropy change ΔH after one policy-gradient step.

docs/science.md §2. All closed forms are elementwise over ``[B, T]`` (or any shape) tensors and take
flat arguments. Entropies and log-probabilities are in nats at the sampling temperature.
Basis of every form: for a softmax, ∂H/∂z_v = −π_v (log π_v + H).

Sign/scale conventions for scoring (``scaled_prediction``): every estimator is turned into a
prediction of ΔH in nats; ``omega_code`` (no η, opposite sign) is multiplied by −η/L and
``dh_cov`` is defined as −(η/L)·c so that its batch sum is −η·Cov(log p, A) (Cui et al.).
"""

from __future__ import annotations

from typing import Callable

import torch

from entropy_lens.objective import clip_active
from entropy_lens.tokens import TokenBatch

#: Estimator column names, in report order.
ESTIMATORS = ("omega_paper", "omega_code", "dh_all_logit", "dh_cov", "dh_jvp")

QUADRANT_READING = {
    1: "A>0, likely token (p > e^-H): entropy decreases (exploitation)",
    2: "A>0, rare token (p < e^-H): entropy increases (exploration)",
    3: "A<0, rare token: entropy decreases (pruning a rare token)",
    4: "A<0, likely token: entropy increases (releasing mass)",
}


def entropy_factor(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Token-entropy factor log p + H (nats); > 0 ⇔ p > e^{−H} (a "likely" token)."""
    return logp + entropy


def probability_factor(logp: torch.Tensor, ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Token-probability factor r · p (1 − p), p = exp(logp)."""
    p = torch.exp(logp)
    return ratio * p * (1.0 - p)


def quadrant(logp: torch.Tensor, entropy: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Quadrant of docs/science.md §2.8 as an int8 tensor: 1..4, and 0 where A = 0 (no update).

    Q1: A>0, p>e^{−H}; Q2: A>0, p<e^{−H}; Q3: A<0, p<e^{−H}; Q4: A<0, p>e^{−H}.
    A token with p = e^{−H} exactly counts as rare.
    """
    likely = entropy_factor(logp, entropy) > 0
    pos, neg = adv > 0, adv < 0
    q = torch.zeros(adv.shape, dtype=torch.int8, device=adv.device)
    q = torch.where(pos & likely, 1, q)
    q = torch.where(pos & ~likely, 2, q)
    q = torch.where(neg & ~likely, 3, q)
    q = torch.where(neg & likely, 4, q)
    return q.to(torch.int8)


def omega_paper(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    adv: torch.Tensor,
    ratio: torch.Tensor | float,
    clip_active: torch.Tensor | float,
    lr: float,
    n_tokens: int,
) -> torch.Tensor:
    """Ω of STEER (arXiv 2510.10150 v4, Theorem 1): only the sampled logit moves.

    Ω = −(η/L) · I_clip · r · A · p(1−p) · (log p + H)   [nats]
    ``lr`` = η, ``n_tokens`` = L (valid tokens of the token-mean normaliser).
    """
    scale = lr / max(int(n_tokens), 1)
    return -scale * clip_active * adv * probability_factor(logp, ratio) * entropy_factor(logp, entropy)


def omega_code(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    old_entropy: torch.Tensor,
    adv: torch.Tensor,
) -> torch.Tensor:
    """ω of the released STEER code: ω = (A / p_old) · p(1−p) · (log p + H_old).

    The paper form ÷ p without I_clip and η/L and with the opposite sign; H from the old policy.
    Dimensionless weight score (only |ω| is used for STEER weights); −(η/L)·ω predicts ΔH.
    """
    p = torch.exp(logp)
    return adv * torch.exp(-old_logp) * p * (1.0 - p) * (logp + old_entropy)


def dh_all_logit(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    sum_p2: torch.Tensor,
    sum_p2_logp: torch.Tensor,
    adv: torch.Tensor,
    ratio: torch.Tensor | float,
    clip_active: torch.Tensor | float,
    lr: float,
    n_tokens: int,
) -> torch.Tensor:
    """All-logit (tabular softmax) first order: the sampled token's step moves every logit.

    Δz = (η/L)·I·A·r·(e_a − π)  ⇒
    ΔH ≈ −(η/L)·I·A·r·[ p(log p + H) − (Σπ² log π + H·Σπ²) ]   [nats]
    Exact to first order for a tabular softmax policy with one state per token.
    """
    scale = lr / max(int(n_tokens), 1)
    p = torch.exp(logp)
    bracket = p * (logp + entropy) - (sum_p2_logp + entropy * sum_p2)
    return -scale * clip_active * adv * ratio * bracket


def cov_term(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token centred cross product of Cui et al. (arXiv 2505.22617):

    c = (log p − mean log p) · (A − mean A), means over the valid tokens of ``mask``; 0 on padding.
    Σ_t c / L = Cov(log p, A) over the batch's tokens.
    """
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    lp_mean = (logp * m).sum() / n
    a_mean = (adv * m).sum() / n
    return (logp - lp_mean) * (adv - a_mean) * m


def dh_cov(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, lr: float) -> torch.Tensor:
    """Covariance proxy as a per-token ΔH prediction: −(η/L)·c, so Σ_t = −η·Cov(log p, A)."""
    n = max(int(mask.sum()), 1)
    return -(lr / n) * cov_term(logp, adv, mask)


def scaled_prediction(name: str, column: torch.Tensor, lr: float, n_tokens: int) -> torch.Tensor:
    """Turn an estimator column into a ΔH prediction in nats (only ``omega_code`` needs −η/L)."""
    if name == "omega_code":
        return -(lr / max(int(n_tokens), 1)) * column
    return column


def penalty_coefficient(dlogp: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A log-p-only penalty folded into the coefficient of ∂ log p: −g/r on valid tokens, 0 elsewhere.

    ``dlogp`` g = ∂penalty/∂log p ``[B, T]`` (e.g. KL-Cov's), ``ratio`` r ``[B, T]``, ``mask`` ``[B, T]``.
    """
    return torch.where(mask, -dlogp / ratio, torch.zeros((), dtype=dlogp.dtype))


def effective_coefficient(
    weight: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    ratio: torch.Tensor | None = None,
    dlogp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The coefficient multiplying ∂ log p in a method's gradient, ``[B, T]``: w·A′ − g/r.

    ``weight`` w and ``adv`` A′ (the method's token weight and advantage), ``mask`` valid tokens;
    ``dlogp`` g = ∂penalty/∂log p of a log-p-only penalty (KL-Cov) with ``ratio`` r, or None.
    An entropy bonus acts on the whole distribution and is not part of it (the closed forms do
    not cover it). 0 on padding.
    """
    coef = weight.to(adv.dtype) * adv
    if dlogp is not None:
        coef = coef + penalty_coefficient(dlogp, ratio, mask)
    return torch.where(mask, coef, torch.zeros((), dtype=coef.dtype))


def closed_form_columns(
    batch: TokenBatch, lr: float, eps_low: float, eps_high: float, dual_clip: float | None
) -> dict[str, torch.Tensor]:
    """Every closed-form estimator of one batch under the GRPO clipped objective, ``[B, T]`` each.

    Columns ``ratio, clip_active, omega_paper, omega_code, dh_all_logit, dh_cov, quadrant``:
    r = exp(log p − log p_old), I_clip from (``eps_low``, ``eps_high``, ``dual_clip``), the
    estimators with η = ``lr`` and L = the batch's valid-token count (nats; ``omega_code`` is
    unscaled, see :func:`scaled_prediction`). Float columns are 0 on padding.
    """
    m = batch.mask
    L = batch.n_tokens
    ratio = batch.ratio
    ica = clip_active(ratio, batch.adv, eps_low, eps_high, dual_clip) & m
    icf = ica.to(batch.logp.dtype)  # not float32: it would round η/L to float32 in a float64 batch
    zero = torch.zeros_like(batch.logp)
    cols = {
        "ratio": ratio,
        "clip_active": ica,
        "omega_paper": omega_paper(batch.logp, batch.entropy, batch.adv, ratio, icf, lr, L),
        "omega_code": omega_code(batch.logp, batch.old_logp, batch.entropy, batch.adv),
        "dh_all_logit": dh_all_logit(
            batch.logp, batch.entropy, batch.sum_p2, batch.sum_p2_logp, batch.adv, ratio, icf, lr, L
        ),
        "dh_cov": dh_cov(batch.logp, batch.adv, m, lr),
        "quadrant": quadrant(batch.logp, batch.entropy, batch.adv),
    }
    return {k: (torch.where(m, v, zero) if v.is_floating_point() else v) for k, v in cols.items()}


# ---------------------------------------------------------------------------------------------
# Parameter-space exact first order: one forward-mode JVP along the real update Δθ.
# ---------------------------------------------------------------------------------------------


def dh_jvp(
    entropy_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
) -> torch.Tensor:
    """ΔH_t ≈ ∇_θ H_t · Δθ for every position at once, by one forward-mode JVP.

    ``entropy_fn(params) -> H`` maps a parameter dict to per-position entropies (any shape, nats);
    ``params`` are the parameters before the update and ``delta`` the real update θ' − θ for the
    parameters that moved (names ⊆ params). Returns the tangent of H along Δθ (same shape as H).
    The model inside ``entropy_fn`` must use an attention implementation that supports forward-mode
    AD (eager attention; fused SDPA/flash kernels do not).
    """
    names = [n for n in delta if n in params]
    if not names:
        raise ValueError("dh_jvp: the update touches none of the given parameters")
    fixed = {n: p for n, p in params.items() if n not in delta}

    def f(*moving: torch.Tensor) -> torch.Tensor:
        return entropy_fn({**fixed, **dict(zip(names, moving))})

    _, tangent = torch.func.jvp(f, tuple(params[n] for n in names), tuple(delta[n] for n in names))
    return tangent
