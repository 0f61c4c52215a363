"""The differentiable LM head with a closed-form backward (entropy_lens.kernels.head_grad.head_logp_entropy): values and gradients
against the plain log_softmax path and float64 finite differences."""

import pytest
import torch

from entropy_lens.kernels.head_grad import head_logp_entropy


def _plain(h, w, ids, tau):
    """The reference: full logits, log_softmax, autograd (what forward._logp_entropy_rows does)."""
    logq = torch.log_softmax((h @ w.T).to(torch.float64 if h.dtype == torch.float64 else torch.float32) / tau, -1)
    return logq.gather(-1, ids[:, None]).squeeze(-1), -(logq.exp() * logq).sum(-1)


def _case(n=13, d=7, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 1.5).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    ids = torch.randint(0, v, (n,), generator=g)
    return h, w, ids


@pytest.mark.parametrize("chunk_rows", [None, 4, 1])
def test_values_and_gradients_equal_the_plain_path(chunk_rows):
    h, w, ids = _case()
    a = torch.randn(13, dtype=torch.float32)  # upstream weights of log p and of H
    b = torch.randn(13, dtype=torch.float32)
    logp, ent = head_logp_entropy(h, w, ids, 0.8, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad((a * logp + b * ent).sum(), (h, w))
    rlogp, rent = _plain(h, w, ids, 0.8)
    rh, rw = torch.autograd.grad((a * rlogp + b * rent).sum(), (h, w))
    torch.testing.assert_close(logp, rlogp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_float64_finite_differences():
    h, w, ids = _case(n=5, d=4, v=9, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda hh, ww: head_logp_entropy(hh, ww, ids, 1.3, chunk_rows=2), (h, w))


def test_one_output_used_and_one_input_needing_grad():
    h, w, ids = _case()
    w_frozen = w.detach()
    (g_only_h,) = torch.autograd.grad(head_logp_entropy(h, w_frozen, ids)[1].sum(), (h,))
    (ref,) = torch.autograd.grad(_plain(h, w_frozen, ids, 1.0)[1].sum(), (h,))
    torch.testing.assert_close(g_only_h, ref, rtol=1e-4, atol=1e-5)
    (g_w,) = torch.autograd.grad(head_logp_entropy(h.detach(), w, ids)[0].sum(), (w,))
    (ref_w,) = torch.autograd.grad(_plain(h.detach(), w, ids, 1.0)[0].sum(), (w,))
    torch.testing.assert_close(g_w, ref_w, rtol=1e-4, atol=1e-5)


def test_bfloat16_operands_follow_the_plain_bf16_head():
    h, w, ids = _case(n=16, d=16, v=64)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    logp, ent = head_logp_entropy(hb, wb, ids, chunk_rows=5)
    assert logp.dtype == ent.dtype == torch.float32
    gh, gw = torch.autograd.grad((logp + ent).sum(), (hb, wb))
    assert gh.dtype == gw.dtype == torch.bfloat16
    # reference: autograd through the same bf16 head (bf16 GEMM, logits to fp32, log_softmax)
    hr, wr = hb.detach().clone().requires_grad_(), wb.detach().clone().requires_grad_()
    rlogp, rent = _plain(hr, wr, ids, 1.0)
    rh, rw = torch.autograd.grad((rlogp + rent).sum(), (hr, wr))
    torch.testing.assert_close(logp, rlogp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding of the gradients
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_autocast_bf16_over_fp32_weights_matches_autograd_under_the_same_autocast():
    """The trainer's case: fp32 weights, bf16 autocast. The forward's logits and the backward's
    recomputed ones must come from the same bf16 GEMM (a backward recomputing in fp32 was 10 % off)."""
    h, w, ids = _case(n=32, d=64, v=500, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = head_logp_entropy(h, w, ids, 0.9, chunk_rows=7)
    gh, gw = torch.autograd.grad((logp + 0.5 * ent).sum(), (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logq = torch.log_softmax((h @ w.T).float() / 0.9, -1)  # the plain path under autocast
        rlogp, rent = logq.gather(-1, ids[:, None]).squeeze(-1), -(logq.exp() * logq).sum(-1)
    rh, rw = torch.autograd.grad((rlogp + 0.5 * rent).sum(), (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(logp, rlogp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-5)
    assert _rel(gh, rh) < 1e-2 and _rel(gw, rw) < 1e-2, (_rel(gh, rh), _rel(gw, rw))
    # backward inside an autocast region gives the same gradients as outside (it fixes its own dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp2, ent2 = head_logp_entropy(h, w, ids, 0.9, chunk_rows=7)
        gh2, gw2 = torch.autograd.grad((logp2 + 0.5 * ent2).sum(), (h, w))
    torch.testing.assert_close(gh2, gh, rtol=0, atol=0)
    torch.testing.assert_close(gw2, gw, rtol=0, atol=0)


def test_bad_token_id_is_one_line_error():
    h, w, ids = _case()
    with pytest.raises(ValueError, match=r"token id out of range \[0, 50\)"):
        head_logp_entropy(h, w, ids + 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_kernel_forward_and_backward_equal_the_plain_path():
    h, w, ids = _case(n=300, d=64, v=1000)
    h, w = h.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    ids = ids.cuda()
    logp, ent = head_logp_entropy(h, w, ids, 0.7, chunk_rows=128)
    gh, gw = torch.autograd.grad((logp - 0.5 * ent).sum(), (h, w))
    rlogp, rent = _plain(h, w, ids, 0.7)
    rh, rw = torch.autograd.grad((rlogp - 0.5 * rent).sum(), (h, w))
    torch.testing.assert_close(logp, rlogp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, rent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-3, atol=1e-4)
