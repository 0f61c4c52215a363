"""The one objective that turns a method's :class:`MethodTerms` into a loss.

The trainer and the one-step measurement both call :func:`method_loss`; it is built only from
:func:`entropy_lens.objective.clipped_surrogate` and :func:`entropy_lens.objective.aggregate`:

    ℓ_t = w_t · clipped_surrogate(log p_t, log p_old,t, A'_t; ε_low, ε_high, c, κ, level, mode, β) + penalty_t
    loss = aggregate(ℓ, mask, agg_mode)

with w the method's weight (no gradient), A' its advantage override (else the batch advantage),
κ the log-ratio clamp, the ratio level (token / sequence, over ``mask``), the clip mode (standard /
gradient-preserving with β_low, β_high) from the terms, and the penalty evaluated on the current
``logp``/``entropy`` (which carry the gradient).
Padding never contributes, whatever values the tensors hold there.
"""

from __future__ import annotations

import torch

from entropy_lens.methods.base import MethodTerms
from entropy_lens.objective import aggregate, clipped_surrogate


def method_per_token_loss(
    terms: MethodTerms,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loss ``[B, T]`` (0 on padding) of a method's terms; see the module docstring.

    ``logp``/``entropy``: current policy (with grad); ``old_logp``, ``adv``: from the batch.
    ``entropy`` is required only when the method has an entropy penalty.
    """
    a = terms.adv if terms.adv is not None else adv
    per_tok = clipped_surrogate(
        logp, old_logp, a, terms.eps_low, terms.eps_high, terms.dual_clip,
        log_ratio_clamp=terms.log_ratio_clamp, ratio_level=terms.ratio_level, mask=mask,
        clip_mode=terms.clip_mode, beta_low=terms.beta_low, beta_high=terms.beta_high,
    )
    per_tok = terms.weight.detach().to(per_tok.dtype) * per_tok
    if terms.penalty is not None:
        per_tok = per_tok + terms.penalty.per_token(logp, old_logp, entropy)
    return torch.where(mask, per_tok, torch.zeros((), dtype=per_tok.dtype, device=per_tok.device))


def method_loss(
    terms: MethodTerms,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> torch.Tensor:
    """Scalar loss of a method's terms, aggregated by :func:`entropy_lens.objective.aggregate`.

    STEER (docs/science.md §3.4): token-mean over valid tokens, weights not renormalised — which is what
    this does with the default ``agg_mode``.
    """
    per_tok = method_per_token_loss(terms, logp, old_logp, adv, mask, entropy)
    return aggregate(per_tok, mask, agg_mode, norm_len)
