import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_lens.logits import logit_stats, logit_stats_reference, recording_paths


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


def test_default_chunk_rows_values():
    from entropy_lens.logits import default_chunk_rows

    assert default_chunk_rows(3, 100) == 8 and isinstance(default_chunk_rows(3, 100), int)  # 100 // 12
    assert default_chunk_rows(1000, 40_000) == 10
    assert default_chunk_rows(10**6, 4 * 10**6) == 1  # a vocabulary wider than the budget: one row
    assert default_chunk_rows(10**7, 100) == 1
    assert default_chunk_rows(1, 100) == 25 and default_chunk_rows(0, 100) == 25  # V < 1 read as 1


def test_temperature_one_half_divides_the_logits():
    """τ = 0.5 (1/τ = 2) is applied like any other temperature."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 40, generator=g) * 2
    ids = torch.randint(0, 40, (9,), generator=g)
    _close(logit_stats(logits, ids, 0.5, chunk_rows=4), logit_stats_reference(logits, ids, 0.5))
    assert not torch.allclose(logit_stats(logits, ids, 0.5).entropy, logit_stats(logits, ids, 1.0).entropy)


def test_token_ids_of_any_integer_dtype_and_shape():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 30, generator=g)
    ids = torch.randint(0, 30, (6,), generator=g)
    ref = logit_stats_reference(logits, ids)
    _close(logit_stats(logits, ids.to(torch.int32)), ref)
    _close(logit_stats(logits, ids.to(torch.int16).reshape(2, 3)), ref)


def test_error_messages_are_exact():
    with pytest.raises(ValueError, match=r"^logits must be floating point, got torch\.int64$"):
        logit_stats(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^token_ids has 3 entries for 2 logit rows$"):
        logit_stats(torch.randn(2, 5), torch.tensor([0, 1, 2]))


def test_results_are_float32_whatever_the_default_dtype():
    """Statistics and scratch are fp32 by construction, not by the global default dtype."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(11, 257, generator=g) * 3
    ids = torch.randint(0, 257, (11,), generator=g)
    a = logit_stats(logits, ids, 0.7, chunk_rows=4)
    b_in = logits.clone()
    b_c = logit_stats(b_in, ids, 0.7, chunk_rows=4, consume=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        b = logit_stats(logits, ids, 0.7, chunk_rows=4)
        c = logit_stats(logits.clone(), ids, 0.7, chunk_rows=4, consume=True)
    finally:
        torch.set_default_dtype(old)
    for k in ("logp", "entropy", "sum_p2", "sum_p2_logp"):
        assert getattr(b, k).dtype == torch.float32 and getattr(c, k).dtype == torch.float32, k
        assert torch.equal(getattr(a, k), getattr(b, k)), k  # bit for bit: the same fp32 arithmetic
        assert torch.equal(getattr(b_c, k), getattr(c, k)), k


def test_cpu_blocks_follow_the_scratch_budget_and_chunk_rows(monkeypatch):
    """On the CPU a block holds SCRATCH_BYTES of fp32 rows (DEVICE_SCRATCH_BYTES is for other
    devices); ``chunk_rows`` overrides it, down to one row."""
    import entropy_lens.logits as lg

    V, N = 64, 10
    sizes = []
    real = lg._block_stats

    def spy(x, *args):
        sizes.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(lg, "_block_stats", spy)
    monkeypatch.setattr(lg, "SCRATCH_BYTES", 4 * V * 3)
    monkeypatch.setattr(lg, "DEVICE_SCRATCH_BYTES", 4 * V * 50)
    g = torch.Generator().manual_seed(4)
    logits, ids = torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)
    ref = logit_stats_reference(logits, ids)
    _close(lg.logit_stats(logits, ids), ref)
    assert sizes == [3, 3, 3, 1]
    sizes.clear()
    _close(lg.logit_stats(logits, ids, chunk_rows=1), ref)
    assert sizes == [1] * N
    sizes.clear()
    _close(lg.logit_stats(logits, ids, chunk_rows=4), ref)
    assert sizes == [4, 4, 2]


def test_scratch_memory_is_one_block_per_buffer_and_never_resized():
    """Exact live bytes of vocabulary-width tensors: two fp32 blocks, one with ``consume=True``;
    a last, shorter block reuses the buffers (no resize warning)."""
    import warnings

    from entropy_lens.testing.memtrack import LiveTensorBytes

    V, N, rows = 256, 10, 4
    g = torch.Generator().manual_seed(5)
    logits, ids = torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)
    ref = logit_stats_reference(logits, ids)
    for consume, buffers in ((False, 2), (True, 1)):
        x = logits.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with LiveTensorBytes(select=lambda t: t.shape[-1:] == (V,)) as mem:
                out = logit_stats(x, ids, chunk_rows=rows, consume=consume)
        _close(out, ref)
        assert mem.peak == buffers * rows * V * 4, (consume, mem.peak)


def test_reference_gives_zero_probability_tokens_no_weight():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, float("-inf"), float("-inf")]])
    ref = logit_stats_reference(logits, torch.tensor([1, 0]))
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), -1)
    assert torch.isfinite(ref.entropy).all() and torch.isfinite(ref.sum_p2_logp).all()
    assert ref.entropy.tolist() == pytest.approx([float(-(p * p.log()).sum()), 0.0], abs=1e-12)
    assert ref.sum_p2_logp.tolist() == pytest.approx([float((p * p * p.log()).sum()), 0.0], abs=1e-12)


def test_recording_paths_counts_the_rows_of_each_implementation_inside_the_block_only():
    x, ids = torch.randn(7, 50), torch.randint(0, 50, (7,))
    logit_stats(x, ids)  # outside any block: not counted anywhere
    with recording_paths() as outer:
        logit_stats(x, ids)
        with recording_paths() as inner:
            logit_stats(x[:3], ids[:3])
            logit_stats(x[:0], ids[:0])  # no rows: nothing ran
        logit_stats(x[:2], ids[:2])
    assert inner == {"torch": 3} and outer == {"torch": 9}


def test_dispatch_to_the_cpu_kernel_with_a_stand_in(monkeypatch):
    """logit_stats's dispatch to the ahead-of-time CPU kernel, with a stand-in for the compiled
    operator (tests/test_cpu_aot.py runs the real one): the kernel receives the logits, the ids and
    τ; its finite result is returned and counted as ``cpu-kernel``; a non-finite one falls back to
    the eager path; ``ENTROPY_LENS_CPU_KERNEL=0`` switches it off, unset leaves it on."""
    from entropy_lens.kernels import cpu_aot

    calls = []

    def stand_in(logits, token_ids, temperature):
        calls.append((logits, token_ids, temperature))
        return torch.arange(4.0)[:, None] + torch.full((4, logits.shape[0]), 0.25)

    monkeypatch.setattr(cpu_aot, "logit_stats_kernel", stand_in)
    x, ids = torch.randn(5, 40), torch.randint(0, 40, (5,))
    monkeypatch.delenv("ENTROPY_LENS_CPU_KERNEL", raising=False)
    with recording_paths() as paths:
        got = logit_stats(x, ids, 0.7)
    assert len(calls) == 1 and calls[0][0] is x and torch.equal(calls[0][1], ids) and calls[0][2] == 0.7
    for k, name in enumerate(("logp", "entropy", "sum_p2", "sum_p2_logp")):
        assert torch.equal(getattr(got, name), torch.full((5,), k + 0.25)), name
    assert paths == {"cpu-kernel": 5}

    monkeypatch.setenv("ENTROPY_LENS_CPU_KERNEL", "0")
    calls.clear()
    with recording_paths() as paths:
        _close(logit_stats(x, ids, 0.7), logit_stats_reference(x, ids, 0.7))
    assert calls == [] and paths == {"torch": 5}

    monkeypatch.setenv("ENTROPY_LENS_CPU_KERNEL", "1")
    monkeypatch.setattr(cpu_aot, "logit_stats_kernel", lambda *a: torch.full((4, 5), float("nan")))
    with recording_paths() as paths:  # a non-finite kernel result: the eager path decides
        _close(logit_stats(x, ids, 0.7), logit_stats_reference(x, ids, 0.7))
    assert paths == {"torch": 5}
