"""The one-pass Triton kernel, the fused (no-logits) variant, the dispatcher and the benchmark harness.

Without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton is imported) on CPU tensors at small sizes; with CUDA they run compiled. Tests that need
Triton skip when it is not installed. No test asserts a timing.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # kernels are built at import; must precede it

from entropy_lens.kernels import fused_logit_stats, logit_stats_auto  # noqa: E402
from entropy_lens.kernels.fused import fused_logit_stats_torch  # noqa: E402
from entropy_lens.logits import default_chunk_rows, logit_stats, logit_stats_reference  # noqa: E402

DEV = "cuda" if _CUDA else "cpu"
NAMES = ("logp", "entropy", "sum_p2", "sum_p2_logp")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: log(0) on padding rows


def _kernels():
    """(triton_logits, fused) modules whose kernels run here: interpreted without CUDA."""
    pytest.importorskip("triton")
    import entropy_lens.kernels.fused as fk
    import entropy_lens.kernels.triton_logits as tk

    if not _CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tk._logit_stats_kernel, InterpretedFunction):  # imported earlier without the flag
            tk = importlib.reload(tk)
            fk = importlib.reload(fk)
    return tk, fk


def _bench():
    """benchmarks/logits_bench.py as a module (the repository root need not be on sys.path)."""
    name = "benchmarks.logits_bench"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "logits_bench.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _close(got, ref, tol=2e-5):
    for k in NAMES:
        x, y = getattr(got, k).double().cpu(), getattr(ref, k).double().cpu()
        assert x.shape == y.shape, k
        assert torch.allclose(x, y, atol=tol, rtol=tol), (k, float((x - y).abs().max()))


def _logits(n, v, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype).to(DEV), torch.randint(0, v, (n,), generator=g).to(DEV)


# ---------------------------------------------------------------- one-pass kernel


@pytest.mark.parametrize("exp2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n, v, block_v, block_r, splits, tau",
    [
        (13, 501, 128, 1, 1, 0.7),  # V not a multiple of the tile, one program per row
        (6, 1000, 64, 1, 3, 1.0),  # vocabulary split over programs + merge kernel
        (64, 999, 256, 8, None, 1.3),  # several rows per program, default splits
    ],
)
def test_kernel_equals_float64_reference(dtype, n, v, block_v, block_r, splits, tau, exp2):
    tk, _ = _kernels()
    x, ids = _logits(n, v, dtype)
    got = tk.logit_stats_triton(x, ids, tau, block_v=block_v, block_r=block_r, splits=splits, exp2=exp2)
    _close(got, logit_stats_reference(x, ids, tau))
    _close(got, logit_stats(x, ids, tau), tol=1e-5)  # the chunked torch path: same numbers


def test_kernel_any_row_and_column_stride():
    tk, _ = _kernels()
    base = torch.randn(20, 2, 300, device=DEV) * 3
    rows = base[:, 1, :]  # row stride 600
    cols = (torch.randn(300, 20, device=DEV) * 3).T  # column stride 20
    ids = torch.randint(0, 300, (20,), device=DEV)
    for x in (rows, cols):
        assert not x.is_contiguous()
        _close(tk.logit_stats_triton(x, ids, 0.9, block_v=64, block_r=4), logit_stats_reference(x, ids, 0.9))


@pytest.mark.parametrize("exp2", [False, True])
def test_kernel_online_rescaling_extremes(exp2):
    """Maximum in the last tile (every tile rescales), in the first tile, near one-hot, near uniform."""
    tk, _ = _kernels()
    v = 700
    ramp = torch.linspace(-30.0, 30.0, v)
    g = torch.Generator().manual_seed(0)  # fixed draws: with scale 60 row 2 must be nearly one-hot
    x = torch.stack([ramp, ramp.flip(0), torch.randn(v, generator=g) * 60, torch.randn(v, generator=g) * 1e-3,
                     torch.full((v,), 5.0)]).to(DEV)
    ids = torch.tensor([v - 1, 0, 3, 5, 7], device=DEV)
    got = tk.logit_stats_triton(x, ids, 1.0, block_v=64, block_r=1, exp2=exp2)
    ref = logit_stats_reference(x, ids)
    _close(got, ref)
    assert abs(float(got.entropy[4]) - math.log(v)) < 1e-5 and abs(float(got.sum_p2[4]) - 1 / v) < 1e-7
    assert float(got.sum_p2[2]) > 0.5  # scale 60: nearly one-hot


@pytest.mark.parametrize("exp2", [False, True])
def test_kernel_neg_inf_vocabulary_has_zero_probability(exp2):
    tk, _ = _kernels()
    x, ids = _logits(9, 300, torch.float32)
    x[:, 10:] = float("-inf")  # whole tiles of -inf after the first
    x[3, :5] = float("-inf")
    ids = ids % 10
    ids[3] = 7
    got = tk.logit_stats_triton(x, ids, 1.0, block_v=64, block_r=2, exp2=exp2)
    _close(got, logit_stats_reference(x[:, :10], ids))


@pytest.mark.parametrize("exp2", [False, True])
@pytest.mark.parametrize("kind", ["nan", "+inf", "all_-inf", "id_high", "id_negative"])
def test_kernel_bad_input_raises_the_torch_path_error(kind, exp2):
    tk, _ = _kernels()
    x, ids = _logits(9, 200, torch.bfloat16)
    if kind == "nan":
        x[6, 3], match = float("nan"), "row 6"
    elif kind == "+inf":
        x[6, 150], match = float("inf"), "row 6"
    elif kind == "all_-inf":
        x[2], match = float("-inf"), "every logit of row 2"
    elif kind == "id_high":
        ids[4], match = 200, "out of range"
    else:
        ids[4], match = -1, "out of range"
    with pytest.raises(ValueError, match=match):
        tk.logit_stats_triton(x, ids, block_v=64, block_r=4, exp2=exp2)
    raw = tk.logit_stats_triton(x, ids, block_v=64, block_r=4, exp2=exp2, check=False)  # the kernel's own signal
    assert not bool(torch.isfinite(torch.stack([raw.logp, raw.entropy])).all())


def test_kernel_argument_errors_and_empty_input():
    tk, _ = _kernels()
    out = tk.logit_stats_triton(torch.empty(0, 50, device=DEV), torch.empty(0, dtype=torch.long, device=DEV))
    assert out.entropy.shape == (0,) and out.entropy.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        tk.logit_stats_triton(torch.randn(2, 3, 5, device=DEV), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        tk.logit_stats_triton(torch.randn(2, 5, device=DEV), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="3 entries for 2"):
        tk.logit_stats_triton(torch.randn(2, 5, device=DEV), torch.zeros(3, dtype=torch.long))


def test_default_splits_fill_the_device():
    tk, _ = _kernels()
    dev = torch.device("cpu")  # 4 "SMs" off-GPU: want 16 programs
    assert tk.default_splits(1000, 40, 1, dev) == 1
    assert tk.default_splits(2, 40, 1, dev) == 8
    assert tk.default_splits(2, 3, 1, dev) == 3  # never more splits than tiles


# ---------------------------------------------------------------- fused (no logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_kernel_equals_float64_reference(dtype):
    _, fk = _kernels()
    g = torch.Generator().manual_seed(3)
    # N, D, V not multiples of the tiles; hidden with column stride 2, weight stored transposed
    h = torch.randn(37, 96, generator=g).to(dtype).to(DEV)[:, ::2]
    w = (torch.randn(48, 301, generator=g) * 0.5).to(dtype).to(DEV).T
    ids = torch.randint(0, 301, (37,), generator=g).to(DEV)
    assert h.stride(1) == 2 and w.stride(0) == 1
    ref = logit_stats_reference(h.double() @ w.double().T, ids, 0.8)
    got = fk.fused_logit_stats_triton(h, w, ids, 0.8, block_n=16, block_v=64, block_d=32)
    _close(got, ref)
    one_split = fk.fused_logit_stats_triton(h, w, ids, 0.8, block_n=32, block_v=32, block_d=16, splits=1)
    _close(one_split, ref)
    _close(fused_logit_stats_torch(h, w, ids, 0.8, chunk_rows=5), ref)


def test_fused_kernel_bad_input():
    _, fk = _kernels()
    h, w = torch.randn(10, 32, device=DEV), torch.randn(100, 32, device=DEV)
    ids = torch.randint(0, 100, (10,), device=DEV)
    h[4, 0] = float("nan")
    with pytest.raises(ValueError, match="row 4"):
        fk.fused_logit_stats_triton(h, w, ids, block_n=16, block_v=32, block_d=16)
    with pytest.raises(ValueError, match="out of range"):
        fk.fused_logit_stats_triton(h.nan_to_num(), w, ids + 100, block_n=16, block_v=32, block_d=16)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fk.fused_logit_stats_triton(h, torch.randn(100, 31, device=DEV), ids)


def test_fused_torch_path_reports_the_hidden_row():
    h, w = torch.randn(10, 8), torch.randn(40, 8)
    h[7, 2] = float("nan")
    with pytest.raises(ValueError, match="row 7$"):
        fused_logit_stats_torch(h, w, torch.zeros(10, dtype=torch.long), chunk_rows=3)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fused_logit_stats(h, torch.randn(40, 9), torch.zeros(10, dtype=torch.long))


def test_fused_cpu_dispatch_is_chunked_torch_path():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(30, 16, generator=g), torch.randn(90, 16, generator=g)
    ids = torch.randint(0, 90, (30,), generator=g)
    a, b = fused_logit_stats(h, w, ids, 1.2, chunk_rows=7), fused_logit_stats_torch(h, w, ids, 1.2, chunk_rows=7)
    for k in NAMES:
        assert torch.equal(getattr(a, k), getattr(b, k))
    _close(a, logit_stats_reference(h @ w.T, ids, 1.2))


# ---------------------------------------------------------------- dispatcher


def test_auto_on_cpu_is_the_chunked_path():
    x, ids = torch.randn(23, 140) * 3, torch.randint(0, 140, (23,))
    a, b = logit_stats_auto(x, ids, 0.6, chunk_rows=4), logit_stats(x, ids, 0.6, chunk_rows=4)
    for k in NAMES:
        assert torch.equal(getattr(a, k), getattr(b, k))


def test_auto_kernel_branch(monkeypatch):
    """The CUDA branch of the dispatcher (forced here; interpreted off-GPU): same numbers, same errors."""
    _kernels()
    import entropy_lens.kernels as kpkg

    monkeypatch.setattr(kpkg, "_use_triton", lambda t: True)
    x, ids = _logits(12, 333, torch.float16)
    _close(kpkg.logit_stats_auto(x, ids, 1.1), logit_stats_reference(x, ids, 1.1))
    x[5, 0] = float("nan")
    with pytest.raises(ValueError, match="row 5"):
        kpkg.logit_stats_auto(x, ids)


# ---------------------------------------------------------------- memory of the chunked CPU path


def test_chunked_path_peak_memory_is_chunks_not_the_full_tensor():
    lb = _bench()
    n, v, rows = 512, 4096, 32
    x, ids = torch.randn(n, v) * 3, torch.randint(0, v, (n,))
    full, chunk = n * v * 4, rows * v * 4
    naive = lb.live_peak_bytes(lambda: lb.naive_fp32(x, ids))
    chunked = lb.live_peak_bytes(lambda: logit_stats(x, ids, chunk_rows=rows))
    consumed = lb.live_peak_bytes(lambda: logit_stats(x.clone(), ids, chunk_rows=rows, consume=True))
    previous = lb.live_peak_bytes(lambda: lb.previous_logit_stats(x, ids, chunk_rows=rows))
    small = 4 * n * 4 + 8 * n + 64 * n  # the [4, N] outputs, the [N] masks, per-block [rows] sums
    assert naive >= 2 * full  # log_softmax output + exp (+ product) of the whole tensor
    assert 2 * chunk <= chunked <= 2 * chunk + small  # two scratch blocks, nothing else of width V
    assert chunk <= consumed - full <= chunk + small  # (the clone counts as full) one scratch block
    assert previous >= 3 * chunk  # the earlier loop: copy, exp and vecdot's product
    assert chunked * 8 < naive
    assert default_chunk_rows(49_152) * 4 * 49_152 <= 32 * 2**20 < (default_chunk_rows(49_152) + 1) * 4 * 49_152


# ---------------------------------------------------------------- benchmark harness (tiny sizes)


def test_benchmark_methods_agree_with_float64_at_tiny_size():
    lb = _bench()
    rows = lb.bench_logits("cpu", 40, 300, torch.float32,
                           ["naive_fp32", "naive_128row_chunks", "verl_style", "chunked_logit_stats", "previous_chunked"],
                           copy_gbs=1.0, reps=1, tau=0.8)
    assert [r.method for r in rows][0] == "naive_fp32" and rows[0].vs_baseline == 1.0
    for r in rows:
        assert r.rel_err is not None and r.rel_err < 1e-5, (r.method, r.rel_err)
        assert r.ms > 0 and r.outputs == (2 if r.method in lb.TWO_OUTPUTS else 4)
        assert r.peak_mb is not None and r.peak_mb > 0
    fused = lb.bench_fused("cpu", 24, 16, 200, torch.float32, reps=1, quick=True)
    assert {r.method for r in fused} >= {"gemm_only", "gemm+naive_fp32", "fused_torch_chunked"}
    assert all(r.rel_err < 1e-5 for r in fused if r.method != "gemm_only")
    table = lb.markdown_table(rows + fused)
    assert table.count("\n") == len(rows) + len(fused) + 1


@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
def test_cuda_kernel_large_vocab_bf16():
    tk, fk = _kernels()
    lb = _bench()
    x, ids = lb.make_logits(256, 151_936, torch.bfloat16, "cuda")
    ref = lb.reference64(x, ids, 1.0)
    for st in (tk.logit_stats_triton(x, ids), logit_stats_auto(x, ids), tk.logit_stats_triton(x[:3], ids[:3]),
               tk.logit_stats_triton(x, ids, exp2=True), tk.logit_stats_triton(x[:3], ids[:3], exp2=True)):
        got = {k: getattr(st, k) for k in NAMES}
        assert lb.max_rel_error(got, {k: r[: len(got["logp"])] for k, r in ref.items()}) < 1e-5
    h = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5000, 256, device="cuda", dtype=torch.bfloat16) * 0.1
    ids = torch.randint(0, 5000, (300,), device="cuda")
    _close(fk.fused_logit_stats_triton(h, w, ids), logit_stats_reference(h.double() @ w.double().T, ids), tol=1e-4)


def test_missing_triton_fails_the_run_where_the_test_extra_installs_it():
    """conftest's check: on Linux x86-64 a run that collects these tests and cannot import triton
    stops with one clear message instead of skipping them; elsewhere, or without these tests
    (the verl/TRL extras' runs), nothing is checked."""
    from conftest import triton_problem

    def absent(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    msg = triton_problem({"test_kernels.py", "test_logits.py"}, "Linux", "x86_64", absent)
    assert msg is not None and "import triton" in msg and "No module named 'triton'" in msg
    assert '.[test]' in msg and "--ignore=tests/test_kernels.py" in msg
    alone = triton_problem({"test_triton_head_grad.py"}, "Linux", "x86_64", absent)
    assert alone is not None and "--ignore=tests/test_triton_head_grad.py" in alone
    assert triton_problem({"test_trl.py"}, "Linux", "x86_64", absent) is None
    assert triton_problem({"test_kernels.py"}, "Darwin", "arm64", absent) is None
    assert triton_problem({"test_kernels.py"}, "Linux", "aarch64", absent) is None
    assert triton_problem({"test_kernels.py"}, "Linux", "x86_64", lambda name: None) is None
