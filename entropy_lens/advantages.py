"""Per-response advantage estimators for group-sampled RLVR (docs/science.md §4.6).

Every estimator takes flat per-sequence tensors and returns one advantage per response:

    fn(reward [B], group_id [B], lengths [B] | None) -> adv [B]

``group_id`` marks the responses sampled for the same prompt (any integers, not necessarily
contiguous). All group statistics are computed at once with ``index_add_`` over the groups (no
Python loop over samples or groups). A single-response group, or a group whose rewards are all
equal, carries no learning signal and gets advantage 0 under every estimator; no estimator ever
divides by zero.

- ``grpo``: (r − mean_g r) / (std_g r + eps), unbiased std (DeepSeekMath, arXiv 2402.03300).
- ``dr_grpo``: r − mean_g r, no std normalisation (Dr. GRPO, arXiv 2503.20783).
- ``rloo``: r − mean of the *other* responses of the group (REINFORCE leave-one-out,
  Ahmadian et al., arXiv 2402.14740).
- ``opo``: r − b with the length-weighted optimal baseline b = Σ_g L_i r_i / Σ_g L_i
  (On-Policy RL with Optimal reward baseline, arXiv 2505.23585).

Use :func:`broadcast_to_tokens` to turn the ``[B]`` result into the ``[B, T]`` token advantage of a
:class:`~entropy_lens.tokens.TokenBatch`.
"""

from __future__ import annotations

from typing import Callable

import torch

#: Default ε added to the group std in ``grpo``.
GRPO_EPS = 1e-6


def _group_index(group_id: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Contiguous group index 0..G−1 of each response and the number of groups G."""
    if reward.dim() != 1:
        raise ValueError(f"reward must be a 1-D [B] tensor, got shape {tuple(reward.shape)}")
    if tuple(group_id.shape) != tuple(reward.shape):
        raise ValueError(
            f"group_id has shape {tuple(group_id.shape)}, reward has {tuple(reward.shape)}; both must be [B]"
        )
    _, inv = torch.unique(group_id, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    return inv, n_groups


def _group_sum(values: torch.Tensor, inv: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Σ of ``values`` [B] within each group, gathered back to [B]."""
    out = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    out.index_add_(0, inv, values)
    return out[inv]


def _float(reward: torch.Tensor) -> torch.Tensor:
    return reward if reward.is_floating_point() else reward.to(torch.float32)


def grpo(
    reward: torch.Tensor,
    group_id: torch.Tensor,
    lengths: torch.Tensor | None = None,
    eps: float = GRPO_EPS,
) -> torch.Tensor:
    """GRPO advantage: A_i = (r_i − mean_g r) / (std_g r + eps), std unbiased (n − 1).

    ``lengths`` is accepted for a uniform signature and ignored. A group of one response has
    std 0 (not NaN) and advantage 0; an all-equal group has advantage 0.
    """
    r = _float(reward)
    inv, G = _group_index(group_id, r)
    n = _group_sum(torch.ones_like(r), inv, G)
    mean = _group_sum(r, inv, G) / n
    centred = r - mean
    var = _group_sum(centred * centred, inv, G) / (n - 1.0).clamp(min=1.0)
    return centred / (var.sqrt() + eps)


def dr_grpo(
    reward: torch.Tensor,
    group_id: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dr. GRPO advantage: A_i = r_i − mean_g r (no std normalisation). ``lengths`` is ignored."""
    r = _float(reward)
    inv, G = _group_index(group_id, r)
    n = _group_sum(torch.ones_like(r), inv, G)
    return r - _group_sum(r, inv, G) / n


def rloo(
    reward: torch.Tensor,
    group_id: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """RLOO advantage: A_i = r_i − (Σ_{j≠i} r_j) / (n − 1) over the group; 0 for a lone response.

    Equals n/(n − 1)·(r_i − mean_g r). ``lengths`` is ignored.
    """
    r = _float(reward)
    inv, G = _group_index(group_id, r)
    n = _group_sum(torch.ones_like(r), inv, G)
    total = _group_sum(r, inv, G)
    loo = (total - r) / (n - 1.0).clamp(min=1.0)
    return torch.where(n > 1, r - loo, torch.zeros_like(r))


def opo(
    reward: torch.Tensor,
    group_id: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """OPO advantage with the length-weighted optimal baseline: A_i = r_i − Σ_g L_j r_j / Σ_g L_j.

    ``lengths`` [B] (response lengths in tokens, ≥ 0) is required. A group whose lengths sum to 0
    falls back to the plain group mean.
    """
    if lengths is None:
        raise ValueError("opo needs lengths [B] (response lengths in tokens)")
    r = _float(reward)
    inv, G = _group_index(group_id, r)
    L = lengths.to(r.dtype)
    if tuple(L.shape) != tuple(r.shape):
        raise ValueError(f"lengths has shape {tuple(L.shape)}, reward has {tuple(r.shape)}; both must be [B]")
    if bool((L < 0).any()):
        raise ValueError("lengths must be >= 0")
    wsum = _group_sum(L, inv, G)
    n = _group_sum(torch.ones_like(r), inv, G)
    weighted = _group_sum(L * r, inv, G) / wsum.clamp(min=torch.finfo(r.dtype).tiny)
    plain = _group_sum(r, inv, G) / n
    baseline = torch.where(wsum > 0, weighted, plain)
    return r - baseline


#: Registry of advantage estimators by name.
ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "opo": opo,
}


def compute_advantages(
    name: str,
    reward: torch.Tensor,
    group_id: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantage [B] of each response under the estimator ``name`` (one of :data:`ADVANTAGES`)."""
    try:
        fn = ADVANTAGES[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of: {', '.join(ADVANTAGES)}"
        ) from None
    return fn(reward, group_id, lengths)


def broadcast_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response advantage [B] → per-token [B, T], 0 on padding."""
    a = _float(adv)
    return a[:, None] * mask.to(a.dtype)
