"""The one clipped surrogate objective and the one loss-aggregation function.

Every method (``entropy_lens.methods``), the one-step measurement (``measure.py``) and the trainer
go through these two functions, so a method can only change the loss through per-token weights,
clip bounds, an advantage override or an additive penalty.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def clip_active(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float | torch.Tensor = 0.2,
    eps_high: float | torch.Tensor = 0.2,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """I_clip of docs/science.md §1.1 as a bool tensor: False where the clip removes the token's gradient.

    I_clip = 0 where (A > 0 and r > 1 + ε_high) or (A < 0 and r < 1 − ε_low); with dual-clip c,
    also where A < 0 and r > c (the loss is the constant −c·A there). Shapes broadcast.
    """
    dead = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    if dual_clip is not None:
        dead = dead | ((adv < 0) & (ratio > dual_clip))
    return ~dead


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float | torch.Tensor = 0.2,
    eps_high: float | torch.Tensor = 0.2,
    dual_clip: float | None = 3.0,
) -> torch.Tensor:
    """Per-token PPO-clip loss with dual-clip, ``[B, T]`` (to be minimised).

    ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); for A < 0 with dual-clip c: ℓ = min(ℓ, −c·A).
    r = exp(logp − old_logp). ``eps_low``/``eps_high`` may be per-token tensors (a method's bounds).
    ``dual_clip=None`` disables the dual clip; it must be > 1 otherwise.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    ratio = torch.exp(logp - old_logp)
    lo = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype)
    hi = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype)
    clipped = torch.minimum(torch.maximum(ratio, lo), hi)
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar over the valid tokens of ``mask``.

    - ``token-mean``: Σ ℓ / L, L = number of valid tokens;
    - ``seq-mean-token-mean``: mean over sequences of (Σ_t ℓ / L_b);
    - ``seq-mean-token-sum``: mean over sequences of Σ_t ℓ;
    - ``seq-mean-token-sum-norm``: Σ ℓ / (B · norm_len), norm_len defaults to T (Dr. GRPO).
    Sequences with no valid token are ignored by the per-sequence modes.
    """
    m = mask.to(per_token.dtype)
    x = per_token * m
    if mode == "token-mean":
        return x.sum() / m.sum().clamp(min=1.0)
    per_seq_len = m.sum(-1)
    has = per_seq_len > 0
    n_seq = has.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (x.sum(-1)[has] / per_seq_len[has]).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return x.sum(-1)[has].sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        T = norm_len if norm_len is not None else mask.shape[-1]
        return x.sum() / (mask.shape[0] * T)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of: {', '.join(AGG_MODES)}")
