"""The Triton tile kernel of the LM head's closed-form backward (entropy_lens.kernels.triton_head_grad)
against the torch passes and against autograd. Without CUDA it runs in Triton's interpreter
(``TRITON_INTERPRET=1``, set before the kernel module is imported) at small sizes."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # kernels are built at import; must precede it

from entropy_lens.kernels.head_grad import dz_torch, head_logp_entropy  # noqa: E402

DEV = "cuda" if _CUDA else "cpu"
TILES = {"block_n": 16, "block_v": 32, "block_d": 16}


def _kernel():
    pytest.importorskip("triton")
    import entropy_lens.kernels.triton_head_grad as th

    if not _CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(th._dz_kernel, InterpretedFunction):  # imported earlier without the flag
            th = importlib.reload(th)
    return th


def _inputs(n, d, v, dtype, seed=0, scale=1.3):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype).to(DEV)
    w = torch.randn(v, d, generator=g).to(dtype).to(DEV)
    ids = torch.randint(0, v, (n,), generator=g).to(DEV)
    tau = 0.8
    z = (h @ w.T).float() / tau  # the forward's logits (GEMM in the operands' dtype)
    lse = torch.logsumexp(z, -1)
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    g_l = torch.randn(n, generator=g).to(DEV)
    g_h = torch.randn(n, generator=g).to(DEV)
    return h, w, ids, lse, g_h, g_l + g_h * ent, g_l, tau


@pytest.mark.parametrize("n,d,v", [(37, 24, 100), (16, 16, 32), (5, 40, 70)])
def test_dz_kernel_equals_the_torch_passes_fp32(n, d, v):
    th = _kernel()
    args = _inputs(n, d, v, torch.float32)
    got = th.dz_triton(*args, **TILES)
    ref = dz_torch(*args)
    assert got.dtype == torch.float32
    # the tile GEMM sums D in another order than the BLAS GEMM: fp32 rounding of z, where
    # −g_H·log q − c nearly cancels it is not small relative to the entry (atol ≪ max |∂L/∂z|)
    assert float(ref.abs().max()) > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_dz_kernel_bf16_rounds_like_the_head_gemm():
    th = _kernel()
    # |z| ≲ 6: one bf16 step of a logit (which another summation order can flip before the rounding)
    # moves q by under 3 %; at |z| ≈ 20 by 15 %, in either implementation alike
    args = _inputs(33, 48, 90, torch.bfloat16, seed=2, scale=0.25)
    got = th.dz_triton(*args, **TILES)
    ref = dz_torch(*args)
    assert got.dtype == torch.bfloat16
    assert float(ref.float().abs().max()) > 0.1
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-3)


def test_dz_kernel_reads_strided_hidden_rows():
    th = _kernel()
    h, w, ids, lse, g_h, c, g_l, tau = _inputs(20, 24, 50, torch.float32, seed=4)
    strided = torch.empty(24, 20, device=DEV).T  # column-major view
    strided.copy_(h)
    got = th.dz_triton(strided, w, ids, lse, g_h, c, g_l, tau, **TILES)
    torch.testing.assert_close(got, dz_torch(h, w, ids, lse, g_h, c, g_l, tau), rtol=1e-4, atol=1e-5)


def test_triton_backward_gradients_equal_autograd():
    _kernel()
    g = torch.Generator().manual_seed(7)
    h = torch.randn(21, 16, generator=g).to(DEV).requires_grad_()
    w = torch.randn(70, 16, generator=g).to(DEV).requires_grad_()
    ids = torch.randint(0, 70, (21,), generator=g).to(DEV)
    a, b = torch.randn(21, generator=g).to(DEV), torch.randn(21, generator=g).to(DEV)
    logp, ent = head_logp_entropy(h, w, ids, 1.1, chunk_rows=8, backward="triton")
    gh, gw = torch.autograd.grad((a * logp + b * ent).sum(), (h, w))
    logq = torch.log_softmax(h @ w.T / 1.1, -1)
    ref = (a * logq.gather(-1, ids[:, None]).squeeze(-1) - b * (logq.exp() * logq).sum(-1)).sum()
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_backward_choice_is_checked(monkeypatch):
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="head backward must be one of"):
        head_logp_entropy(h, w, ids, backward="cuda")
    with pytest.raises(ValueError, match="a float64 weight takes the 'torch' backward"):
        head_logp_entropy(h.double(), w.double(), ids, backward="triton")
    monkeypatch.setenv("ENTROPY_LENS_HEAD_BACKWARD", "fast")
    with pytest.raises(ValueError, match="ENTROPY_LENS_HEAD_BACKWARD must be torch or triton, got 'fast'"):
        head_logp_entropy(h, w, ids)
    monkeypatch.setenv("ENTROPY_LENS_HEAD_BACKWARD", "triton")  # off CUDA, auto stays with torch
    logp, _ = head_logp_entropy(h.requires_grad_(), w, ids)
    logp.sum().backward()
    assert h.grad is not None
