"""One-pass Triton kernel for the logit statistics: log-prob of the sampled token, entropy, Σp², Σp² log p.

Each logit is read once. Per row, over vocabulary tiles of ``BLOCK_V`` columns, the kernel keeps five
fp32 accumulators relative to a running maximum m (z = logit / τ):

    S = Σ e^{z−m},  T = Σ (z−m) e^{z−m},  Q = Σ e^{2(z−m)},  R = Σ (z−m) e^{2(z−m)}.

When a tile raises the maximum from m to m' (d = m − m' ≤ 0, a = e^d) the sums are rescaled in
closed form:  S ← a·S,  T ← a·T + a·d·S,  Q ← a²·Q,  R ← a²·R + a·(a·d)·Q  (then the tile's own
terms are added). At the end, with log S:

    log π_y = z_y − m − log S,   H = log S − T/S,   Σπ² = Q/S²,   Σπ² log π = R/S² − log S·Σπ².

This is the online-softmax recurrence (Milakov & Gimelshein 2018, arXiv 1805.02867) extended to
the second moments. Logits may be bf16 / fp16 / fp32 / fp64 with any row and column stride; all
arithmetic is fp32. ``-inf`` logits (masked vocabulary) have probability 0. Rows with NaN or
``+inf``, rows that are entirely ``-inf`` and out-of-range token ids come out non-finite from the
kernel; the wrapper then re-runs the torch path :func:`entropy_lens.logits.logit_stats` on the same
tensor, which raises its one-line error naming the row (or handles the case exactly), so both paths
share one contract.

Short inputs (few rows) split the vocabulary of each row over several programs; a second small
kernel merges the partial accumulators with the same rescaling rule.

Forward only: results carry no autograd graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropy_lens.logits import LogitStats, logit_stats, note_path

#: Initial running maximum: finite (so rescaling factors never see ``-inf − (−inf)``) and below
#: any real logit / τ.
_M_INIT = tl.constexpr(-1.0e30)
#: Shifted logits are clamped here: e^{−10⁴} is exactly 0 in fp32, and (z−m)·e stays 0 (not NaN)
#: for ``-inf`` logits and padding lanes.
_Y_MIN = tl.constexpr(-1.0e4)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

#: Default tile sizes (vocabulary columns per tile, rows per program, warps). The benchmark
#: ``python -m benchmarks.logits_bench`` sweeps alternatives and prints the best on the device.
DEFAULT_BLOCK_V = 8192
DEFAULT_BLOCK_R = 1
DEFAULT_NUM_WARPS = 4
#: Accumulate in base 2 (``exp2`` of pre-scaled logits) by default.
DEFAULT_EXP2 = True


@triton.jit
def _exp(x, BASE2: tl.constexpr):
    """e^x, or 2^x when ``BASE2`` (then every exponent is already in base-2 units)."""
    if BASE2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _online_update(x, m, s, t, q, r, BASE2: tl.constexpr):
    """Fold one fp32 tile ``x`` [R, C] (already divided by τ) into running stats ``m, s, t, q, r`` [R].

    ``BASE2``: ``x`` is z·log₂e, so e^{z−m} = 2^{x−m₂} (one ``exp2``, no scaling inside the
    exponential); ``m, t, r`` then come out in base-2 units (× ln 2 gives nats)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    d = m - m_new
    a = _exp(d, BASE2)
    ad = a * d
    y = tl.maximum(x - m_new[:, None], _Y_MIN, propagate_nan=tl.PropagateNan.ALL)
    e = _exp(y, BASE2)
    ye = y * e
    s_new = a * s + tl.sum(e, 1)
    t_new = a * t + ad * s + tl.sum(ye, 1)
    q_new = a * a * q + tl.sum(e * e, 1)
    r_new = a * a * r + a * ad * q + tl.sum(ye * e, 1)
    return m_new, s_new, t_new, q_new, r_new


@triton.jit
def _finish(m, s, t, q, r, z_tok, valid):
    """Final statistics from the merged accumulators (see the module docstring)."""
    log_s = tl.log(s)
    inv_s2 = 1.0 / (s * s)
    logp = tl.where(valid, z_tok - m - log_s, float("nan"))
    entropy = log_s - t / s
    sum_p2 = q * inv_s2
    sum_p2_logp = r * inv_s2 - log_s * sum_p2
    return logp, entropy, sum_p2, sum_p2_logp


@triton.jit
def _logit_stats_kernel(
    x_ptr, ids_ptr, out_ptr, part_ptr,
    n_rows, n_cols, stride_row, stride_col, inv_t, tiles_per_split,
    SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, EXP2: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_R), SPLITS). SPLITS == 1: write ``out`` [4, N]; else partials [5, N, SPLITS].
    ``EXP2``: accumulate in base 2 (:func:`_online_update`) and convert to nats at the end."""
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    row_ptr = x_ptr + rows * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_R], _M_INIT, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    q = tl.zeros([BLOCK_R], tl.float32)
    r = tl.zeros([BLOCK_R], tl.float32)
    col0 = split * tiles_per_split * BLOCK_V
    for k in range(0, tiles_per_split):
        cols = col0 + k * BLOCK_V + offs
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :].to(tl.int64) * stride_col, mask=ok,
                    other=float("-inf"), eviction_policy="evict_first")
        if EXP2:
            xs = x.to(tl.float32) * (inv_t * _LOG2E)
        else:
            xs = x.to(tl.float32) * inv_t
        m, s, t, q, r = _online_update(xs, m, s, t, q, r, EXP2)
    if EXP2:
        m = m * _LN2
        t = t * _LN2
        r = r * _LN2
    if SPLITS == 1:
        tok = tl.load(ids_ptr + rows, mask=row_ok, other=0)
        valid = (tok >= 0) & (tok < n_cols)
        z_tok = tl.load(row_ptr + tl.where(valid, tok, 0) * stride_col, mask=row_ok, other=0.0)
        logp, ent, p2, p2lp = _finish(m, s, t, q, r, z_tok.to(tl.float32) * inv_t, valid)
        tl.store(out_ptr + rows, logp, mask=row_ok)
        tl.store(out_ptr + n_rows + rows, ent, mask=row_ok)
        tl.store(out_ptr + 2 * n_rows + rows, p2, mask=row_ok)
        tl.store(out_ptr + 3 * n_rows + rows, p2lp, mask=row_ok)
    else:
        stride_c = n_rows * SPLITS
        p = part_ptr + rows * SPLITS + split
        tl.store(p, m, mask=row_ok)
        tl.store(p + stride_c, s, mask=row_ok)
        tl.store(p + 2 * stride_c, t, mask=row_ok)
        tl.store(p + 3 * stride_c, q, mask=row_ok)
        tl.store(p + 4 * stride_c, r, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_ptr, ztok_ptr, x_ptr, ids_ptr, out_ptr,
    n_rows, n_cols, stride_row, stride_col, inv_t,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, FROM_LOGITS: tl.constexpr,
):
    """Merge partials [5, N, SPLITS] into ``out`` [4, N]. The sampled token's z/τ comes from the
    logits (``FROM_LOGITS``) or from per-split partial sums ``ztok`` [N, SPLITS] (fused kernel)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < n_rows
    sp = tl.arange(0, SPLITS_P2)
    ok = row_ok[:, None] & (sp < SPLITS)[None, :]
    idx = rows[:, None] * SPLITS + sp[None, :]
    stride_c = n_rows * SPLITS
    m_k = tl.load(part_ptr + idx, mask=ok, other=_M_INIT)
    s_k = tl.load(part_ptr + stride_c + idx, mask=ok, other=0.0)
    t_k = tl.load(part_ptr + 2 * stride_c + idx, mask=ok, other=0.0)
    q_k = tl.load(part_ptr + 3 * stride_c + idx, mask=ok, other=0.0)
    r_k = tl.load(part_ptr + 4 * stride_c + idx, mask=ok, other=0.0)
    m = tl.max(m_k, 1)
    d = m_k - m[:, None]
    a = tl.exp(d)
    ad = a * d
    s = tl.sum(a * s_k, 1)
    t = tl.sum(a * t_k + ad * s_k, 1)
    q = tl.sum(a * a * q_k, 1)
    r = tl.sum(a * a * r_k + a * ad * q_k, 1)
    tok = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    valid = (tok >= 0) & (tok < n_cols)
    if FROM_LOGITS:
        z_tok = tl.load(x_ptr + rows * stride_row + tl.where(valid, tok, 0) * stride_col, mask=row_ok, other=0.0)
        z_tok = z_tok.to(tl.float32) * inv_t
    else:
        z_tok = tl.sum(tl.load(ztok_ptr + idx, mask=ok, other=0.0), 1)
    logp, ent, p2, p2lp = _finish(m, s, t, q, r, z_tok, valid)
    tl.store(out_ptr + rows, logp, mask=row_ok)
    tl.store(out_ptr + n_rows + rows, ent, mask=row_ok)
    tl.store(out_ptr + 2 * n_rows + rows, p2, mask=row_ok)
    tl.store(out_ptr + 3 * n_rows + rows, p2lp, mask=row_ok)


def combine_partials(part: torch.Tensor, ztok: torch.Tensor | None, logits: torch.Tensor | None,
                     token_ids: torch.Tensor, n_cols: int, inv_t: float, out: torch.Tensor) -> None:
    """Launch :func:`_combine_kernel` on partials ``part`` [5, N, S] into ``out`` [4, N]."""
    n, splits = part.shape[1], part.shape[2]
    block_n = 64
    from_logits = logits is not None
    x = logits if from_logits else part
    _combine_kernel[(triton.cdiv(n, block_n),)](
        part, ztok if ztok is not None else part, x, token_ids, out,
        n, n_cols, x.stride(0) if from_logits else 0, x.stride(1) if from_logits else 0, inv_t,
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK_N=block_n, FROM_LOGITS=from_logits,
        num_warps=4,
    )


def _check_args(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Shape/dtype/temperature checks without a device sync; returns int64 ids on the logits' device."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = token_ids.reshape(-1).to(device=logits.device, dtype=torch.long)
    if ids.numel() != logits.shape[0]:
        raise ValueError(f"token_ids has {ids.numel()} entries for {logits.shape[0]} logit rows")
    return ids


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_splits(n_rows: int, n_tiles: int, block_r: int, device: torch.device) -> int:
    """Vocabulary splits per row: 1 when the rows alone give ≥ 4 programs per SM, else enough
    splits to reach that (at most one per tile)."""
    programs = triton.cdiv(n_rows, block_r)
    want = 4 * _num_sms(device)
    if programs >= want:
        return 1
    return max(1, min(n_tiles, triton.cdiv(want, max(programs, 1))))


def logit_stats_triton(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    block_v: int | None = None,
    block_r: int | None = None,
    num_warps: int | None = None,
    splits: int | None = None,
    exp2: bool | None = None,
    check: bool = True,
) -> LogitStats:
    """:class:`LogitStats` (each ``[N]`` fp32, nats) of ``logits`` [N, V] at temperature τ, one read per logit.

    ``token_ids`` [N] are the sampled tokens. ``block_v`` (power of 2), ``block_r`` rows per
    program, ``num_warps``, ``splits`` (vocabulary splits per row) and ``exp2`` (accumulate in base
    2) are tuning knobs; ``None`` picks the defaults. With ``check`` (default) one device sync tests
    the outputs for non-finite values and, if any, re-runs :func:`entropy_lens.logits.logit_stats` so that bad input raises the
    same one-line ``ValueError`` (NaN/+inf logit, all ``-inf`` row, token id out of range).
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    ids = _check_args(logits, token_ids, temperature)
    n, v = logits.shape
    out = torch.empty(4, n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return LogitStats(*out)
    if v == 0:
        raise ValueError("logits have an empty vocabulary (V = 0)")
    bv = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(v))
    br = block_r or DEFAULT_BLOCK_R
    nw = num_warps or DEFAULT_NUM_WARPS
    n_tiles = triton.cdiv(v, bv)
    sp = splits or default_splits(n, n_tiles, br, logits.device)
    sp = max(1, min(sp, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, sp)
    sp = triton.cdiv(n_tiles, tiles_per_split)
    inv_t = 1.0 / float(temperature)
    part = torch.empty(5, n, sp, dtype=torch.float32, device=logits.device) if sp > 1 else out
    _logit_stats_kernel[(triton.cdiv(n, br), sp)](
        logits, ids, out, part,
        n, v, logits.stride(0), logits.stride(1), inv_t, tiles_per_split,
        SPLITS=sp, BLOCK_R=br, BLOCK_V=bv, EXP2=DEFAULT_EXP2 if exp2 is None else bool(exp2), num_warps=nw,
    )
    if sp > 1:
        combine_partials(part, None, logits, ids, v, inv_t, out)
    if check and not bool(torch.isfinite(out).all()):
        return logit_stats(logits, token_ids, temperature)
    note_path("triton", n)
    return LogitStats(*out)
