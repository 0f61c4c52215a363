"""Per-scope reductions and selections over the valid tokens of ``[B, T]`` tensors.

A scope is a set of sequences (a micro-batch, a mini-batch or the whole batch) given by
``seq_scope`` ``[B]``: contiguous ids 0..S−1 (see :meth:`MethodContext.scope_ids`). Everything here
is vectorised (scatter / sort), with no Python loop over tokens, sequences or scopes.
"""

from __future__ import annotations

import math

import torch

#: Slack added before flooring/ceiling a fraction × count, so that e.g. 0.29·100 gives 29, not 28.
_ROUND_SLACK = 1e-9


def n_scopes(seq_scope: torch.Tensor) -> int:
    return int(seq_scope.max()) + 1 if seq_scope.numel() else 0


def token_scope(seq_scope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scope id of every token, ``[B, T]`` long."""
    return seq_scope.to(mask.device)[:, None].expand(mask.shape)


def scope_count(mask: torch.Tensor, seq_scope: torch.Tensor) -> torch.Tensor:
    """Number of valid tokens of each scope, ``[S]`` long."""
    S = n_scopes(seq_scope)
    out = torch.zeros(S, dtype=torch.long, device=mask.device)
    return out.index_add_(0, token_scope(seq_scope, mask)[mask], torch.ones_like(mask[mask], dtype=torch.long))


def _scope_reduce(values: torch.Tensor, mask: torch.Tensor, seq_scope: torch.Tensor, how: str) -> torch.Tensor:
    S = n_scopes(seq_scope)
    fill = -math.inf if how == "amax" else math.inf
    out = torch.full((S,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, token_scope(seq_scope, mask)[mask], values[mask], reduce=how, include_self=True)


def scope_max(values: torch.Tensor, mask: torch.Tensor, seq_scope: torch.Tensor) -> torch.Tensor:
    """Max of ``values`` over the valid tokens of each scope, ``[S]`` (−inf for an empty scope)."""
    return _scope_reduce(values, mask, seq_scope, "amax")


def scope_min(values: torch.Tensor, mask: torch.Tensor, seq_scope: torch.Tensor) -> torch.Tensor:
    """Min of ``values`` over the valid tokens of each scope, ``[S]`` (+inf for an empty scope)."""
    return _scope_reduce(values, mask, seq_scope, "amin")


def fraction_count(frac: float, n_valid: torch.Tensor, min_count: int = 0, rounding: str = "floor") -> torch.Tensor:
    """Tokens to pick per scope for a fraction ``frac`` of its ``n_valid`` tokens, ``[S]`` long.

    ``floor``: max(min_count, ⌊frac·N⌋); ``ceil``: max(min_count, ⌈frac·N⌉); both capped at N
    (an empty scope picks nothing). A 1e-9 slack absorbs binary rounding of frac·N.
    """
    x = frac * n_valid.to(torch.float64)
    k = torch.floor(x + _ROUND_SLACK) if rounding == "floor" else torch.ceil(x - _ROUND_SLACK)
    k = k.to(torch.long).clamp(min=int(min_count))
    return torch.minimum(k, n_valid)


def select_top_per_scope(
    score: torch.Tensor,
    eligible: torch.Tensor,
    seq_scope: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """In each scope s, the ``counts[s]`` eligible tokens with the highest ``score``, ``[B, T]`` bool.

    Fewer are picked where a scope has fewer eligible tokens. Ties are broken by position
    (earlier sequence, then earlier token, first), so the result is deterministic.
    """
    flat_elig = eligible.reshape(-1)
    idx = torch.nonzero(flat_elig, as_tuple=True)[0]
    out = torch.zeros_like(flat_elig)
    if idx.numel() == 0:
        return out.reshape(eligible.shape)
    s = score.reshape(-1)[idx]
    z = token_scope(seq_scope, eligible).reshape(-1)[idx]
    order = torch.argsort(s, descending=True, stable=True)
    order = order[torch.argsort(z[order], stable=True)]
    z_sorted = z[order]
    S = counts.numel()
    per_scope = torch.bincount(z, minlength=S)
    starts = torch.cumsum(per_scope, 0) - per_scope
    rank = torch.arange(idx.numel(), device=idx.device) - starts[z_sorted]
    chosen = rank < counts.to(idx.device)[z_sorted]
    out[idx[order[chosen]]] = True
    return out.reshape(eligible.shape)
