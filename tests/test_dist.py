"""`analyze` on several processes (torch.distributed, gloo on the CPU): real 2-rank torchrun jobs
on a tiny model compared with one process; a failing or hung rank; resume with another world size.
The pure helpers of entropy_lens.dist are tested without a process group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, write_rollouts
from typer.testing import CliRunner

from entropy_lens import dist
from entropy_lens_cli.app import app

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_shard_indices_round_robin_and_idle_ranks():
    assert dist.shard_indices(7, 0, 3) == [0, 3, 6]
    assert dist.shard_indices(7, 2, 3) == [2, 5]
    assert dist.shard_indices(2, 3, 4) == []  # more ranks than shards: idle
    assert sorted(k for r in range(3) for k in dist.shard_indices(10, r, 3)) == list(range(10))
    with pytest.raises(ValueError, match="rank 3 of world size 3"):
        dist.shard_indices(5, 3, 3)


def test_env_ranks_and_timeout(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", dist.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    assert dist.env_ranks() == (0, 1, 0)
    assert dist.init_from_env() == dist.SINGLE
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"):
        dist.env_ranks()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        dist.env_ranks()
    monkeypatch.setenv(dist.TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="expected seconds > 0"):
        dist.timeout_from_env()
    monkeypatch.setenv(dist.TIMEOUT_ENV, "12.5")
    assert dist.timeout_from_env() == 12.5


def test_single_process_agreement_reraises_the_error_itself():
    with pytest.raises(KeyError), dist.agreed(dist.SINGLE):
        raise KeyError("k")
    with dist.agreed(dist.SINGLE):
        pass


def test_sum_counts_of_one_process_is_its_own_counts_sorted():
    assert dist.sum_counts(dist.SINGLE, {"triton": 2, "torch": 5}) == {"torch": 5, "triton": 2}
    assert list(dist.sum_counts(dist.SINGLE, {"triton": 2, "torch": 5})) == ["torch", "triton"]


def test_rank_failed_names_every_failed_rank():
    e = dist.RankFailed([(1, "a.parquet: corrupt", 2), (3, "internal error: boom", 1)], 4, rank=0)
    assert str(e) == "rank 1 of 4 failed: a.parquet: corrupt; rank 3 of 4 failed: internal error: boom"
    assert e.exit_code == 2 and e.agreed


def test_session_leaves_the_group_together_unless_a_rank_was_lost(monkeypatch):
    """The closing barrier runs after a block that ended or failed alike on every rank, never after
    a lost rank (it could only time out); a barrier that fails is ignored; the group is always left."""
    import torch.distributed as tdist

    calls: list[str] = []
    two = dist.Ranks(rank=0, world_size=2, timeout_s=7.0)
    monkeypatch.setattr(dist, "init_from_env", lambda *a, **k: two)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: calls.append("destroy"))

    def barrier(group=None, timeout=None, wait_all_ranks=False):
        calls.append(f"barrier {timeout.total_seconds():g}")

    monkeypatch.setattr(tdist, "monitored_barrier", barrier)
    with dist.session():
        pass
    assert calls == ["barrier 7", "destroy"]
    calls.clear()
    with pytest.raises(dist.RankFailed), dist.session():
        raise dist.RankFailed([(1, "bad", 2)], 2, rank=0)
    assert calls == ["barrier 7", "destroy"]
    calls.clear()
    with pytest.raises(dist.RankFailed), dist.session():
        raise dist.RankFailed([(None, "lost", 2)], 2, rank=0, agreed=False)
    assert calls == ["destroy"]
    calls.clear()
    with pytest.raises(KeyError), dist.session():
        raise KeyError("k")
    assert calls == ["destroy"]

    def gone(**_):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(tdist, "monitored_barrier", gone)
    calls.clear()
    with dist.session():
        pass
    assert calls == ["destroy"]


# ---------------------------------------------------------------------------------------------
# Real 2-rank runs
# ---------------------------------------------------------------------------------------------


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _args(model_dir: Path, rollouts: Path, out: Path) -> list[str]:
    return ["analyze", "--model", str(model_dir), "--rollouts", str(rollouts), "--shard-size", "5",
            "--no-figures", "-o", str(out)]


def _torchrun(args: list[str], script: list[str] | None = None, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    target = script or ["--no-python", str(Path(sys.executable).parent / "entropy-lens")]
    return subprocess.run([*TORCHRUN, *target, *args], check=False, capture_output=True, text=True,
                          timeout=timeout,
                          env=_env(**env), cwd=HERE.parent)


def _why(res: subprocess.CompletedProcess) -> str:
    """A failed launch's stderr for the assertion message: its start (where a rank's own error
    is) and its end (torchrun's summary), whatever the length."""
    err = res.stderr
    return err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"


def _single(args: list[str]):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every torchrun rank (OMP_NUM_THREADS=1): the same reductions
    try:
        return CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir):
    """One process's analyze run of 12 sequences in 3 shards: (model dir, rollouts, run folder)."""
    d = tmp_path_factory.mktemp("dist")
    roll = write_rollouts(d / "r.jsonl", arithmetic_rows())
    res = _single(_args(tiny_model_dir, roll, d / "one"))
    assert res.exit_code == 0, res.output
    return tiny_model_dir, roll, d / "one"


def assert_same_run(a: Path, b: Path, world_size: int) -> None:
    """tokens.parquet column by column and summary.json key by key (floats within 1e-6)."""
    ta, tb = pd.read_parquet(a / "tokens.parquet"), pd.read_parquet(b / "tokens.parquet")
    assert list(ta.columns) == list(tb.columns)
    for c in ta.columns:
        pd.testing.assert_series_equal(ta[c], tb[c], check_exact=ta[c].dtype.kind not in "f", rtol=1e-6, atol=1e-7)
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sb["world_size"] == world_size and sa["world_size"] == 1
    for k in set(sa) | set(sb):
        if k not in ("world_size", "wall_seconds", "statistics_path"):  # the last: rows computed by this run only
            assert _close(sa[k], sb[k]), k


def _close(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return y == pytest.approx(x, rel=1e-6, abs=1e-9)
    return x == y


def test_two_ranks_write_the_run_of_one_process(single_run, tmp_path):
    model_dir, roll, one = single_run
    res = _torchrun(_args(model_dir, roll, tmp_path / "two"))
    assert res.returncode == 0, _why(res)
    assert_same_run(one, tmp_path / "two", world_size=2)
    stats = [json.loads((d / "summary.json").read_text())["statistics_path"] for d in (one, tmp_path / "two")]
    assert stats[0] == stats[1] == {"torch": len(pd.read_parquet(one / "tokens.parquet"))}  # summed over the ranks
    assert sorted(p.name for p in (tmp_path / "two" / "shards").glob("shard_*")) == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert res.stdout.count("wrote ") == 1  # only rank 0 prints
    cfg = (tmp_path / "two" / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "device: cpu" in cfg


def test_failing_rank_fails_the_run_then_one_process_resumes(single_run, tmp_path):
    model_dir, roll, one = single_run
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    shutil.copy(one / "shards" / "manifest.json", out / "shards")
    shutil.copy(one / "shards" / "shard_00000.parquet", out / "shards")
    (out / "shards" / "shard_00001.parquet").write_text("not parquet")  # rank 1's shard
    res = _torchrun(_args(model_dir, roll, out))
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rank 1 of 2 failed" in errors[0] and "shard_00001.parquet" in errors[0], _why(res)
    assert not (out / "tokens.parquet").exists() and not (out / "summary.json").exists()
    kept = {k: (out / "shards" / f"shard_0000{k}.parquet").stat().st_mtime_ns for k in (0, 2)}  # 2: rank 0's
    (out / "shards" / "shard_00001.parquet").unlink()
    res = _single(_args(model_dir, roll, out))
    assert res.exit_code == 0, res.output
    assert {k: (out / "shards" / f"shard_0000{k}.parquet").stat().st_mtime_ns for k in (0, 2)} == kept
    assert_same_run(one, out, world_size=1)


def test_one_process_run_resumes_on_two_ranks(single_run, tmp_path):
    model_dir, roll, one = single_run
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    for name in ("manifest.json", "shard_00000.parquet", "shard_00001.parquet"):
        shutil.copy(one / "shards" / name, out / "shards")
    kept = {k: (out / "shards" / f"shard_0000{k}.parquet").stat().st_mtime_ns for k in (0, 1)}
    res = _torchrun(_args(model_dir, roll, out))
    assert res.returncode == 0, _why(res)
    assert {k: (out / "shards" / f"shard_0000{k}.parquet").stat().st_mtime_ns for k in (0, 1)} == kept
    assert_same_run(one, out, world_size=2)


def test_hung_rank_stops_the_others_at_the_timeout(single_run, tmp_path):
    """A rank that never arrives at the agreement: rank 0 stops at the timeout, names it, exits
    non-zero and merges nothing (torchrun then stops the hung rank)."""
    model_dir, roll, _ = single_run
    out = tmp_path / "run"
    res = _torchrun(_args(model_dir, roll, out), script=[str(HERE / "dist_hook.py")], timeout=90,
                    DIST_HOOK_RANK="1", DIST_HOOK_MODE="hang", ENTROPY_LENS_DIST_TIMEOUT="10")
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, _why(res)
    assert "did not all reach the agreement within 10 s" in errors[0] and "Ranks 1 failed" in errors[0]
    assert not (out / "tokens.parquet").exists() and not (out / "summary.json").exists()


def test_a_rank_bug_is_described_as_the_boundary_words_it():
    from entropy_lens_cli.common import describe_failure

    line, code = describe_failure(RuntimeError("boom"))
    assert code == 1 and line.startswith("internal error") and "RuntimeError: boom" in line
    assert describe_failure(ValueError("x.parquet: bad")) == ("x.parquet: bad", 2)
