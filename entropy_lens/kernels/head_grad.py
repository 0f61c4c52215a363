"""Differentiable log-prob and entropy of a linear LM head with a closed-form backward.

For hidden rows h [N, D], head weight W [V, D], sampled tokens y [N] and temperature τ, with
z = h·Wᵀ/τ, log q = z − log Z and H = −Σ_v q_v log q_v (nats), :func:`head_logp_entropy` returns
(log q_y, H) and, in backward, for upstream gradients g_l (of log q_y) and g_H (of H):

    ∂L/∂z_v = g_l·(δ_{v,y} − q_v) − g_H·q_v·(log q_v + H) = q_v·(−g_H·log q_v − c) + g_l·δ_{v,y},
    c = g_l + g_H·H,     ∂L/∂h = (∂L/∂z)·W/τ,     ∂L/∂W = (∂L/∂z)ᵀ·h/τ.

The logits are formed one chunk of rows at a time, in the forward (read once by the statistics pass
of :func:`entropy_lens.kernels.logit_stats_auto`: the Triton kernel on CUDA, the CPU kernel or
eager blocks elsewhere) and again in backward; no ``[N, V]`` tensor is kept between the two. Autograd
through ``log_softmax`` instead keeps the logits, log q and more for the whole batch, or recomputes
the forward under checkpointing and then runs its backward (two more passes).

Precision follows the plain path (``log_softmax(head(h).float() / τ)``): all three GEMMs run in one
*GEMM dtype*, the one the model's head would use: the autocast dtype when autocast is on for the
tensors' device (the trainer's bf16 autocast over fp32 weights), else the weight's dtype. It is fixed
when the forward runs, and the backward uses it too (autocast is off inside both, the casts are
explicit), so the recomputed logits are exactly the ones log Z came from. The logits chunk is reduced
in fp32 (float64 throughout for a float64 weight); ∂L/∂z is formed in fp32 and cast once to the GEMM
dtype for the two gradient GEMMs (what autograd does through a bf16 head); ∂L/∂W is accumulated over
chunks in fp32 (in place when the GEMM dtype is fp32 or float64).
"""

from __future__ import annotations

import os

import torch

from entropy_lens.kernels import logit_stats_auto
from entropy_lens.logits import default_chunk_rows

#: Bytes of the vocabulary-width buffers one chunk may use (forward: the logits chunk; backward:
#: ∂L/∂z in fp32 and q): on the CPU, and on a GPU (where wider GEMMs and fewer launches pay more).
HEAD_CHUNK_BYTES = 128 * 2**20
HEAD_CHUNK_BYTES_CUDA = 2**30


def default_chunk_bytes(cuda: bool) -> int:
    """The chunk budget of the vocabulary-width buffers on the CPU or on a CUDA device."""
    return HEAD_CHUNK_BYTES_CUDA if cuda else HEAD_CHUNK_BYTES


def grad_chunk_rows(vocab: int, chunk_bytes: int = HEAD_CHUNK_BYTES, float64: bool = False) -> int:
    """Rows per chunk so that two fp32 (float64) ``[rows, V]`` buffers fit in ``chunk_bytes``."""
    return default_chunk_rows(vocab, chunk_bytes // (4 if float64 else 2))


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's head GEMM runs in here: the autocast dtype when autocast is on for the
    device (float64 weights stay float64, as autocast leaves them), else the weight's dtype."""
    kind = hidden.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[r, V]`` z = h·Wᵀ/τ: the GEMM in ``weight``'s dtype (the GEMM dtype; the model's head
    output), then fp32 (float64 for a float64 weight)."""
    z = h.to(weight.dtype) @ weight.T
    z = z.float() if z.dtype != torch.float64 else z
    return z.div_(temperature)


def _forward_rows(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log q_y, H, log Z)`` ``[N]`` each, chunk by chunk (fp32; float64 for a float64 weight)."""
    n = hidden.shape[0]
    f64 = weight.dtype == torch.float64
    out = torch.empty(3, n, dtype=torch.float64 if f64 else torch.float32, device=hidden.device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        if f64:
            z = _logits(hidden[i:j], weight, temperature)
            lse = torch.logsumexp(z, -1)
            out[0, i:j] = z.gather(-1, ids[i:j, None]).squeeze(-1) - lse
            logq = z.sub_(lse[:, None])
            out[1, i:j] = -(logq.exp() * logq).sum(-1)
        else:  # the head's output chunk as it is (bf16 on a bf16 head), read once by the statistics pass
            z = hidden[i:j].to(weight.dtype) @ weight.T
            z_y = z.gather(-1, ids[i:j, None]).squeeze(-1).float() / temperature
            st = logit_stats_auto(z, ids[i:j], temperature, consume=True)  # may overwrite z
            out[0, i:j], out[1, i:j] = st.logp, st.entropy
            lse = z_y - st.logp
        out[2, i:j] = lse
    return out[0], out[1], out[2]


def dz_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    g_h: torch.Tensor,
    c: torch.Tensor,
    g_l: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """∂L/∂z / τ ``[r, V]`` in ``weight``'s dtype for hidden rows ``[r, D]`` (module docstring); ``lse``,
    ``g_h``, ``c`` = g_l + g_H·H, ``g_l`` ``[r]`` in the reduction dtype. Two ``[r, V]`` buffers."""
    dz = _logits(hidden, weight, temperature).sub_(lse[:, None])  # log q
    q = torch.exp(dz)
    dz.mul_(-g_h[:, None]).sub_(c[:, None]).mul_(q)
    del q
    dz[torch.arange(dz.shape[0], device=dz.device), ids] += g_l
    return dz.div_(temperature).to(weight.dtype)  # z = h·Wᵀ/τ; one rounding to the weight's dtype


#: Backward kernels: the torch passes above, or the Triton tile kernel (CUDA; the interpreter in tests).
BACKWARDS = ("auto", "torch", "triton")


def _backward_kernel(choice: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """``auto``: ``$ENTROPY_LENS_HEAD_BACKWARD`` (``torch`` unless set to ``triton``), and ``torch``
    off CUDA or for float64; the Triton kernel is opt-in until it is measured against the torch
    passes on a GPU (benchmarks/gpu_check.sh)."""
    if choice == "auto":
        env = os.environ.get("ENTROPY_LENS_HEAD_BACKWARD", "torch")
        if env not in BACKWARDS[1:]:
            raise ValueError(f"ENTROPY_LENS_HEAD_BACKWARD must be torch or triton, got {env!r}")
        if not hidden.is_cuda or weight.dtype == torch.float64:
            return "torch"
        choice = env
    if choice not in BACKWARDS[1:]:
        raise ValueError(f"head backward must be one of {', '.join(BACKWARDS)}, got {choice!r}")
    if choice == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("head backward 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
    if choice == "triton" and weight.dtype == torch.float64:
        raise ValueError("head backward 'triton' computes in fp32; a float64 weight takes the 'torch' backward")
    return choice


class _HeadLogpEntropy(torch.autograd.Function):
    """(log q_y, H) with the module docstring's backward; ``weight`` arrives already in the GEMM dtype
    as ``w_gemm`` next to the parameter itself (whose dtype the weight gradient takes)."""

    @staticmethod
    def forward(ctx, hidden, weight, w_gemm, ids, temperature, rows, backward):
        with torch.autocast(hidden.device.type, enabled=False):
            logp, ent, lse = _forward_rows(hidden.detach(), w_gemm.detach(), ids, temperature, rows)
        ctx.save_for_backward(hidden, w_gemm, ids, ent, lse)
        ctx.temperature, ctx.rows, ctx.backward, ctx.weight_dtype = temperature, rows, backward, weight.dtype
        ctx.device_type = hidden.device.type
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        with torch.autocast(ctx.device_type, enabled=False):
            d_hidden, d_weight = _backward_rows(ctx, g_logp, g_ent)
        return d_hidden, d_weight, None, None, None, None, None


def _backward_rows(ctx, g_logp, g_ent):
    """(∂L/∂h, ∂L/∂W) chunk by chunk (module docstring); None where no gradient is needed."""
    hidden, w, ids, ent, lse = ctx.saved_tensors
    tau, rows = ctx.temperature, ctx.rows
    n, v = hidden.shape[0], w.shape[0]
    g_l = torch.zeros_like(ent) if g_logp is None else g_logp.to(ent.dtype)
    g_h = torch.zeros_like(ent) if g_ent is None else g_ent.to(ent.dtype)
    c = g_l + g_h * ent
    if ctx.backward == "triton":
        from entropy_lens.kernels.triton_head_grad import dz_triton as dz_of
    else:
        dz_of = dz_torch
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_hidden = torch.empty(n, hidden.shape[1], dtype=hidden.dtype, device=hidden.device) if want_h else None
    d_weight = torch.zeros(v, w.shape[1], dtype=ent.dtype, device=w.device) if want_w else None
    for i in range(0, n, rows):
        j = min(i + rows, n)
        dz = dz_of(hidden[i:j], w, ids[i:j], lse[i:j], g_h[i:j], c[i:j], g_l[i:j], tau)
        if want_h:
            d_hidden[i:j] = (dz @ w).to(hidden.dtype)
        if want_w:
            h = hidden[i:j].to(w.dtype)
            if d_weight.dtype == w.dtype:  # fp32 / float64: accumulate in place
                d_weight.addmm_(dz.T, h)
            else:  # bf16 / fp16 GEMM: one [V, D] product per chunk, summed in fp32
                d_weight += dz.T @ h
    return d_hidden, None if d_weight is None else d_weight.to(ctx.weight_dtype)


def head_logp_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    backward: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(log q_y, H)`` ``[N]`` each (nats; fp32, float64 for a float64 weight) of the
    linear LM head z = h·Wᵀ/τ: ``hidden`` [N, D], ``weight`` [V, D], ``token_ids`` y [N].

    ``chunk_rows`` rows of logits at a time (default: two fp32 ``[rows, V]`` buffers in 128 MiB; 1 GiB on CUDA),
    the GEMMs in :func:`gemm_dtype` (autocast's when it is on),
    in the forward and again in the closed-form backward (module docstring); no vocabulary-width
    tensor outlives a chunk. ``backward``: ``torch`` (element-wise passes over the recomputed chunk),
    ``triton`` (one tile kernel, :mod:`entropy_lens.kernels.triton_head_grad`) or ``auto``
    (:func:`_backward_kernel`). First derivatives only (no double backward, no forward-mode AD).
    Values and gradients equal the ``log_softmax`` + autograd path up to rounding
    (tests/test_head_grad.py).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = token_ids.reshape(-1).to(device=hidden.device, dtype=torch.long)
    v = weight.shape[0]
    if ids.numel() != hidden.shape[0]:
        raise ValueError(f"token_ids has {ids.numel()} entries for {hidden.shape[0]} hidden rows")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"token id out of range [0, {v}): min {int(ids.min())}, max {int(ids.max())}")
    rows = chunk_rows or grad_chunk_rows(v, default_chunk_bytes(hidden.is_cuda), weight.dtype == torch.float64)
    kernel = _backward_kernel(backward, hidden, weight)
    w_gemm = weight.detach().to(gemm_dtype(hidden, weight))  # no copy when the dtypes agree
    return _HeadLogpEntropy.apply(hidden, weight, w_gemm, ids, float(temperature), rows, kernel)
