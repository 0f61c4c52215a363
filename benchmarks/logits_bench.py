"""Speed, memory and accuracy of the per-token logit statistics, against baselines run in the same process.

    python -m benchmarks.logits_bench [--device cuda|cpu] [--quick] [--json OUT.json] [--markdown OUT.md]

The CPU kernel is built into a fresh temporary cache each run (its build is timed); set
``ENTROPY_LENS_BENCH_KERNEL_CACHE=DIR`` to reuse an artefact there instead.

Sections (each prints one markdown table; ratios are against rows measured in the same run):

1. ``copy``: device copy bandwidth, ``dst.copy_(src)``, counted as bytes read + bytes written.
2. ``logits``: one logits tensor [N, V] (GPU: 8192 × 151,936 bf16; CPU: 4096 × 49,152 fp32), every
   method: naive fp32 PyTorch (log_softmax + entropy), the same in 128-row chunks (TRL-style), a
   verl-style formula (logsumexp − Σ softmax·z), torch.compile of it, the chunked path
   ``entropy_lens.logits.logit_stats`` (its eager path), a candidate faster CPU chunk loop
   (``proposed_*``), on the CPU the ahead-of-time built kernel (``cpu_aot_kernel`` alone and
   ``logit_stats+cpu_aot`` through the library's dispatch), and on CUDA the Triton kernel. Columns: ms (median), effective GB/s of logits read (N·V·itemsize / time),
   fraction of the copy bandwidth, peak extra memory, max relative error against float64.
3. ``kernel-tune`` (CUDA): the Triton kernel over block sizes / warps on the headline case.
4. ``sweep`` (CUDA): N and V sweeps for the naive, compiled, chunked and kernel paths.
5. ``fused``: hidden [N, D] × LM head [V, D] → statistics: GEMM alone, GEMM + naive, GEMM + chunked /
   kernel, and the fused no-logits variant (Triton on CUDA, chunked torch on the CPU).
6. ``model`` (CUDA): instrumentation overhead against a bare forward of a Qwen2-shaped 1.5B model
   built from a config with random weights (8 × 1024 tokens).
7. ``cpu-kernel`` (CPU): the ahead-of-time kernel's build time (fresh build into a temporary cache,
   as ``entropy-lens kernels build`` does), and in a fresh process the time to import and load it
   and the first ``logit_stats`` call against the next one (the first-call stall a user sees).

Results also go to ``benchmarks/results/<device>.json`` (``<device>-quick.json`` with ``--quick``;
not with ``--smoke``): per row device, shape, ms, GB/s, % of copy bandwidth and the speed ratio to
each baseline measured in the same run (``extra.ratios``).

Peak memory: CUDA ``max_memory_allocated`` above the allocation before the call; CPU both the peak
of live tensor bytes created by ATen ops during the call (deterministic, :class:`LiveTensorBytes`;
"n/a" for compiled code, whose buffers bypass the dispatcher) and the peak RSS increase of one call
in a fresh subprocess. Relative error of an output q: max|q − q₆₄| / max|q₆₄| (float64 reference),
worst over the outputs the method returns.

No timing is asserted anywhere; ``tests/test_kernels.py`` runs the harness functions at tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from entropy_lens.logits import logit_stats
from entropy_lens.testing.memtrack import LiveTensorBytes, live_peak_bytes  # noqa: F401 (re-exported for tests)

OUTPUTS = ("logp", "entropy", "sum_p2", "sum_p2_logp")


# --------------------------------------------------------------------------------------------
# methods: each maps (logits [N, V], ids [N], τ) -> dict of [N] outputs
# --------------------------------------------------------------------------------------------


def _as_dict(st) -> dict[str, torch.Tensor]:
    """LogitStats -> {name: [N] tensor}."""
    return {k: getattr(st, k) for k in OUTPUTS}


def naive_fp32(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """Plain PyTorch: log_softmax in fp32, log-prob gather and H = −Σ p log p (two outputs)."""
    logq = torch.log_softmax(logits.float() / tau, dim=-1)
    return {"logp": logq.gather(-1, ids[:, None]).squeeze(-1), "entropy": -(logq.exp() * logq).sum(-1)}


def naive_chunked(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, rows: int = 128) -> dict[str, torch.Tensor]:
    """:func:`naive_fp32` over 128-row chunks (the chunking TRL applies to its entropy)."""
    parts = [naive_fp32(logits[i : i + rows], ids[i : i + rows], tau) for i in range(0, logits.shape[0], rows)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def verl_style(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """H = logsumexp(z) − Σ softmax(z)·z and log π_y = z_y − logsumexp(z), in fp32 (two outputs)."""
    z = logits.float() / tau
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    return {"logp": z.gather(-1, ids[:, None]).squeeze(-1) - lse, "entropy": lse - (p * z).sum(-1)}


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a call, then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chunked(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """``entropy_lens.logits.logit_stats``, eager path (all four outputs; the CPU kernel switched off)."""
    with _env(ENTROPY_LENS_CPU_KERNEL="0"):
        return _as_dict(logit_stats(logits, ids, tau, chunk_rows=chunk_rows))


#: Environment variable naming the cache folder that holds the benchmark's CPU kernel artefact
#: (set by :func:`run`, inherited by the RSS subprocesses).
KERNEL_CACHE_ENV = "ENTROPY_LENS_BENCH_KERNEL_CACHE"


def cpu_aot_kernel(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """The ahead-of-time built CPU kernel alone (``entropy_lens.kernels.cpu_aot``), all four outputs."""
    from entropy_lens.kernels import cpu_aot

    out = cpu_aot.logit_stats_kernel(logits, ids, tau, os.environ.get(KERNEL_CACHE_ENV))
    if out is None:
        raise RuntimeError(f"no CPU kernel artefact under ${KERNEL_CACHE_ENV} for this input")
    return dict(zip(OUTPUTS, out))


def logit_stats_cpu_aot(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """``entropy_lens.logits.logit_stats`` with the CPU kernel artefact present (its dispatch, argument
    checks and finiteness check included)."""
    cache = os.environ.get(KERNEL_CACHE_ENV)
    if cache is None:
        raise RuntimeError(f"${KERNEL_CACHE_ENV} not set")
    with _env(ENTROPY_LENS_CACHE=cache, ENTROPY_LENS_CPU_KERNEL="1"):
        return _as_dict(logit_stats(logits, ids, tau))


def previous_logit_stats(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The library's earlier CPU loop, kept as the before/after baseline (finite input only):
    a fresh fp32 copy per ~32 MiB chunk, ``exp`` into a new tensor and ``torch.linalg.vecdot``
    (which materialises its product), so ~3 chunks are alive at the peak."""
    n, v = logits.shape
    rows = chunk_rows or max(1, (32 << 20) // (4 * max(v, 1)))
    out = torch.empty(4, n, dtype=torch.float32, device=logits.device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z = logits[i:j].to(torch.float32, copy=True)
        if tau != 1.0:
            z.mul_(1.0 / tau)
        z.sub_(z.amax(dim=-1, keepdim=True))
        e = torch.exp(z)
        s = e.sum(-1)
        log_s = torch.log(s)
        ez = torch.linalg.vecdot(e, z)
        e.mul_(e)
        e2, e2z = e.sum(-1), torch.linalg.vecdot(e, z)
        out[0, i:j] = z.gather(-1, ids[i:j, None]).squeeze(-1) - log_s
        out[1, i:j] = log_s - ez / s
        out[2, i:j] = e2 / (s * s)
        out[3, i:j] = e2z / (s * s) - log_s * out[2, i:j]
    return dict(zip(OUTPUTS, out))


def _stats_core(x: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, ...]:
    """Pure function of one chunk for torch.compile: (m, S, T, Q, R) with y = z − m, e = e^y."""
    z = x.float() * inv_t
    m = z.amax(-1, keepdim=True)
    y = z - m
    e = torch.exp(y)
    ey = e * y
    return m.squeeze(-1), e.sum(-1), ey.sum(-1), (e * e).sum(-1), (ey * e).sum(-1)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)  # static first; one dynamic recompile on a new shape
    return _COMPILED[name]


def verl_style_compiled(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """``torch.compile`` of :func:`verl_style`."""
    return _compiled("verl", verl_style)(logits, ids, tau)


def proposed_compiled(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Candidate: ``torch.compile`` of the per-chunk sums (one fused max pass + one fused
    exp-and-four-sums pass per row, no [chunk, V] temporaries), 1024-row chunks, all four outputs."""
    n = logits.shape[0]
    rows = chunk_rows or 1024
    core = _compiled("core", _stats_core)
    out = torch.empty(4, n, dtype=torch.float32, device=logits.device)
    inv_t = 1.0 / tau
    for i in range(0, n, rows):
        j = min(i + rows, n)
        m, s, t, q, r = core(logits[i:j], inv_t)
        log_s = torch.log(s)
        z_tok = logits[i:j].gather(-1, ids[i:j, None]).squeeze(-1).float() * inv_t
        out[0, i:j] = z_tok - m - log_s
        out[1, i:j] = log_s - t / s
        out[2, i:j] = q / (s * s)
        out[3, i:j] = r / (s * s) - log_s * out[2, i:j]
    return dict(zip(OUTPUTS, out))


def triton_kernel(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, **cfg) -> dict[str, torch.Tensor]:
    """The one-pass Triton kernel without the finiteness check (no host sync)."""
    from entropy_lens.kernels.triton_logits import logit_stats_triton

    return _as_dict(logit_stats_triton(logits, ids, tau, check=False, **cfg))


def auto(logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """``entropy_lens.kernels.logit_stats_auto`` (kernel + one finiteness sync on CUDA)."""
    from entropy_lens.kernels import logit_stats_auto

    return _as_dict(logit_stats_auto(logits, ids, tau))


METHODS: dict[str, Callable] = {
    "naive_fp32": naive_fp32,
    "naive_128row_chunks": naive_chunked,
    "verl_style": verl_style,
    "verl_style_compiled": verl_style_compiled,
    "chunked_logit_stats": chunked,
    "previous_chunked": previous_logit_stats,
    "proposed_compiled": proposed_compiled,
    "cpu_aot_kernel": cpu_aot_kernel,
    "logit_stats+cpu_aot": logit_stats_cpu_aot,
    "triton_kernel": triton_kernel,
    "logit_stats_auto": auto,
}
CUDA_ONLY = {"triton_kernel", "logit_stats_auto"}
CPU_ONLY = {"cpu_aot_kernel", "logit_stats+cpu_aot"}
#: Rows every other row of a logits section is compared with (``extra.ratios``: that ms / this ms).
BASELINES = ("naive_fp32", "naive_128row_chunks", "verl_style", "verl_style_compiled", "chunked_logit_stats",
             "proposed_compiled")
TWO_OUTPUTS = {"naive_fp32", "naive_128row_chunks", "verl_style", "verl_style_compiled"}


# --------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated above the level before the call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return peak


def copy_bandwidth_gbs(device: str, nbytes: int, reps: int) -> float:
    """Device copy bandwidth in GB/s, counting bytes read + bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    ms = time_ms(lambda: dst.copy_(src), device, reps, warmup=2)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def reference64(logits: torch.Tensor, ids: torch.Tensor, tau: float, rows: int = 512) -> dict[str, torch.Tensor]:
    """Float64 reference, row chunk by row chunk (same equations as ``logit_stats_reference``)."""
    outs = {k: [] for k in OUTPUTS}
    for i in range(0, logits.shape[0], rows):
        z = logits[i : i + rows].double() / tau
        logq = torch.log_softmax(z, dim=-1)
        q = logq.exp()
        plogp = torch.where(q > 0, q * logq, torch.zeros_like(q))
        outs["logp"].append(logq.gather(-1, ids[i : i + rows, None]).squeeze(-1))
        outs["entropy"].append(-plogp.sum(-1))
        outs["sum_p2"].append((q * q).sum(-1))
        outs["sum_p2_logp"].append((q * plogp).sum(-1))
        del z, logq, q, plogp
    return {k: torch.cat(v) for k, v in outs.items()}


def max_rel_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max over returned outputs of max|q − q₆₄| / max|q₆₄|."""
    worst = 0.0
    for k, v in got.items():
        r = ref[k]
        worst = max(worst, float((v.double() - r).abs().max() / r.abs().max().clamp_min(1e-300)))
    return worst


def make_logits(n: int, v: int, dtype: torch.dtype, device: str, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian logits (std ``scale``) and uniform token ids, made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty(n, v, dtype=dtype, device=device)
    for i in range(0, n, 1024):  # fp32 noise in slices: no full-size fp32 temporary for bf16
        x[i : i + 1024] = torch.randn(min(1024, n - i), v, generator=g, device=device).mul_(scale)
    ids = torch.randint(0, v, (n,), generator=g, device=device)
    return x, ids


# --------------------------------------------------------------------------------------------
# RSS peak of one call in a fresh subprocess (CPU)
# --------------------------------------------------------------------------------------------


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _rss_child(method: str, n: int, v: int, dtype: str, tau: float) -> dict:
    """Run in the child: inputs, one warm-up call, reset the RSS high-water mark, one measured call."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    x, ids = make_logits(n, v, getattr(torch, dtype), "cpu")
    fn = METHODS[method]
    fn(x, ids, tau)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        reset = True
    except OSError:
        reset = False
    before = _proc_status_kb("VmRSS")
    res = fn(x, ids, tau)
    peak = _proc_status_kb("VmHWM")
    del res
    return {"peak_rss_delta_bytes": (peak - before) * 1024, "hwm_reset": reset}


def rss_peak_bytes(method: str, n: int, v: int, dtype: torch.dtype, tau: float, timeout: float = 900) -> int | None:
    """Peak RSS increase (bytes) of one call of ``method`` in a fresh Python process; None on failure."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.logits_bench", "--rss-child", method, str(n), str(v), str(dtype).split(".")[-1], str(tau)]
    env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None
    return int(res["peak_rss_delta_bytes"]) if res.get("hwm_reset") else None


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    method: str
    shape: str
    outputs: int
    ms: float
    gbs: float | None = None
    frac_copy: float | None = None
    peak_mb: float | None = None
    rss_mb: float | None = None
    rel_err: float | None = None
    vs_baseline: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def bench_logits(device: str, n: int, v: int, dtype: torch.dtype, methods: list, copy_gbs: float, reps: int,
                 tau: float = 1.0, rss: bool = False, section: str = "logits", errors: bool = True,
                 baseline: str = "naive_fp32") -> list[Row]:
    """Time, memory and error of ``methods`` on one [n, v] logits tensor; ``vs_baseline`` = baseline ms / ms.

    ``methods``: names in :data:`METHODS`, or ``(label, fn)`` pairs with ``fn(logits, ids, τ)``.
    Repetitions run round-robin over the methods, so a change in machine load hits all alike.
    """
    x, ids = make_logits(n, v, dtype, device)
    ref = reference64(x, ids, tau) if errors else None
    nbytes = x.numel() * x.element_size()
    shape = f"{n}x{v} {str(dtype).split('.')[-1]}"
    rows: list[Row] = []
    calls: dict[str, Callable[[], object]] = {}
    for m in methods:
        name, fn = (m, METHODS[m]) if isinstance(m, str) else m
        call = (lambda fn=fn: fn(x, ids, tau))
        try:
            got = call()  # also the warm-up (compilation for compiled methods)
        except Exception as exc:  # a baseline that cannot run here (e.g. no compiler) is reported, not fatal
            rows.append(Row(section, name, shape, 0, float("nan"), note=f"failed: {type(exc).__name__}: {exc}"[:160]))
            continue
        err = max_rel_error(got, ref) if ref is not None else None
        n_out = len(got)
        del got
        if device == "cuda":
            peak = cuda_peak_bytes(call)
        else:
            peak = None if "compiled" in name else live_peak_bytes(call)
        rss_b = rss_peak_bytes(name, n, v, dtype, tau) if (rss and device == "cpu" and name in METHODS) else None
        rows.append(Row(section, name, shape, n_out, float("nan"), peak_mb=None if peak is None else peak / 2**20,
                        rss_mb=None if rss_b is None else rss_b / 2**20, rel_err=err))
        calls[name] = call
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(time_ms(call, device, 1, warmup=0))
    for r in rows:
        if r.method in times:
            r.ms = statistics.median(times[r.method])
            r.gbs = nbytes / (r.ms * 1e-3) / 1e9
            r.frac_copy = r.gbs / copy_gbs
    base = next((r.ms for r in rows if r.method == baseline and not math.isnan(r.ms)), None)
    for r in rows:
        if base and not math.isnan(r.ms):
            r.vs_baseline = base / r.ms
    bases = {r.method: r.ms for r in rows if r.method in BASELINES and not math.isnan(r.ms)}
    for r in rows:
        if not math.isnan(r.ms):
            r.extra["ratios"] = {b: ms / r.ms for b, ms in bases.items() if b != r.method}
    return rows


def _load_child(cache: str, n: int, v: int) -> dict:
    """Run in a fresh process. ``n == 0``: time the import of the kernel module and the load of its
    artefact (ms). Otherwise: time the first ``logit_stats`` call on [n, v] fp32 logits with the
    artefact in the cache (which loads it) and the second call (ms)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if n == 0:
        t0 = time.perf_counter()
        from entropy_lens.kernels import cpu_aot

        t1 = time.perf_counter()
        op = cpu_aot.load(cache)
        t2 = time.perf_counter()
        return {"loaded": op is not None, "import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3}
    x, ids = make_logits(n, v, torch.float32, "cpu")
    with _env(ENTROPY_LENS_CACHE=cache, ENTROPY_LENS_CPU_KERNEL="1"):
        t0 = time.perf_counter()
        logit_stats(x, ids)
        t1 = time.perf_counter()
        logit_stats(x, ids)
        t2 = time.perf_counter()
    from entropy_lens.kernels import cpu_aot

    return {"used": cpu_aot.load(cache) is not None, "first_call_ms": (t1 - t0) * 1e3, "second_call_ms": (t2 - t1) * 1e3}


def bench_cpu_kernel(cache: str, build_seconds: float | None, build_note: str, n: int, v: int) -> list[Row]:
    """Build time of the CPU kernel and, in a fresh process, its load time and first-call stall."""
    rows = [Row("cpu-kernel", "build (entropy-lens kernels build)", "–", 0,
                float("nan") if build_seconds is None else build_seconds * 1e3, note=build_note)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))
    res = {}
    for nn in (0, n):
        cmd = [sys.executable, "-m", "benchmarks.logits_bench", "--load-child", cache, str(nn), str(v)]
        try:
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=env, check=True)
            res.update(json.loads(out.stdout.strip().splitlines()[-1]))
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            return rows + [Row("cpu-kernel", "fresh process", "–", 0, float("nan"), note=f"failed: {exc}"[:160])]
    shape = f"{n}x{v} float32"
    rows += [
        Row("cpu-kernel", "import entropy_lens.kernels.cpu_aot (fresh process)", "–", 0, res["import_ms"]),
        Row("cpu-kernel", "load artefact (manifest check + dlopen, fresh process)", "–", 0, res["load_ms"],
            note="" if res["loaded"] else "not loaded"),
        Row("cpu-kernel", "logit_stats first call, loads the artefact (fresh process)", shape, 4, res["first_call_ms"],
            note="" if res["used"] else "kernel not used"),
        Row("cpu-kernel", "logit_stats second call (same process)", shape, 4, res["second_call_ms"],
            note=f"first − second: {res['first_call_ms'] - res['second_call_ms']:+.1f} ms"),
    ]
    return rows


def prepare_cpu_kernel(cache: str | None = None) -> tuple[str, float | None, str]:
    """Build the CPU kernel into ``cache`` (default: a fresh temporary folder, so the build is timed
    and the user's cache is untouched); returns (cache, build seconds or None, note)."""
    from entropy_lens.kernels import cpu_aot

    cache = cache or tempfile.mkdtemp(prefix="el-kernel-bench-")
    try:
        built = cpu_aot.build(cache)
    except cpu_aot.KernelBuildError as exc:
        return cache, None, f"failed: {exc}"[:160]
    secs = built.seconds or float(built.manifest.get("build_seconds", "nan"))
    return cache, secs, f"{built.manifest['compiler'].split()[0].rsplit('/', 1)[-1]}, ISA {built.manifest['isa']}"


def bench_kernel_tune(n: int, v: int, dtype: torch.dtype, copy_gbs: float, reps: int, quick: bool) -> list[Row]:
    """Triton kernel over (block_v, block_r, num_warps) on CUDA; the default config first."""
    from entropy_lens.kernels import triton_logits as tk

    x, ids = make_logits(n, v, dtype, "cuda")
    nbytes = x.numel() * x.element_size()
    configs = [dict(block_v=tk.DEFAULT_BLOCK_V, block_r=tk.DEFAULT_BLOCK_R, num_warps=tk.DEFAULT_NUM_WARPS, exp2=tk.DEFAULT_EXP2)]
    grid = [(bv, 1, w) for bv in (1024, 2048, 4096, 8192, 16384) for w in (4, 8, 16)] + [(2048, 2, 8), (1024, 4, 8), (2048, 4, 16)]
    if quick:
        grid = [(4096, 1, 4), (4096, 1, 8), (2048, 1, 4), (16384, 1, 8)]
    configs += [dict(block_v=bv, block_r=br, num_warps=w, exp2=e2) for e2 in (False, True) for bv, br, w in grid]
    ref = reference64(x[:64], ids[:64], 1.0)
    rows = []
    for cfg in configs:
        try:
            ms = time_ms(lambda: triton_kernel(x, ids, 1.0, **cfg), "cuda", reps, warmup=2)
            err = max_rel_error(triton_kernel(x[:64], ids[:64], 1.0, **cfg), ref)
        except Exception as exc:
            rows.append(Row("kernel-tune", "triton_kernel", f"{n}x{v}", 4, float("nan"), note=f"{cfg} failed: {exc}"[:160]))
            continue
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(Row("kernel-tune", "triton_kernel", f"{n}x{v}", 4, ms, gbs, gbs / copy_gbs, rel_err=err, note=json.dumps(cfg)))
    return rows


def bench_fused(device: str, n: int, d: int, v: int, dtype: torch.dtype, reps: int, quick: bool) -> list[Row]:
    """Hidden [n, d] × head [v, d]: GEMM alone vs GEMM + statistics vs the fused no-logits variant.
    ``vs_baseline`` = GEMM-alone ms / ms; memory is the peak above the inputs."""
    from entropy_lens.kernels.fused import fused_logit_stats, fused_logit_stats_torch

    g = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(n, d, generator=g, device=device).to(dtype)
    w = (torch.randn(v, d, generator=g, device=device) * (2.0 / math.sqrt(d))).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g, device=device)
    hd, wd = h.double(), w.double()
    ref = reference64(torch.cat([hd[i : i + 512] @ wd.T for i in range(0, n, 512)]), ids, 1.0) if n * v <= 2**31 else None
    del hd, wd

    def gemm():
        return h @ w.T

    methods: dict[str, Callable[[], object]] = {
        "gemm_only": gemm,
        "gemm+naive_fp32": lambda: naive_fp32(gemm(), ids),
        "gemm+chunked_logit_stats": lambda: chunked(gemm(), ids),
        "fused_torch_chunked": lambda: _as_dict(fused_logit_stats_torch(h, w, ids)),
    }
    if device == "cuda":
        methods["gemm+triton_kernel"] = lambda: triton_kernel(gemm(), ids)
        methods["fused_triton"] = lambda: _as_dict(fused_logit_stats(h, w, ids))
        if not quick:
            from entropy_lens.kernels.fused import fused_logit_stats_triton

            for cfg in ({"block_n": 128, "block_v": 256, "block_d": 64, "num_warps": 8, "num_stages": 3},
                        {"block_n": 64, "block_v": 128, "block_d": 64, "num_warps": 4, "num_stages": 4},
                        {"block_n": 128, "block_v": 128, "block_d": 64, "num_warps": 4, "num_stages": 4},
                        {"block_n": 128, "block_v": 64, "block_d": 128, "num_warps": 4, "num_stages": 3}):
                methods["fused_triton " + json.dumps(cfg)] = (lambda c=cfg: _as_dict(fused_logit_stats_triton(h, w, ids, check=False, **c)))
    rows = []
    for name, call in methods.items():
        try:
            got = call()
        except Exception as exc:
            rows.append(Row("fused", name, f"{n}x{d}x{v}", 0, float("nan"), note=f"failed: {type(exc).__name__}: {exc}"[:160]))
            continue
        err = max_rel_error(got, ref) if (ref is not None and isinstance(got, dict)) else None
        del got
        ms = time_ms(call, device, reps, warmup=1)
        peak = cuda_peak_bytes(call) if device == "cuda" else live_peak_bytes(call)
        rows.append(Row("fused", name, f"{n}x{d}x{v} {str(dtype).split('.')[-1]}", 0 if name == "gemm_only" else (2 if "naive" in name else 4),
                        ms, peak_mb=peak / 2**20, rel_err=err))
    base = next((r.ms for r in rows if r.method == "gemm_only" and not math.isnan(r.ms)), None)
    for r in rows:
        if base and not math.isnan(r.ms):
            r.vs_baseline = base / r.ms
    return rows


QWEN2_1P5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, tie_word_embeddings=True)


def bench_model(device: str, batch: int, seq: int, reps: int, config: dict | None = None) -> list[Row]:
    """Instrumentation overhead over a bare forward (logits for every position) of a Qwen2-shaped
    model with random weights (bf16 on CUDA, fp32 on the CPU); ``vs_baseline`` = ms / bare ms."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**(config or QWEN2_1P5B), attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(2)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device=device)
    ids = torch.randint(0, cfg.vocab_size, (batch * seq,), generator=g, device=device)
    from entropy_lens.kernels import fused_logit_stats
    from entropy_lens.model.forward import decoder_hidden

    attn = torch.ones_like(input_ids)
    head = model.get_output_embeddings().weight

    @torch.no_grad()
    def bare():
        return model(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def with_stats(stats):
        z = model(input_ids=input_ids, use_cache=False).logits
        return stats(z.view(-1, z.shape[-1]), ids)

    @torch.no_grad()
    def decoder_fused():
        hid = decoder_hidden(model, input_ids, attn)
        return fused_logit_stats(hid.reshape(-1, hid.shape[-1]), head, ids)

    methods: dict[str, Callable[[], object]] = {
        "bare_forward": bare,
        "forward+naive_fp32": lambda: with_stats(naive_fp32),
        "forward+chunked_logit_stats": lambda: with_stats(chunked),
        "decoder+fused_logit_stats": decoder_fused,
    }
    if device == "cuda":
        methods["forward+triton_kernel"] = lambda: with_stats(triton_kernel)
        methods["forward+logit_stats_auto"] = lambda: with_stats(auto)
    rows = []
    shape = f"{batch}x{seq} L{cfg.num_hidden_layers} D{cfg.hidden_size} V{cfg.vocab_size}"
    for name, call in methods.items():
        try:
            ms = time_ms(call, device, reps, warmup=2)
            peak = cuda_peak_bytes(call) / 2**20 if device == "cuda" else None
        except Exception as exc:
            rows.append(Row("model", name, shape, 0, float("nan"), note=f"failed: {type(exc).__name__}: {exc}"[:160]))
            continue
        rows.append(Row("model", name, shape, 0 if name == "bare_forward" else (2 if "naive" in name else 4), ms, peak_mb=peak))
    base = next((r.ms for r in rows if r.method == "bare_forward" and not math.isnan(r.ms)), None)
    for r in rows:
        if base and not math.isnan(r.ms):
            r.vs_baseline = r.ms / base
            r.note = r.note or f"overhead {100 * (r.ms / base - 1):+.1f}%"
    return rows


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def markdown_table(rows: list[Row]) -> str:
    """One markdown table of ``rows`` (ratio column: speed-up vs the section's baseline, or ms / bare
    forward in the ``model`` section)."""
    head = "| section | method | shape | outputs | ms | GB/s | ×copy BW | peak MB (live tensors / CUDA) | peak RSS MB | max rel err | ratio | note |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append("| " + " | ".join([
            r.section, r.method, r.shape, str(r.outputs), _fmt(r.ms, ".3f" if r.ms < 10 else ".1f"), _fmt(r.gbs, ".1f"),
            _fmt(r.frac_copy, ".3f"), _fmt(r.peak_mb, ".1f"), _fmt(r.rss_mb, ".1f"), _fmt(r.rel_err, ".1e"),
            _fmt(r.vs_baseline, ".2f"), r.note.replace("|", "/"),
        ]) + " |")
    return "\n".join(lines)


def json_row(r: Row) -> dict:
    """One row for the JSON file: the :class:`Row` fields plus ``pct_copy_bw`` (100 × frac_copy);
    NaN becomes null."""
    d = asdict(r)
    d["pct_copy_bw"] = None if r.frac_copy is None else 100 * r.frac_copy
    return {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in d.items()}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(device: str, quick: bool, smoke: bool = False) -> dict:
    """Run every section for ``device``; returns {"meta": ..., "rows": [Row...]} (no printing)."""
    cuda = device == "cuda"
    rows: list[Row] = []
    if smoke:  # tiny sizes: exercises every code path in seconds (tests)
        n, v, dt, reps = 64, 1000, torch.float32, 1
    elif cuda:
        n, v, dt, reps = 8192, 151_936, torch.bfloat16, (5 if quick else 20)
    else:
        n, v, dt, reps = (1024 if quick else 4096), 49_152, torch.float32, (1 if quick else 3)
    copy_bytes = n * v * torch.tensor([], dtype=dt).element_size()
    copy_gbs = copy_bandwidth_gbs(device, copy_bytes if cuda else min(copy_bytes, 512 * 2**20), reps=max(reps, 3))
    rows.append(Row("copy", "copy_", f"{copy_bytes / 1e9:.2f} GB", 0, 2 * copy_bytes / (copy_gbs * 1e9) * 1e3, copy_gbs, 1.0,
                    note="read + write bytes"))

    kernel_rows: list[Row] = []
    temp_cache = None
    if not cuda and not smoke:  # (smoke: no C++ build; the kernel rows run only on a given artefact)
        kcache, build_s, build_note = prepare_cpu_kernel(os.environ.get(KERNEL_CACHE_ENV))
        if KERNEL_CACHE_ENV not in os.environ:
            temp_cache = kcache  # removed at the end of the run
        os.environ[KERNEL_CACHE_ENV] = kcache
        kernel_rows = bench_cpu_kernel(kcache, build_s, build_note, n, v)
    skip_cpu_kernel = cuda or (smoke and KERNEL_CACHE_ENV not in os.environ)
    methods = [m for m in METHODS if (cuda or m not in CUDA_ONLY) and not (skip_cpu_kernel and m in CPU_ONLY)]
    if cuda:
        methods = [m for m in methods if not m.startswith(("proposed", "previous"))]
    if quick and not smoke:
        methods = [m for m in methods if m != "proposed_compiled"]
    if not cuda and not smoke:
        # the chunked path at other block sizes (default: ~4 MiB blocks = 21 rows at V = 49,152)
        methods += [(f"chunked_logit_stats chunk_rows={cr}", lambda x, i, t, cr=cr: chunked(x, i, t, chunk_rows=cr)) for cr in (5, 10, 48, 170)]
    rows += bench_logits(device, n, v, dt, methods, copy_gbs, reps, rss=(not cuda and not smoke))
    if not cuda and not smoke:
        rows += bench_logits(device, n, v, dt, ["naive_fp32", "previous_chunked", "chunked_logit_stats", "proposed_compiled",
                                                "cpu_aot_kernel", "logit_stats+cpu_aot"],
                             copy_gbs, reps, tau=0.7, section="logits τ=0.7")
        rows += kernel_rows
    if cuda:
        rows += bench_kernel_tune(n, v, dt, copy_gbs, reps, quick)
        if not quick:
            for nn in (1024, 2048, 4096, 16384):
                rows += bench_logits(device, nn, v, dt, ["naive_fp32", "verl_style_compiled", "chunked_logit_stats", "triton_kernel"],
                                     copy_gbs, reps, section="sweep N", errors=False)
            for vv in (32_000, 50_304, 128_256, 256_000):
                rows += bench_logits(device, n, vv, dt, ["naive_fp32", "verl_style_compiled", "chunked_logit_stats", "triton_kernel"],
                                     copy_gbs, reps, section="sweep V", errors=False)
    # fused: GPU 8192 × 1536 × 151,936 bf16; CPU a SmolLM2-135M-shaped head (D 576, V 49,152)
    if smoke:
        rows += bench_fused(device, 48, 32, 300, torch.float32, 1, quick=True)
    elif cuda:
        rows += bench_fused(device, 8192, 1536, 151_936, torch.bfloat16, reps, quick)
    else:
        rows += bench_fused(device, 256 if quick else 1024, 576, 49_152, torch.float32, reps, quick=True)
    if cuda:
        rows += bench_model(device, 8, 1024, reps)
    elif smoke:
        rows += bench_model(device, 2, 16, 1, dict(QWEN2_1P5B, vocab_size=300, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    if temp_cache is not None:
        os.environ.pop(KERNEL_CACHE_ENV, None)
        shutil.rmtree(temp_cache, ignore_errors=True)
    meta = {
        "device": device_name(device), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.logits_bench " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TRITON_INTERPRET") if k in os.environ},
    }
    return {"meta": meta, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logits_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="smaller CPU case, fewer repetitions, no sweeps")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every code path (seconds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write all rows as JSON here")
    p.add_argument("--markdown", default=None, help="also write the markdown tables here")
    p.add_argument("--rss-child", nargs=5, metavar=("METHOD", "N", "V", "DTYPE", "TAU"), help=argparse.SUPPRESS)
    p.add_argument("--load-child", nargs=3, metavar=("CACHE", "N", "V"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.load_child:
        cache, n, v = a.load_child
        print(json.dumps(_load_child(cache, int(n), int(v))))
        return 0
    if a.rss_child:
        m, n, v, dt, tau = a.rss_child
        print(json.dumps(_rss_child(m, int(n), int(v), dt, float(tau))))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    res = run(device, a.quick, a.smoke)
    meta = res["meta"]
    text = [f"device: {meta['device']}", f"date: {meta['date']}", f"command: {meta['command']}",
            f"torch {meta['torch']}, threads {meta['threads']}, load average {meta['load_avg']}, env {meta['env']}", "",
            markdown_table(res["rows"])]
    out = "\n".join(text)
    print(out)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(out + "\n")
    json_path = a.json
    if json_path is None and not a.smoke:
        json_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"{device}{'-quick' if a.quick else ''}.json")
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": [json_row(r) for r in res["rows"]]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
