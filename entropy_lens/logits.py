"""One pass over logits: log-prob of the sampled token, entropy, Σp², Σp² log p.

The CPU/reference path works on row chunks in fp32 so that at most one chunk of fp32 vocabulary
rows (plus one same-size scratch buffer) is alive at a time, whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Default bytes of one fp32 chunk of vocabulary rows (rows = budget // (4·V)).
DEFAULT_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class LogitStats:
    """Per-row statistics, each ``[N]`` fp32 (nats): ``logp`` of the sampled token, ``entropy``
    H = −Σπ log π, ``sum_p2`` = Σπ², ``sum_p2_logp`` = Σπ² log π, all at temperature τ."""

    logp: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor


def default_chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one fp32 chunk of ``vocab`` columns takes about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(vocab, 1)))


def _chunk_stats(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Statistics of one fp32 chunk ``z`` [n, V] (already divided by τ; modified in place).

    With m = max z, e = exp(z − m), S = Σe:  log π_v = z_v − m − log S,
    H = log S − Σ e(z−m) / S,  Σπ² = Σe² / S²,  Σπ² log π = Σe²(z−m) / S² − log S · Σπ².
    """
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(m)  # z <- z − m (≤ 0)
    e = torch.exp(z)
    s = e.sum(-1)
    log_s = torch.log(s)
    ez = torch.linalg.vecdot(e, z)
    e.mul_(e)  # e <- e²
    e2 = e.sum(-1)
    e2z = torch.linalg.vecdot(e, z)
    entropy = log_s - ez / s
    sum_p2 = e2 / (s * s)
    sum_p2_logp = e2z / (s * s) - log_s * sum_p2
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - log_s
    return logp, entropy, sum_p2, sum_p2_logp


def logit_stats(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> LogitStats:
    """Compute :class:`LogitStats` from ``logits`` [N, V] (any float dtype, any row stride).

    ``token_ids`` [N] are the sampled tokens; ``temperature`` τ > 0 divides the logits.
    Reductions run in fp32 per chunk of ``chunk_rows`` rows (default: ~32 MiB per chunk); the chunk
    size never changes the result beyond fp32 rounding. ``-inf`` logits (masked vocabulary) are
    allowed; NaN or ``+inf`` raise ``ValueError`` naming the first bad row.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, v = logits.shape
    token_ids = token_ids.reshape(-1).to(device=logits.device, dtype=torch.long)
    if token_ids.numel() != n:
        raise ValueError(f"token_ids has {token_ids.numel()} entries for {n} logit rows")
    if n and (int(token_ids.min()) < 0 or int(token_ids.max()) >= v):
        raise ValueError(f"token id out of range [0, {v}): min {int(token_ids.min())}, max {int(token_ids.max())}")
    rows = chunk_rows or default_chunk_rows(v)
    outs = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4)]
    inv_t = 1.0 / float(temperature)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z = logits[i:j].to(torch.float32, copy=True)
        if inv_t != 1.0:
            z.mul_(inv_t)
        res = _chunk_stats(z, token_ids[i:j])
        if not all(bool(torch.isfinite(r).all()) for r in res[1:]) or bool(torch.isnan(res[0]).any()):
            res = _slow_chunk(logits[i:j], token_ids[i:j], inv_t, offset=i)
        for o, r in zip(outs, res):
            o[i:j] = r
    return LogitStats(*outs)


def _slow_chunk(raw: torch.Tensor, ids: torch.Tensor, inv_t: float, offset: int) -> tuple[torch.Tensor, ...]:
    """Non-finite values in a chunk: reject NaN/+inf, handle −inf (probability 0) exactly."""
    bad = torch.isnan(raw) | (raw == float("inf"))
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0]) + offset
        raise ValueError(f"non-finite logit (NaN or +inf) in row {row}")
    if bool((raw == float("-inf")).all(-1).any()):
        row = int((raw == float("-inf")).all(-1).nonzero()[0]) + offset
        raise ValueError(f"every logit of row {row} is -inf")
    z = raw.to(torch.float32, copy=True).mul_(inv_t)
    finite_min = torch.finfo(torch.float32).min / 4
    z.clamp_(min=finite_min)  # exp underflows to exactly 0 there, and e·z stays finite (0)
    return _chunk_stats(z, ids)


def logit_stats_reference(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> LogitStats:
    """Plain float64 reference (whole tensor at once) for tests and benchmarks."""
    z = logits.to(torch.float64) / temperature
    logq = torch.log_softmax(z, dim=-1)
    q = torch.exp(logq)
    plogp = torch.where(q > 0, q * logq, torch.zeros_like(q))
    return LogitStats(
        logp=logq.gather(-1, token_ids.long().reshape(-1, 1)).squeeze(-1),
        entropy=-plogp.sum(-1),
        sum_p2=(q * q).sum(-1),
        sum_p2_logp=(q * plogp).sum(-1),
    )
