"""The ahead-of-time built CPU kernel (entropy_lens.kernels.cpu_aot) against the float64 reference.

The artefact is built once for this module into a temporary cache (about 20–60 s of C++ compile on a
2-core machine); every test that needs it shares that build. Without a working C++ compiler (checked
by compiling a probe program) those tests are skipped with that reason.
"""

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from entropy_lens.kernels import cpu_aot
from entropy_lens.logits import logit_stats, logit_stats_reference, recording_paths

OUTPUTS = ("logp", "entropy", "sum_p2", "sum_p2_logp")
TOL = 2e-5  # the eager path's tolerance against float64 (tests/test_logits.py)

_COMPILER = cpu_aot.compiler()
needs_compiler = pytest.mark.skipif(_COMPILER is None, reason="no working C++ compiler (c++/g++/clang++ or $CXX)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build per module into a temporary cache; yields (cache folder, BuildInfo)."""
    if _COMPILER is None:
        pytest.skip("no working C++ compiler (c++/g++/clang++ or $CXX)")
    cache = tmp_path_factory.mktemp("cache")
    return cache, cpu_aot.build(cache)


@pytest.fixture
def use_cache(built, monkeypatch):
    """The built cache as the library's cache folder, the kernel switched on."""
    cache, _ = built
    monkeypatch.setenv("ENTROPY_LENS_CACHE", str(cache))
    monkeypatch.delenv("ENTROPY_LENS_CPU_KERNEL", raising=False)
    return cache


def _kernel(logits, ids, tau, cache):
    out = cpu_aot.logit_stats_kernel(logits, ids, tau, cache)
    assert out is not None, "kernel not used"
    return dict(zip(OUTPUTS, out))


def _close(got: dict, ref, tol=TOL):
    for name in OUTPUTS:
        x, y = got[name].double(), getattr(ref, name).double()
        assert torch.allclose(x, y, atol=tol, rtol=tol), (name, float((x - y).abs().max()))


def test_compiler_probe_is_real():
    """The skip condition compiles a program; it is None exactly when nothing compiles."""
    if _COMPILER is None:
        assert cpu_aot.compiler() is None
    else:
        assert subprocess.run([_COMPILER, "--version"], capture_output=True, check=False).returncode == 0


@needs_compiler
def test_build_writes_keyed_artefact_and_manifest(built):
    cache, info = built
    assert info.library.is_file() and info.library.parent == cpu_aot.artefact_dir(cache)
    folder = info.library.parent.name
    assert torch.__version__.replace("+", "_") in folder and torch.backends.cpu.get_cpu_capability() in folder
    manifest = json.loads((info.library.parent / "manifest.json").read_text())
    assert manifest["torch"] == torch.__version__ and manifest["dtypes"] == ["float32"]
    assert manifest["library"] == info.library.name and manifest["build_seconds"] > 0
    again = cpu_aot.build(cache)  # valid artefact: no second compile
    assert again.seconds == 0.0 and again.library == info.library
    assert cpu_aot.load(cache) is not None


@needs_compiler
@pytest.mark.parametrize("v", [1, 2, 7, 8, 9, 255, 256, 257, 1000, 4099])
@pytest.mark.parametrize("tau", [1.0, 0.7, 1.3])
def test_equals_float64_any_vocab_and_temperature(built, v, tau):
    cache, _ = built
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(13, v, generator=g) * 4
    ids = torch.randint(0, v, (13,), generator=g)
    _close(_kernel(logits, ids, tau, cache), logit_stats_reference(logits, ids, tau))


@needs_compiler
def test_rows_of_different_lengths_by_neg_inf_padding(built):
    """Each row has its own number of live logits (the rest −inf): equal to float64 on the live part."""
    cache, _ = built
    g = torch.Generator().manual_seed(1)
    v = 1500
    lengths = [1, 2, 9, 255, 256, 257, 700, 1499, 1500]
    logits = torch.randn(len(lengths), v, generator=g) * 3
    ids = torch.zeros(len(lengths), dtype=torch.long)
    for i, n_live in enumerate(lengths):
        logits[i, n_live:] = float("-inf")
        ids[i] = int(torch.randint(0, n_live, (1,), generator=g))
    for tau in (1.0, 0.7):
        got = _kernel(logits, ids, tau, cache)
        for i, n_live in enumerate(lengths):
            ref = logit_stats_reference(logits[i : i + 1, :n_live], ids[i : i + 1], tau)
            _close({k: got[k][i : i + 1] for k in OUTPUTS}, ref)


@needs_compiler
def test_neg_inf_blocks_one_hot_uniform_and_strided_rows(built):
    cache, _ = built
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 2, 3000, generator=g) * 2
    logits = base[:, 1, :]  # row stride 6000, unit column stride
    logits[0, :2048] = float("-inf")  # whole blocks masked, live logits only in the tail
    logits[1, 512:] = float("-inf")
    logits[2] *= 30  # near one-hot
    logits[3] = 0.5  # uniform
    logits[4, ::3] = float("-inf")  # scattered mask
    ids = torch.randint(2048, 3000, (8,), generator=g)
    ids[1] = 7
    ids[4] = 1
    assert logits.stride() == (6000, 1)
    for tau in (1.0, 0.7, 1.3):
        _close(_kernel(logits, ids, tau, cache), logit_stats_reference(logits, ids, tau))


@needs_compiler
def test_logit_stats_dispatches_to_kernel_and_matches(use_cache):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(33, 5000, generator=g) * 3
    ids = torch.randint(0, 5000, (33,), generator=g)
    for tau in (1.0, 0.7):
        with recording_paths() as paths:
            got = logit_stats(logits, ids, tau)
        assert paths == {"cpu-kernel": 33}  # the run's record says the kernel ran
        kern = cpu_aot.logit_stats_kernel(logits, ids, tau, use_cache)
        for i, k in enumerate(OUTPUTS):
            assert torch.equal(getattr(got, k), kern[i]), k  # the dispatch returned the kernel's values
        _close({k: getattr(got, k) for k in OUTPUTS}, logit_stats_reference(logits, ids, tau))


@needs_compiler
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_raise_the_eager_error(use_cache, bad):
    logits = torch.randn(9, 400)
    logits[6, 300] = bad
    with pytest.raises(ValueError, match="row 6"):
        logit_stats(logits, torch.zeros(9, dtype=torch.long))
    assert bool(torch.isnan(cpu_aot.logit_stats_kernel(logits, torch.zeros(9, dtype=torch.long), 1.0, use_cache)[:, 6]).all())


@needs_compiler
def test_all_neg_inf_row_raises_the_eager_error(use_cache):
    logits = torch.randn(4, 300)
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match="every logit of row 2 is -inf"):
        logit_stats(logits, torch.zeros(4, dtype=torch.long))


@needs_compiler
def test_inputs_the_kernel_does_not_take_use_the_eager_path(use_cache):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 700, generator=g) * 2
    ids = torch.randint(0, 700, (6,), generator=g)
    assert cpu_aot.logit_stats_kernel(x.bfloat16(), ids, 1.0, use_cache) is None  # dtype
    assert cpu_aot.logit_stats_kernel(x.t().contiguous().t(), ids, 1.0, use_cache) is None  # column stride
    assert cpu_aot.logit_stats_kernel(x.clone().requires_grad_(), ids, 1.0, use_cache) is None  # autograd
    for inp in (x.bfloat16(), x.t().contiguous().t()):
        with recording_paths() as paths:
            got = logit_stats(inp, ids)
        assert paths == {"torch": 6}
        _close({k: getattr(got, k) for k in OUTPUTS}, logit_stats_reference(inp, ids))


@needs_compiler
def test_switch_off_by_environment(use_cache, monkeypatch):
    x = torch.randn(5, 600)
    ids = torch.randint(0, 600, (5,))
    monkeypatch.setenv("ENTROPY_LENS_CPU_KERNEL", "0")
    called = []
    monkeypatch.setattr(cpu_aot, "logit_stats_kernel", lambda *a, **k: called.append(1))
    logit_stats(x, ids)
    assert not called


def test_without_artefact_nothing_compiles(tmp_path, monkeypatch):
    """An empty cache: logit_stats runs eagerly and never starts a compiler."""
    monkeypatch.setenv("ENTROPY_LENS_CACHE", str(tmp_path / "empty"))

    def no_subprocess(*a, **k):
        raise AssertionError("a compiler was started")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(cpu_aot, "build", no_subprocess)
    x = torch.randn(7, 900)
    ids = torch.randint(0, 900, (7,))
    assert cpu_aot.info() is None and cpu_aot.load() is None
    _close({k: getattr(logit_stats(x, ids), k) for k in OUTPUTS}, logit_stats_reference(x, ids))


@needs_compiler
def test_stale_manifest_is_not_loaded(built, tmp_path):
    """An artefact recorded for another torch version is ignored (the eager path runs instead)."""
    _, info = built
    cache = tmp_path / "stale"
    folder = cpu_aot.artefact_dir(cache)
    folder.mkdir(parents=True)
    (folder / info.library.name).write_bytes(info.library.read_bytes())
    (folder / "manifest.json").write_text(json.dumps(dict(info.manifest, torch="0.0.0")))
    assert cpu_aot.info(cache) is None and cpu_aot.load(cache) is None
    (folder / "manifest.json").write_text(json.dumps(info.manifest))
    assert cpu_aot.info(cache) is not None


def test_cli_build_without_compiler_is_one_line_exit_2(tmp_path, monkeypatch):
    from entropy_lens_cli.app import app

    monkeypatch.setenv("ENTROPY_LENS_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    res = CliRunner().invoke(app, ["kernels", "build"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no working C++ compiler" in lines[0]


@needs_compiler
def test_cli_status_and_build_on_built_cache(use_cache):
    from entropy_lens_cli.app import app

    res = CliRunner().invoke(app, ["kernels", "status"])
    assert res.exit_code == 0 and "ISA" in res.output and "float32" in res.output
    res = CliRunner().invoke(app, ["kernels", "build"])
    assert res.exit_code == 0 and "already built" in res.output and "loads in" in res.output


@needs_compiler
def test_block_sums_stay_accurate_on_wide_rows(built):
    """49,152-wide rows: every output within 1e-6 of float64 relative to its largest value (sequential
    fp32 accumulation along the row measured ~1e-5 here; the eager path 2.3e-7)."""
    cache, _ = built
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 49_152, generator=g) * 2
    ids = torch.randint(0, 49_152, (6,), generator=g)
    for tau in (1.0, 0.7):
        got, ref = _kernel(logits, ids, tau, cache), logit_stats_reference(logits, ids, tau)
        for k in OUTPUTS:
            r = getattr(ref, k)
            assert float((got[k].double() - r).abs().max() / r.abs().max()) < 1e-6, k


def test_cache_root_follows_the_library_rule(tmp_path, monkeypatch):
    from entropy_lens.model.load import cache_dir

    monkeypatch.setenv("ENTROPY_LENS_CACHE", str(tmp_path))
    assert cpu_aot.cache_root() == cache_dir() == tmp_path
    monkeypatch.delenv("ENTROPY_LENS_CACHE")
    assert cpu_aot.cache_root() == cache_dir()
