"""One pass over logits: log-prob of the sampled token, entropy, Σp², Σp² log p.

The CPU/reference path works on blocks of rows with two fp32 scratch buffers of one block each
(default ~4 MiB, so a block stays in cache across its passes), allocated once per call; no other
tensor of vocabulary width is created. A caller that owns an fp32 logits tensor it no longer needs
(the LM-head chunk in :mod:`entropy_lens.model.forward`) passes ``consume=True``: the logits are then
overwritten in place and only one scratch block is allocated.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

#: Budget in bytes for all fp32 vocabulary rows alive at once in a chunked pass (LM-head logits
#: chunk + scratch blocks); chunk rows = budget // (4·V).
DEFAULT_CHUNK_BYTES = 32 * 2**20
#: Bytes of one fp32 scratch block of :func:`logit_stats` on the CPU (cache-sized blocks) and on
#: other devices (large blocks: few kernel launches).
SCRATCH_BYTES = 4 * 2**20
DEVICE_SCRATCH_BYTES = 64 * 2**20
#: Finite stand-in for −inf after the max shift: e^y underflows to exactly 0 and e·y stays finite.
_NEG_FLOOR = torch.finfo(torch.float32).min / 4


#: Names of the implementations a statistics pass can take (:func:`recording_paths`).
PATH_NAMES = {"torch": "torch blocks (fp32 reductions)", "cpu-kernel": "CPU kernel built ahead of time",
              "triton": "Triton one-pass kernel"}
_PATHS: ContextVar[Counter | None] = ContextVar("entropy_lens_statistics_paths", default=None)


@contextmanager
def recording_paths() -> Iterator[Counter]:
    """Count, for the block, the logit rows each implementation of the statistics pass took
    (:data:`PATH_NAMES` keys: ``torch``, ``cpu-kernel``, ``triton``): what ran, for the run's record."""
    token = _PATHS.set(Counter())
    try:
        yield _PATHS.get()
    finally:
        _PATHS.reset(token)


def note_path(name: str, rows: int) -> None:
    """Add ``rows`` logit rows to implementation ``name`` inside :func:`recording_paths` (nothing outside)."""
    counts = _PATHS.get()
    if counts is not None:
        counts[name] += int(rows)


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


def _block_stats(x: torch.Tensor, ids: torch.Tensor, inv_t: float, y: torch.Tensor, e: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Statistics of one block of rows ``x`` [n, V] into ``out`` [4, n] (logp, H, Σπ², Σπ² log π).

    ``y`` [n, V] fp32 receives z − m (it may be ``x`` itself: fp32, owned, τ = 1 or not), ``e``
    [n, V] fp32 is scratch; both are overwritten. With z = x/τ, m = max z, y = z − m, e = e^y:
    S = Σe, T = Σe·y, Q = Σe², R = Σe²·y, and
    log π_tok = y_tok − log S,  H = log S − T/S,  Σπ² = Q/S²,  Σπ² log π = R/S² − log S · Σπ².
    −inf logits become a finite floor after the shift (e^y = 0 exactly there); NaN/+inf or an
    all −inf row propagate NaN into ``out``. Returns the ``[n]`` bool mask of all −inf rows.
    """
    if y is not x:
        y.copy_(x)
    if inv_t != 1.0:
        y.mul_(inv_t)
    m = y.amax(-1, keepdim=True)
    y.sub_(m).clamp_(min=_NEG_FLOOR)
    torch.exp(y, out=e)
    s = e.sum(-1)
    y_tok = y.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    y.mul_(e)  # e·y
    t = y.sum(-1)
    y.mul_(e)  # e²·y
    r = y.sum(-1)
    e.mul_(e)  # e²
    q = e.sum(-1)
    log_s = torch.log(s)
    s2 = s * s
    out[0] = y_tok - log_s
    out[1] = log_s - t / s
    out[2] = q / s2
    out[3] = r / s2 - log_s * out[2]
    return m.squeeze(-1) == float("-inf")


def _compiled_cpu(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """``[4, N]`` fp32 statistics from the ahead-of-time built CPU kernel
    (:mod:`entropy_lens.kernels.cpu_aot`) when its artefact is on disk and takes this input, else None.
    Never compiles; ``ENTROPY_LENS_CPU_KERNEL=0`` turns it off."""
    if logits.device.type != "cpu" or os.environ.get("ENTROPY_LENS_CPU_KERNEL", "1") == "0":
        return None
    from entropy_lens.kernels.cpu_aot import logit_stats_kernel

    return logit_stats_kernel(logits, token_ids, temperature)


def logit_stats(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    *,
    consume: bool = False,
) -> LogitStats:
    """Compute :class:`LogitStats` from ``logits`` [N, V] (any float dtype, any row stride).

    ``token_ids`` [N] are the sampled tokens; ``temperature`` τ > 0 divides the logits.
    Reductions run in fp32 over blocks of ``chunk_rows`` rows (default: ~4 MiB of fp32 per block on
    the CPU, ~64 MiB elsewhere) using two reused scratch buffers of one block each; the block size
    never changes the result beyond fp32 rounding. ``consume=True`` allows overwriting ``logits`` when it is fp32 with
    contiguous rows (no copy; one scratch buffer); its content is undefined afterwards.
    ``-inf`` logits (masked vocabulary) are allowed; NaN or ``+inf`` raise ``ValueError`` naming
    the first bad row. On the CPU, fp32 logits with unit column stride go to the ahead-of-time built
    kernel when ``entropy-lens kernels build`` has put one in the cache (same outputs within fp32
    rounding, float64 block sums; ``chunk_rows`` and ``consume`` do not apply there); nothing is
    compiled here.
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
    if n:
        fast = _compiled_cpu(logits, token_ids, temperature)
        if fast is not None and bool(torch.isfinite(fast).all()):
            note_path("cpu-kernel", n)
            return LogitStats(*fast)  # non-finite rows fall through to the eager path's error
    out = torch.empty(4, n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return LogitStats(*out)
    note_path("torch", n)
    block = SCRATCH_BYTES if logits.device.type == "cpu" else DEVICE_SCRATCH_BYTES
    rows = max(1, min(n, chunk_rows or default_chunk_rows(v, block)))
    in_place = consume and logits.dtype == torch.float32 and logits.stride(-1) == 1
    e_buf = torch.empty(rows, v, dtype=torch.float32, device=logits.device)
    y_buf = None if in_place else torch.empty(rows, v, dtype=torch.float32, device=logits.device)
    all_ninf = torch.empty(n, dtype=torch.bool, device=logits.device)
    inv_t = 1.0 / float(temperature)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        x = logits[i:j]
        all_ninf[i:j] = _block_stats(x, token_ids[i:j], inv_t, x if in_place else y_buf[: j - i], e_buf[: j - i], out[:, i:j])
    bad = ~torch.isfinite(out).all(0) | all_ninf
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        if bool(all_ninf[row]):
            raise ValueError(f"every logit of row {row} is -inf")
        raise ValueError(f"non-finite logit (NaN or +inf, after dividing by the temperature) in row {row}")
    return LogitStats(*out)


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
