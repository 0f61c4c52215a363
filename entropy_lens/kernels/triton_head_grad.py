"""Triton kernel for the closed-form backward of the LM head (:mod:`entropy_lens.kernels.head_grad`).

One program per ``BLOCK_N × BLOCK_V`` tile of a row chunk: the tile of logits is recomputed from the
hidden states and the head weight (``tl.dot`` over ``BLOCK_D`` slices of D, fp32 accumulation, then
rounded to the weight's dtype as the head's own GEMM output is, so that it matches the forward's
log Z), and the gradient with respect to the logits is formed in the epilogue:

    y = z/τ − log Z = log q,   ∂L/∂z_v = [q_v·(−g_H·log q_v − c) + g_l·δ_{v,y}] / τ,   c = g_l + g_H·H,

stored once, in the weight's dtype. The two gradient GEMMs (∂L/∂h = ∂L/∂z·W, ∂L/∂W += ∂L/∂zᵀ·h) stay
with cuBLAS. Against the torch backward this replaces the fp32 logits chunk and its element-wise
passes (about 70 bytes of traffic per logit in bf16) by one write of 2 bytes per logit.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from entropy_lens.kernels.fused import tile_logits

#: Default tiles: rows per program, vocabulary columns per tile, slice of D per MMA step, warps,
#: pipeline stages (untuned: the same as the fused forward kernel's defaults).
DEFAULT_DZ_CONFIG = {"block_n": 128, "block_v": 128, "block_d": 64, "num_warps": 8, "num_stages": 3}


@triton.jit
def _rtne_bf16(x):
    """fp32 → the nearest bf16 value (ties to even), kept in fp32. Triton's CPU interpreter converts
    fp32 to bf16 by truncation; compiled code rounds to nearest even, as torch does. Finite x only."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _dz_kernel(
    h_ptr, w_ptr, ids_ptr, lse_ptr, gh_ptr, c_ptr, gl_ptr, dz_ptr,
    n_rows, n_vocab, d_model, stride_hn, stride_hd, stride_wv, stride_wd, stride_dn, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)): ∂L/∂z of one tile into ``dz`` [N, V]."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_vocab
    acc = tile_logits(h_ptr, w_ptr, rows, cols, row_ok, col_ok, d_model, stride_hn, stride_hd, stride_wv, stride_wd,
                      BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, UPCAST)
    if ROUND:  # the head's GEMM output in its own dtype, as the forward read it
        if UPCAST:
            acc = _rtne_bf16(acc)
        else:
            acc = acc.to(dz_ptr.dtype.element_ty).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    g_l = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    tok = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    logq = acc * inv_t - lse[:, None]
    q = tl.exp(logq)
    dz = q * (-g_h[:, None] * logq - c[:, None]) + tl.where(cols[None, :] == tok[:, None], g_l[:, None], 0.0)
    dz = dz * inv_t
    if UPCAST:
        dz = _rtne_bf16(dz)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dz_ptr + rows[:, None] * stride_dn + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


def dz_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    g_h: torch.Tensor,
    c: torch.Tensor,
    g_l: torch.Tensor,
    temperature: float,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """∂L/∂z / τ ``[N, V]`` in ``weight``'s dtype for hidden rows ``[N, D]`` (module docstring);
    ``ids`` [N] long, ``lse``, ``g_h``, ``c``, ``g_l`` [N] fp32 (log Z of z/τ, upstream gradient of H,
    g_l + g_H·H, upstream gradient of log q_y). fp32 operands use IEEE fp32 products (no TF32)."""
    cfg = dict(DEFAULT_DZ_CONFIG)
    for k, val in (("block_n", block_n), ("block_v", block_v), ("block_d", block_d),
                   ("num_warps", num_warps), ("num_stages", num_stages)):
        if val is not None:
            cfg[k] = val
    n, v = hidden.shape[0], weight.shape[0]
    dz = torch.empty(n, v, dtype=weight.dtype, device=hidden.device)
    if n == 0:
        return dz
    vec = [t.to(device=hidden.device, dtype=torch.float32).contiguous() for t in (lse, g_h, c, g_l)]
    grid = (triton.cdiv(n, cfg["block_n"]), triton.cdiv(v, cfg["block_v"]))
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():  # launch on their GPU
        _launch(grid, cfg, hidden, weight, ids, vec, dz, temperature)
    return dz


def _launch(grid, cfg, hidden, weight, ids, vec, dz, temperature) -> None:
    n, v, d = hidden.shape[0], weight.shape[0], weight.shape[1]
    _dz_kernel[grid](
        hidden, weight, ids.contiguous(), *vec, dz,
        n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
        1.0 / float(temperature),
        BLOCK_N=cfg["block_n"], BLOCK_V=cfg["block_v"], BLOCK_D=cfg["block_d"],
        INPUT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        UPCAST=bool(weight.dtype == torch.bfloat16 and not hidden.is_cuda),
        ROUND=weight.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
