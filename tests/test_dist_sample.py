"""`sample` on several processes (torch.distributed, gloo on the CPU): a real 2-rank torchrun job on a
tiny model gives the very rollout file of one process; a failing rank fails the run and merges
nothing; the shards resume with another number of processes. The per-batch seeding itself is tested
in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_model, make_tokenizer
from test_dist import _single, _torchrun, _why
from typer.testing import CliRunner

from entropy_lens.model.generate import batch_seed, generate_batches, response_jobs
from entropy_lens.pipelines.sample import parts_dir_for
from entropy_lens_cli.app import app

HERE = Path(__file__).parent
PROBLEMS = [("what is 1 + 2 ?", "3"), ("what is 3 + 4 ?", "7"), ("what is 12 + 3 ?", "15"),
            ("what is 2 + 2 ?", "4"), ("what is 5 + 1 ?", "6")]


def _args(model_dir: Path, data: Path, out: Path) -> list[str]:
    # 5 prompts × 3 = 15 responses, batches of 2 (8 batches), 2 batches per shard: 4 shards
    return ["sample", "--model", str(model_dir), "-d", str(data), "-n", "3", "--max-new-tokens", "6",
            "--temperature", "0.8", "--batch-size", "2", "--shard-batches", "2", "--seed", "7", "--device", "cpu",
            "-o", str(out)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir):
    """One process's sample run: (model dir, dataset, rollout file)."""
    d = tmp_path_factory.mktemp("dist_sample")
    data = d / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    res = _single(_args(tiny_model_dir, data, d / "one.parquet"))
    assert res.exit_code == 0, res.output
    assert not parts_dir_for(d / "one.parquet").exists()  # the shards are removed once merged
    return tiny_model_dir, data, d / "one.parquet"


def assert_same_rollouts(a: Path, b: Path, world_size: int, marked: int | None = None) -> None:
    """Every column of the two rollout files equal, bit for bit; the metadata differs only in the
    world size. ``marked``: the row whose response text a test changed in a kept shard file (so
    the merged file shows that the shard was read back, not sampled again)."""
    ra, rb = pd.read_parquet(a), pd.read_parquet(b)
    if marked is not None:
        assert rb.loc[marked, "response"] == MARK
        rb.loc[marked, "response"] = ra.loc[marked, "response"]
    assert list(ra.columns) == list(rb.columns) and len(ra) == len(rb) == len(PROBLEMS) * 3
    for c in ra.columns:
        assert [_plain(x) for x in ra[c]] == [_plain(x) for x in rb[c]], c
    sa, sb = dict(ra.attrs["sampling"]), dict(rb.attrs["sampling"])
    assert sa.pop("world_size") == 1 and sb.pop("world_size") == world_size
    assert sa == sb


def _plain(x):
    return x.tolist() if hasattr(x, "tolist") else x


def test_two_ranks_write_the_rollouts_of_one_process(single_run, tmp_path):
    model_dir, data, one = single_run
    out = tmp_path / "two.parquet"
    res = _torchrun(_args(model_dir, data, out))
    assert res.returncode == 0, _why(res)
    assert_same_rollouts(one, out, world_size=2)
    assert res.stdout.count("wrote ") == 1 and "on 2 ranks" in res.stdout  # only rank 0 prints
    assert "tokens" in res.stderr  # rank 0's progress bars: responses and tokens (with their rate)
    assert not parts_dir_for(out).exists()
    frame = pd.read_parquet(out)
    assert frame["group"].tolist() == [str(i) for i in range(len(PROBLEMS)) for _ in range(3)]
    assert all(len(lp) == len(ids) > 0 for lp, ids in zip(frame["old_logp"], frame["response_ids"]))


HOOK = """
import os, sys
import entropy_lens.pipelines.sample as sp
from entropy_lens_cli.app import main

if os.environ.get("RANK") == os.environ["DIST_HOOK_RANK"]:
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    sp.sample_shard = broken
sys.argv[0] = "entropy-lens"
main()
"""


MARK = "<kept shard>"


def _mark(shard: Path) -> None:
    """Change the first response text of a finished shard file (see ``assert_same_rollouts``)."""
    part = pd.read_parquet(shard)
    part.loc[0, "response"] = MARK
    part.to_parquet(shard, index=False)


def _shards(parts: Path) -> list[str]:
    return sorted(p.name for p in parts.glob("shard_*"))


def test_failing_rank_fails_the_run_then_one_process_resumes(single_run, tmp_path):
    model_dir, data, one = single_run
    out = tmp_path / "run.parquet"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    res = _torchrun(_args(model_dir, data, out), script=[str(hook)], DIST_HOOK_RANK="1")
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, _why(res)
    assert "rank 1 of 2 failed" in errors[0] and "injected failure" in errors[0]
    assert not out.exists()  # nothing merged
    parts = parts_dir_for(out)
    assert _shards(parts) == ["shard_00000.parquet", "shard_00002.parquet"]  # rank 0's shards wait for a resume
    _mark(parts / "shard_00002.parquet")  # shard 2 = batches 4, 5 = responses 8..11
    res = _single(_args(model_dir, data, out))
    assert res.exit_code == 0, res.output
    assert_same_rollouts(one, out, world_size=1, marked=8)
    assert not parts.exists()


def test_one_process_run_resumes_on_two_ranks(single_run, tmp_path, monkeypatch):
    """One process stops after its first shard; two ranks finish the run without sampling that
    shard again, and the merged file equals the uninterrupted one."""
    import entropy_lens.pipelines.sample as sp

    model_dir, data, one = single_run
    out = tmp_path / "run.parquet"
    real, calls = sp.sample_shard, []

    def stop_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "sample_shard", stop_after_one)
    assert _single(_args(model_dir, data, out)).exit_code == 130
    monkeypatch.setattr(sp, "sample_shard", real)
    parts = parts_dir_for(out)
    assert _shards(parts) == ["shard_00000.parquet"] and not out.exists()
    _mark(parts / "shard_00000.parquet")
    res = _torchrun(_args(model_dir, data, out))
    assert res.returncode == 0, _why(res)
    assert_same_rollouts(one, out, world_size=2, marked=0)
    assert not parts.exists()


def test_resume_refuses_shards_of_other_settings(single_run, tmp_path):
    model_dir, data, _ = single_run
    out = tmp_path / "run.parquet"
    parts = parts_dir_for(out)
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"fingerprint": "0" * 16}))
    res = CliRunner().invoke(app, _args(model_dir, data, out))
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{parts}: holds shards of a different sample run" in errors[0]
    assert not out.exists()


def test_per_batch_streams_do_not_depend_on_the_other_batches():
    """Batch k sampled alone, after other batches or in another order: the same responses; the
    seeds differ between batches and between run seeds."""
    model, tok = make_model(), make_tokenizer()
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in PROBLEMS[:3]]
    jobs = response_jobs(prompts, 2)
    every = generate_batches(model, tok, jobs, [0, 1, 2], 2, 5, 0.9, seed=3)
    alone = generate_batches(model, tok, jobs, [2], 2, 5, 0.9, seed=3)
    backwards = generate_batches(model, tok, jobs, [2, 1, 0], 2, 5, 0.9, seed=3)
    assert alone[2] == every[2] and backwards == every
    assert [o["prompt_index"] for k in range(3) for o in every[k]] == [0, 0, 1, 1, 2, 2]
    assert len({batch_seed(3, k) for k in range(100)} | {batch_seed(4, k) for k in range(100)}) == 200
    assert all(0 <= batch_seed(s, k) < 2**63 for s in (-1, 0, 2**40) for k in (0, 7))
