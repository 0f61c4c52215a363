"""Logit statistics straight from hidden states, without materialising the logits.

``hidden`` [N, D] × LM-head ``weight`` [V, D]ᵀ is computed tile by tile — a ``BLOCK_N × BLOCK_V``
logit tile accumulated in fp32 registers over ``BLOCK_D`` slices of D — and each tile is folded
into the same online accumulators as :mod:`entropy_lens.kernels.triton_logits` (running max m,
Σe^{z−m}, Σ(z−m)e^{z−m}, Σe^{2(z−m)}, Σ(z−m)e^{2(z−m)}, z = logit / τ). The logit of the sampled
token is picked out of the tile that holds it. Extra memory is O(N · splits) floats instead of the
N × V logits. The logits are the fp32-accumulated products (not rounded to the weight dtype as a
bf16 LM head would), so they match ``(hidden.float() @ weight.float().T)`` up to accumulation order.

Only a plain linear head is covered: no bias, no logit soft-capping (fall back to materialised
logits for those). Forward only.

:func:`fused_logit_stats` uses the Triton kernel for CUDA tensors when Triton is importable and
otherwise a chunked torch path that materialises one chunk of rows at a time.
"""

from __future__ import annotations

import re

import torch

from entropy_lens.logits import LogitStats, default_chunk_rows, logit_stats

#: Default tiles: rows per program, vocabulary columns per tile, slice of D per MMA step, warps,
#: pipeline stages. The benchmark sweeps alternatives.
DEFAULT_FUSED_CONFIG = {"block_n": 128, "block_v": 128, "block_d": 64, "num_warps": 8, "num_stages": 3}
#: Bytes of one fp32 logits chunk in the torch path.
GEMM_CHUNK_BYTES = 128 * 2**20


def _check_fused_args(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has D={hidden.shape[1]}, weight has D={weight.shape[1]}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = token_ids.reshape(-1).to(device=hidden.device, dtype=torch.long)
    if ids.numel() != hidden.shape[0]:
        raise ValueError(f"token_ids has {ids.numel()} entries for {hidden.shape[0]} hidden rows")
    return ids


def fused_logit_stats_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> LogitStats:
    """Chunked torch path: for each chunk of ``chunk_rows`` rows (default ~128 MiB of fp32 logits:
    larger GEMMs run faster), logits = hidden·weightᵀ in fp32, then
    :func:`entropy_lens.logits.logit_stats` in place (one ~4 MiB scratch block). One ``[chunk, V]`` fp32
    block is alive at a time (plus an fp32 copy of ``weight`` when it is not fp32)."""
    ids = _check_fused_args(hidden, weight, token_ids, temperature)
    n, v = hidden.shape[0], weight.shape[0]
    rows = chunk_rows or default_chunk_rows(v, GEMM_CHUNK_BYTES)
    outs = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4)]
    w_t = weight.float().T
    for i in range(0, n, rows):
        j = min(i + rows, n)
        try:
            st = logit_stats(hidden[i:j].float() @ w_t, ids[i:j], temperature, consume=True)
        except ValueError as exc:  # rows of the chunk -> rows of `hidden`
            raise ValueError(re.sub(r"row (\d+)", lambda mt: f"row {int(mt.group(1)) + i}", str(exc))) from None
        for o, r in zip(outs, (st.logp, st.entropy, st.sum_p2, st.sum_p2_logp)):
            o[i:j] = r
    return LogitStats(*outs)


try:  # the Triton kernel is optional; the torch path above never needs it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised where triton is absent
    triton = None


def _triton_available() -> bool:
    return triton is not None


if triton is not None:
    from entropy_lens.kernels.triton_logits import (
        _M_INIT,
        _num_sms,
        _online_update,
        combine_partials,
    )

    @triton.jit
    def tile_logits(
        h_ptr, w_ptr, rows, cols, row_ok, col_ok, d_model, stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """``[BLOCK_N, BLOCK_V]`` fp32 tile of hidden[rows] · weight[cols]ᵀ, ``tl.dot`` over ``BLOCK_D``
        slices of D (masked lanes read 0). ``UPCAST``: multiply in fp32 (Triton's CPU interpreter
        multiplies bf16 as raw integers)."""
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, d_model, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < d_model
            a = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :] * stride_wv + dd[:, None] * stride_wd,
                        mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _fused_kernel(
        h_ptr, w_ptr, ids_ptr, part_ptr, ztok_ptr,
        n_rows, n_vocab, d_model, stride_hn, stride_hd, stride_wv, stride_wd, inv_t, tiles_per_split,
        SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Grid (cdiv(N, BLOCK_N), SPLITS): partial accumulators [5, N, SPLITS] and the sampled
        token's z/τ [N, SPLITS] (non-zero only in the split that holds it)."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < n_rows
        tok = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
        offs_v = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_N], _M_INIT, tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        q = tl.zeros([BLOCK_N], tl.float32)
        r = tl.zeros([BLOCK_N], tl.float32)
        z_tok = tl.zeros([BLOCK_N], tl.float32)
        for k in range(0, tiles_per_split):
            cols = ((split * tiles_per_split + k) * BLOCK_V + offs_v).to(tl.int64)
            col_ok = cols < n_vocab
            acc = tile_logits(h_ptr, w_ptr, rows, cols, row_ok, col_ok, d_model, stride_hn, stride_hd, stride_wv,
                              stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, UPCAST)
            x = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
            z_tok += tl.sum(tl.where(cols[None, :] == tok[:, None], x, 0.0), 1)
            m, s, t, q, r = _online_update(x, m, s, t, q, r, False)
        stride_c = n_rows * SPLITS
        p = part_ptr + rows * SPLITS + split
        tl.store(p, m, mask=row_ok)
        tl.store(p + stride_c, s, mask=row_ok)
        tl.store(p + 2 * stride_c, t, mask=row_ok)
        tl.store(p + 3 * stride_c, q, mask=row_ok)
        tl.store(p + 4 * stride_c, r, mask=row_ok)
        tl.store(ztok_ptr + rows * SPLITS + split, z_tok, mask=row_ok)


def fused_logit_stats_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    splits: int | None = None,
    check: bool = True,
) -> LogitStats:
    """Fused Triton kernel: :class:`LogitStats` of ``hidden`` [N, D] · ``weight`` [V, D]ᵀ at τ.

    Tiles (powers of 2, ≥ 16): ``block_n`` rows × ``block_v`` vocabulary columns per logit tile,
    ``block_d`` per MMA step; ``splits`` vocabulary splits per row block (default: enough for two
    programs per SM). ``hidden`` is cast to ``weight``'s dtype tile by tile; fp32 operands use
    IEEE fp32 products (no TF32). With ``check`` (default), non-finite outputs re-run
    :func:`fused_logit_stats_torch`, which raises the one-line error for bad input.
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("fused_logit_stats_triton needs the `triton` package")
    ids = _check_fused_args(hidden, weight, token_ids, temperature)
    n, v, d = hidden.shape[0], weight.shape[0], weight.shape[1]
    out = torch.empty(4, n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return LogitStats(*out)
    if v == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    cfg = dict(DEFAULT_FUSED_CONFIG)
    for k, val in (("block_n", block_n), ("block_v", block_v), ("block_d", block_d),
                   ("num_warps", num_warps), ("num_stages", num_stages)):
        if val is not None:
            cfg[k] = val
    bn, bv, bd = cfg["block_n"], cfg["block_v"], cfg["block_d"]
    n_tiles = triton.cdiv(v, bv)
    row_blocks = triton.cdiv(n, bn)
    sp = splits or max(1, triton.cdiv(2 * _num_sms(hidden.device), row_blocks))
    sp = max(1, min(sp, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, sp)
    sp = triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty(5, n, sp, dtype=torch.float32, device=hidden.device)
    ztok = torch.empty(n, sp, dtype=torch.float32, device=hidden.device)
    inv_t = 1.0 / float(temperature)
    precision = "ieee" if weight.dtype == torch.float32 else "tf32"
    _fused_kernel[(row_blocks, sp)](
        hidden, weight, ids, part, ztok,
        n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_t, tiles_per_split,
        SPLITS=sp, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, INPUT_PRECISION=precision,
        UPCAST=bool(weight.dtype == torch.bfloat16 and not hidden.is_cuda),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    combine_partials(part, ztok, None, ids, v, inv_t, out)
    if check and not bool(torch.isfinite(out).all()):
        return fused_logit_stats_torch(hidden, weight, token_ids, temperature)
    return LogitStats(*out)


def fused_logit_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> LogitStats:
    """:class:`LogitStats` (each ``[N]`` fp32, nats) of the logits ``hidden`` [N, D] · ``weight`` [V, D]ᵀ
    at temperature τ without materialising them: :func:`fused_logit_stats_triton` for CUDA tensors
    when Triton is importable, else :func:`fused_logit_stats_torch` (``chunk_rows`` rows at a time)."""
    if hidden.is_cuda and _triton_available():
        return fused_logit_stats_triton(hidden, weight, token_ids, temperature)
    return fused_logit_stats_torch(hidden, weight, token_ids, temperature, chunk_rows)
