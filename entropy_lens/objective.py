"""The one clipped surrogate objective and the one loss-aggregation function.

Every method (``entropy_lens.methods``), the one-step measurement (``measure.py``) and the trainer
go through these two functions, so a method can only change the loss through per-token weights,
clip bounds, an advantage override, an additive penalty, the log-ratio clamp, the ratio level
(token or sequence) and the clip mode (standard or gradient-preserving).
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


#: Ratio levels of :func:`clipped_surrogate`: per token (PPO/GRPO) or per sequence (GSPO-token).
RATIO_LEVELS = ("token", "sequence")
#: Clip modes of :func:`clipped_surrogate`: the PPO clip, or gradient-preserving (GPPO / CE-GPPO).
CLIP_MODES = ("standard", "gradient_preserving")


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GSPO-token log-ratio ``[B, T]`` (Zheng et al., arXiv 2507.18071, eq. for s_i,t):

        log s_i,t = sg[ (1/|y_i|) Σ_t (log p − log p_old) ] + log p_t − sg[log p_t]

    Its value is the sequence's mean log-ratio log s_i on every token (nats), its gradient w.r.t.
    ``logp`` is 1 per token, so exp(·) has value s_i and gradient s_i·∂log p_t. ``mask`` ``[B, T]``
    bool: the valid tokens the mean runs over (``None``: every position); empty rows get 0.
    """
    d = (logp - old_logp).detach()
    m = torch.ones_like(d, dtype=torch.bool) if mask is None else mask
    mf = m.to(d.dtype)
    mean = (d * mf).sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1.0)
    return mean + (logp - logp.detach())


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float | torch.Tensor = 0.2,
    eps_high: float | torch.Tensor = 0.2,
    dual_clip: float | None = 10.0,
    *,
    log_ratio_clamp: float | None = None,
    ratio_level: str = "token",
    mask: torch.Tensor | None = None,
    clip_mode: str = "standard",
    beta_low: float = 1.0,
    beta_high: float = 1.0,
) -> torch.Tensor:
    """Per-token PPO-clip loss with dual-clip, ``[B, T]`` (to be minimised).

    ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); for A < 0 with dual-clip c: ℓ = min(ℓ, −c·A).
    r = exp(clamp(log r, −κ, κ)), log r = logp − old_logp, κ = ``log_ratio_clamp`` (``None``: no
    clamp; verl 0.4.1 clamps at 20). ``eps_low``/``eps_high`` may be per-token tensors.
    ``dual_clip=None`` disables the dual clip; it must be > 1 otherwise.

    - ``ratio_level="sequence"``: log r is :func:`sequence_log_ratio` over ``mask`` (GSPO-token,
      arXiv 2507.18071): the clip acts on the sequence ratio s_i, the gradient flows per token.
    - ``clip_mode="gradient_preserving"`` (CE-GPPO, arXiv 2509.20712; β = 1 is GPPO, arXiv
      2508.07629): where the PPO clip would cut the gradient, ℓ = −β_high·(1+ε_high)·A·r/sg(r)
      (A > 0, r > 1+ε_high) and ℓ = −β_low·(1−ε_low)·A·r/sg(r) (A < 0, r < 1−ε_low): the value is
      β times the clipped value, the gradient w.r.t. log p is −β·(1±ε)·A instead of 0.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {ratio_level!r}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {', '.join(CLIP_MODES)}, got {clip_mode!r}")
    log_r = sequence_log_ratio(logp, old_logp, mask) if ratio_level == "sequence" else logp - old_logp
    if log_ratio_clamp is not None:
        if not log_ratio_clamp > 0:
            raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp!r}")
        log_r = torch.clamp(log_r, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_r)
    lo = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype)
    hi = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype)
    if clip_mode == "standard":
        clipped = torch.minimum(torch.maximum(ratio, lo), hi)
        loss = torch.maximum(-adv * ratio, -adv * clipped)
    else:
        unit = torch.exp(log_r - log_r.detach())  # value 1, gradient ∂log r
        up = (adv > 0) & (ratio > hi)
        down = (adv < 0) & (ratio < lo)
        loss = torch.where(up, -adv * (beta_high * hi) * unit, -adv * ratio)
        loss = torch.where(down, -adv * (beta_low * lo) * unit, loss)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def surrogate_dlogp(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """∂ℓ_t/∂log p_t of :func:`clipped_surrogate` for every token, ``[B, T]`` (same arguments).

    Standard token mode: −A·r where I_clip = 1, else 0. Every mode's ℓ_t depends on log p only
    through its own token (the sequence mean is stop-gradient), so the gradient of Σℓ is the
    per-token derivative. −(∂ℓ/∂log p)/r is the coefficient the closed forms of docs/science.md §2
    take as I_clip·A, which makes them exact for the sequence ratio and gradient-preserving clip.
    """
    x = logp.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        per = clipped_surrogate(x, old_logp.detach(), adv.detach(), *args, **kwargs)
        (g,) = torch.autograd.grad(per.sum(), x)
    return g


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
