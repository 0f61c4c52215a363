import pytest
import torch

from entropy_lens.logits import logit_stats_reference
from entropy_lens.model.forward import pack, response_logp_entropy, response_stats


def _batch():
    prompts = [[2, 4, 10, 11, 3], [2, 4, 12, 3], [2, 5, 13, 14, 15, 3]]
    responses = [[20, 21, 22], [23, 24, 25, 26, 27], [28]]
    return prompts, responses


def test_response_stats_equal_full_forward_reference(tiny_model):
    prompts, responses = _batch()
    packed = pack(prompts, responses, pad_id=0)
    got = response_stats(tiny_model, packed, temperature=0.8, micro_batch=2, chunk_rows=2)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(r) - 1]
        ref = logit_stats_reference(logits, torch.tensor(r), 0.8)
        for k in ("logp", "entropy", "sum_p2", "sum_p2_logp"):
            assert torch.allclose(got[k][b, : len(r)].double(), getattr(ref, k), atol=1e-5), k
        assert torch.all(got["entropy"][b, len(r):] == 0)
    assert packed.mask.sum(-1).tolist() == [3, 5, 1]


def test_micro_batch_and_chunk_size_do_not_change_results(tiny_model):
    packed = pack(*_batch(), pad_id=0)
    a = response_stats(tiny_model, packed, micro_batch=1, chunk_rows=1)
    b = response_stats(tiny_model, packed, micro_batch=3, chunk_rows=1000)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)


def test_differentiable_path_matches_no_grad_path(tiny_model):
    packed = pack(*_batch(), pad_id=0)
    logp, ent = response_logp_entropy(tiny_model, packed)
    ref = response_stats(tiny_model, packed)
    assert logp.requires_grad
    assert torch.allclose(logp.detach(), ref["logp"], atol=1e-5)
    assert torch.allclose(ent.detach(), ref["entropy"], atol=1e-5)


def test_vocabulary_width_memory_stays_within_one_chunk():
    """All tensors of vocabulary width alive at once (LM-head chunk + scratch) fit in chunk_bytes,
    over many chunks, while a plain forward + log_softmax holds the whole [B, S, V] several times."""
    from conftest import make_model

    from entropy_lens.testing.memtrack import live_peak_bytes

    v = 4096
    model = make_model(vocab=v)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, v, (5,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(7, v, (40,), generator=g).tolist() for _ in range(4)]
    packed = pack(prompts, responses, pad_id=0)
    budget = 40 * 4 * v  # 40 fp32 rows; 160 response rows -> several chunks
    wide = lambda t: t.dim() >= 1 and t.shape[-1] == v  # noqa: E731
    ours = live_peak_bytes(lambda: response_stats(model, packed, micro_batch=4, chunk_bytes=budget), wide)

    def naive():
        with torch.no_grad():
            logq = torch.log_softmax(model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits.float(), -1)
            return -(logq.exp() * logq).sum(-1)

    full = live_peak_bytes(naive, wide)
    assert 0 < ours <= budget
    assert full >= 2 * 4 * 45 * v * 4  # logits + log_softmax of all 4 × 45 positions
    ref = response_stats(model, packed, micro_batch=1, chunk_rows=1000)
    got = response_stats(model, packed, micro_batch=4, chunk_bytes=budget)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k


def _loss_and_grads(model, packed, **kw):
    logp, ent = response_logp_entropy(model, packed, 0.9, **kw)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(logp.shape, generator=g, dtype=logp.dtype)
    b = torch.randn(ent.shape, generator=g, dtype=ent.dtype)
    loss = (a * logp).sum() + (b * ent).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return logp.detach(), ent.detach(), grads


def test_chunked_differentiable_path_equals_the_one_pass_path_in_value_and_gradient(tiny_model):
    model = tiny_model.double()
    packed = pack(*_batch(), pad_id=0)
    ref = _loss_and_grads(model, packed, chunk_rows=10_000, head="autograd")  # one chunk: the plain path
    for rows in (1, 2, 3, 8):
        got = _loss_and_grads(model, packed, chunk_rows=rows, head="autograd")
        assert torch.allclose(got[0], ref[0], rtol=0, atol=1e-12)
        assert torch.allclose(got[1], ref[1], rtol=0, atol=1e-12)
        for gg, gr in zip(got[2], ref[2]):
            assert torch.allclose(gg, gr, rtol=1e-10, atol=1e-13)
    # the closed-form head keeps float64 through the softmax (the plain path rounds the logits to fp32);
    # both return fp32
    for rows in (1, 3, None):
        got = _loss_and_grads(model, packed, chunk_rows=rows, head="closed-form")
        assert got[0].dtype == got[1].dtype == torch.float32
        assert torch.allclose(got[0], ref[0], rtol=0, atol=2e-6)
        assert torch.allclose(got[1], ref[1], rtol=0, atol=2e-6)
        for gg, gr in zip(got[2], ref[2]):
            assert torch.allclose(gg, gr, rtol=1e-4, atol=1e-6)
    tiny_model.float()


def test_chunked_differentiable_path_bounds_vocabulary_width_memory_through_backward():
    """Forward + backward: the one-pass path holds [M, V] several times; the chunked path at most
    a few [r, V] blocks of one chunk, whatever M is."""
    from conftest import make_model

    from entropy_lens.testing.memtrack import live_peak_bytes

    v = 4096
    model = make_model(vocab=v)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, v, (5,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(7, v, (40,), generator=g).tolist() for _ in range(4)]
    packed = pack(prompts, responses, pad_id=0)
    wide = lambda t: t.dim() >= 1 and t.shape[-1] == v  # noqa: E731

    def step(**kw):
        def run():
            model.zero_grad(set_to_none=True)
            logp, ent = response_logp_entropy(model, packed, **kw)
            (logp.sum() + ent.sum()).backward()

        return run

    rows = 16
    chunked = live_peak_bytes(step(chunk_rows=rows, head="autograd"), wide)
    closed = live_peak_bytes(step(chunk_rows=rows, head="closed-form"), wide)
    plain = live_peak_bytes(step(chunk_rows=10_000, head="autograd"), wide)
    M = 160
    assert plain >= 3 * M * v * 4  # logits, log-softmax and more, for all 160 rows at once
    assert 0 < chunked <= 6 * rows * v * 4  # a few [16, V] temporaries of one chunk
    assert 0 < closed <= 3 * rows * v * 4  # backward: log q → ∂L/∂z and q of one chunk


def test_auto_head_is_closed_form_for_a_linear_head_and_autograd_otherwise(tiny_model, monkeypatch):
    import entropy_lens.kernels.head_grad as fk
    from entropy_lens.model.forward import closed_form_head_applies

    calls = []
    real = fk.head_logp_entropy
    monkeypatch.setattr(fk, "head_logp_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed = pack(*_batch(), pad_id=0)
    assert closed_form_head_applies(tiny_model)
    response_logp_entropy(tiny_model, packed)
    assert calls == [1]
    with torch.no_grad():  # no autograd: nothing to gain, the plain pass
        response_logp_entropy(tiny_model, packed)
    assert calls == [1]
    tiny_model.config.final_logit_softcapping = 30.0
    try:
        assert not closed_form_head_applies(tiny_model)
        response_logp_entropy(tiny_model, packed)
        assert calls == [1]
        with pytest.raises(ValueError, match="needs a linear LM head"):
            response_logp_entropy(tiny_model, packed, head="closed-form")
    finally:
        tiny_model.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="head must be one of"):
        response_logp_entropy(tiny_model, packed, head="triton")
