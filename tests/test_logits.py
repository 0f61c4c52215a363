import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_lens.logits import logit_stats, logit_stats_reference


def _close(a, b, tol=2e-5):
    for name in ("logp", "entropy", "sum_p2", "sum_p2_logp"):
        x, y = getattr(a, name).double(), getattr(b, name).double()
        assert torch.allclose(x, y, atol=tol, rtol=tol), (name, (x - y).abs().max())


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_equals_float64_reference_any_chunk(chunk, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 501, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 501, (37,), generator=g)
    for tau in (1.0, 0.7):
        _close(logit_stats(logits, ids, tau, chunk_rows=chunk), logit_stats_reference(logits, ids, tau))


def test_non_contiguous_rows_and_strided_input():
    base = torch.randn(20, 2, 300)
    logits = base[:, 1, :]  # row stride 600
    ids = torch.randint(0, 300, (20,))
    _close(logit_stats(logits, ids, chunk_rows=6), logit_stats_reference(logits, ids))


def test_neg_inf_logits_are_zero_probability():
    logits = torch.randn(5, 50)
    logits[:, 10:] = float("-inf")
    ids = torch.randint(0, 10, (5,))
    out = logit_stats(logits, ids)
    ref = logit_stats_reference(logits[:, :10], ids)
    _close(out, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logit_rejected_with_row(bad):
    logits = torch.randn(9, 40)
    logits[6, 3] = bad
    with pytest.raises(ValueError, match="row 6"):
        logit_stats(logits, torch.zeros(9, dtype=torch.long), chunk_rows=4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="out of range"):
        logit_stats(torch.randn(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="temperature"):
        logit_stats(torch.randn(2, 5), torch.tensor([0, 1]), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        logit_stats(torch.randn(2, 3, 5), torch.tensor([0, 1]))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12), v=st.integers(2, 300), scale=st.floats(0.01, 30.0),
    chunk=st.integers(1, 13), seed=st.integers(0, 10_000), pad=st.integers(0, 5),
)
def test_properties_bounds_chunk_and_padding_invariance(n, v, scale, chunk, seed, pad):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * scale
    ids = torch.randint(0, v, (n,), generator=g)
    out = logit_stats(logits, ids, chunk_rows=chunk)
    tol = 1e-4
    assert bool((out.entropy >= -tol).all()) and bool((out.entropy <= math.log(v) + tol).all())
    assert bool((out.sum_p2 >= 1.0 / v - tol).all()) and bool((out.sum_p2 <= 1.0 + tol).all())
    assert bool((out.logp <= tol).all())
    # chunk-size invariance: one chunk vs many
    whole = logit_stats(logits, ids, chunk_rows=n)
    _close(out, whole, tol=1e-5)
    # padding invariance: extra rows around do not change the valid rows' results
    padded = torch.cat([torch.randn(pad, v, generator=g) * scale, logits, torch.randn(pad, v, generator=g)])
    pids = torch.cat([torch.zeros(pad, dtype=torch.long), ids, torch.zeros(pad, dtype=torch.long)])
    p_out = logit_stats(padded, pids, chunk_rows=chunk)
    for name in ("logp", "entropy", "sum_p2", "sum_p2_logp"):
        assert torch.allclose(getattr(p_out, name)[pad:pad + n], getattr(out, name), atol=1e-5, rtol=1e-5)


def test_consume_overwrites_only_when_allowed_and_gives_the_same_numbers():
    x = torch.randn(37, 300) * 3
    ids = torch.randint(0, 300, (37,))
    keep = x.clone()
    a = logit_stats(x, ids, 0.7, chunk_rows=5)
    assert torch.equal(x, keep)  # consume=False never writes the input
    b = logit_stats(x, ids, 0.7, chunk_rows=5, consume=True)
    assert not torch.equal(x, keep)  # fp32 contiguous + consume: overwritten in place
    for k in ("logp", "entropy", "sum_p2", "sum_p2_logp"):
        assert torch.allclose(getattr(a, k), getattr(b, k), atol=1e-6), k
    h = keep.to(torch.bfloat16)
    hk = h.clone()
    logit_stats(h, ids, consume=True)
    assert torch.equal(h, hk)  # not fp32: copied into scratch, input untouched


def test_consume_handles_masked_vocabulary_and_rejects_bad_rows():
    logits = torch.randn(6, 50)
    logits[:, 10:] = float("-inf")
    ids = torch.randint(0, 10, (6,))
    ref = logit_stats_reference(logits[:, :10], ids)
    _close(logit_stats(logits.clone(), ids, chunk_rows=4, consume=True), ref)
    all_masked = logits.clone()
    all_masked[4] = float("-inf")
    with pytest.raises(ValueError, match="every logit of row 4 is -inf"):
        logit_stats(all_masked, ids, chunk_rows=4, consume=True)
    nan_row = logits.clone()
    nan_row[5, 2] = float("nan")
    with pytest.raises(ValueError, match="row 5"):
        logit_stats(nan_row, ids, chunk_rows=4, consume=True)
