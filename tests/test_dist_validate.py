"""`validate` on several processes (torch.distributed, gloo on the CPU): the data-parallel update
(gradients summed across ranks) against one process's, a real 2-rank torchrun `validate` against
one process's run, failing ranks before and after the gradient sum; and the --device plumbing
of `validate` and `compare --measure` that a CPU can check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, write_rollouts
from test_dist import TORCHRUN, _env, _single, _torchrun, _why
from typer.testing import CliRunner

from entropy_lens.methods.base import MethodTerms, Penalty
from entropy_lens.model.update import terms_to
from entropy_lens.pipelines.validate import rank_rows
from entropy_lens_cli.app import app

HERE = Path(__file__).parent
ENTRY = ["--no-python", str(Path(sys.executable).parent / "entropy-lens")]

#: Columns computed at θ: the merged statistics of the ranks are exactly one process's (the same
#: micro-batches); the measured change and the JVP follow a step whose gradient was summed in
#: another order (fp32 rounding, amplified a little by AdamW's g / sqrt(g²)).
AT_THETA = ("logp", "old_logp", "entropy", "sum_p2", "sum_p2_logp", "adv", "ratio", "omega_paper", "omega_code",
            "dh_all_logit", "dh_cov")
AFTER_STEP = ("dh_measured", "dh_jvp")


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_rank_rows_are_contiguous_blocks_that_cover_the_batch():
    assert [rank_rows(10, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert rank_rows(7) == slice(0, 7)
    assert [rank_rows(1, r, 2) for r in range(2)] == [slice(0, 0), slice(0, 1)]  # rank 0 idle
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        rank_rows(4, 2, 2)


def test_terms_to_moves_every_per_token_tensor():
    m = torch.ones(2, 3, dtype=torch.bool)
    terms = MethodTerms(weight=torch.ones(2, 3), touched=m, eps_low=torch.full((2, 3), 0.2), adv=torch.ones(2, 3),
                        penalty=Penalty(kind="kl_ref", coef=0.1, select=m, ref_logp=torch.zeros(2, 3)))
    moved = terms_to(terms, "meta")
    for t in (moved.weight, moved.touched, moved.eps_low, moved.adv, moved.penalty.select, moved.penalty.ref_logp):
        assert t.device.type == "meta"
    assert moved.eps_high == terms.eps_high and moved.dual_clip == terms.dual_clip


# ---------------------------------------------------------------------------------------------
# The data-parallel update and the collectives on 2 ranks
# ---------------------------------------------------------------------------------------------


def test_update_on_two_ranks_is_the_single_process_update(tmp_path):
    """θ' − θ of AdamW, SGD, bf16 (fp32 master) and a one-sequence batch (an idle rank) summed over
    2 ranks equals one process's; the gradient sum fills a gradient missing on one rank with
    zeros and keeps one missing on every rank missing; buckets over mixed dtypes; the row merge."""
    res = subprocess.run([*TORCHRUN, str(HERE / "dist_update_worker.py"), str(tmp_path)], check=False,
                         capture_output=True, text=True, timeout=150, env=_env(), cwd=HERE.parent)
    assert res.returncode == 0, _why(res)
    sys.path.insert(0, str(HERE))
    import dist_update_worker

    threads = torch.get_num_threads()
    try:
        one = dist_update_worker.results()
    finally:
        torch.set_num_threads(threads)
    tol = {"adamw": 1e-6, "sgd": 1e-8, "bf16": 2e-6, "one_sequence": 0.0}  # max|Δθ| is 1e-3 / 2e-4
    for r in (0, 1):
        two = torch.load(tmp_path / f"rank{r}.pt")
        for case, atol in tol.items():
            d1, d2 = one[case]["delta"], two[case]["delta"]
            assert d1.keys() == d2.keys()
            for n in d1:
                gap = float((d2[n] - d1[n]).abs().max())
                assert gap <= atol, (case, n, gap)
            assert sum(float(d.abs().sum()) for d in d1.values()) > 0
            assert two[case]["loss"] == pytest.approx(one[case]["loss"], rel=1e-6)
        grads, loss = two["sum_grads"]
        assert torch.equal(grads["a"], torch.full((2, 3), 3.0)) and torch.equal(grads["b"], torch.full((2, 3), 3.0))
        assert grads["c"] is None and loss == 2.0
        s = two["sum_in_place"]
        assert torch.equal(s[0], torch.arange(5.0) * 3) and torch.equal(s[1], torch.arange(3, dtype=torch.float64) * 3)
        assert torch.equal(s[2], torch.arange(6.0).reshape(2, 3).t() * 3) and torch.equal(s[3], torch.full((700,), 3.0))
        assert torch.equal(two["gather_rows"], torch.arange(5.0)[:, None].expand(-1, 2) + 0.25)


# ---------------------------------------------------------------------------------------------
# Real 2-rank validate runs
# ---------------------------------------------------------------------------------------------


def _args(model_dir: Path, rollouts: Path, out: Path) -> list[str]:
    return ["validate", "--model", str(model_dir), "--rollouts", str(rollouts), "--optimizer", "adamw", "--lr", "1e-3",
            "--micro-batch", "2", "--device", "cpu", "-o", str(out)]


@pytest.fixture(scope="module")
def single_validate(tmp_path_factory, tiny_model_dir):
    """One process's validate run of 12 sequences: (model dir, rollouts, run folder)."""
    d = tmp_path_factory.mktemp("dist_validate")
    roll = write_rollouts(d / "r.jsonl", arithmetic_rows())
    res = _single(_args(tiny_model_dir, roll, d / "one"))
    assert res.exit_code == 0, res.output
    return tiny_model_dir, roll, d / "one"


def test_two_ranks_validate_as_one_process(single_validate, tmp_path):
    model_dir, roll, one = single_validate
    two = tmp_path / "two"
    res = _torchrun(_args(model_dir, roll, two), ENTRY)
    assert res.returncode == 0, _why(res)
    ta, tb = pd.read_parquet(one / "tokens.parquet"), pd.read_parquet(two / "tokens.parquet")
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb) == 90
    for c in ta.columns:
        if c in AFTER_STEP:
            assert float(ta[c].abs().max()) > 1e-3, c  # a real change
            # dh_measured = H' − H in fp32 with H ≈ 3 nats: a few units in the last place of H (2.4e-7)
            pd.testing.assert_series_equal(tb[c], ta[c], check_exact=False, rtol=1e-4, atol=1e-6)
        elif c in AT_THETA:
            pd.testing.assert_series_equal(tb[c], ta[c], check_exact=False, rtol=1e-6, atol=1e-9)
        else:
            pd.testing.assert_series_equal(tb[c], ta[c], check_exact=ta[c].dtype.kind != "f")
    sa, sb = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
    assert (sa["world_size"], sb["world_size"]) == (1, 2)
    assert sb["loss"] == pytest.approx(sa["loss"], rel=1e-6)
    for name, s in sa["estimators"].items():
        for k, v in s.items():
            assert sb["estimators"][name][k] == pytest.approx(v, rel=1e-4, abs=1e-8), (name, k)
    assert sb["quadrants"].keys() == sa["quadrants"].keys() and sb["n_tokens"] == sa["n_tokens"]
    assert (sb["device"], sb["dtype"]) == ("cpu", "float32")
    assert sb["statistics_path"] == sa["statistics_path"] and sa["statistics_path"]["torch"] > 0  # summed over ranks
    cfg = (two / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "device: cpu" in cfg
    assert res.stdout.count("wrote ") == 1  # only rank 0 prints


@pytest.mark.parametrize(("target", "mode", "needle", "code"), [
    # before the gradient sum: rank 0 waits at the sum's agreement, not in the all-reduce
    ("entropy_lens.pipelines.validate:one_step_update", "bug", "internal error", 1),
    # after it: the ranks meet again at the end of the measuring block
    ("entropy_lens.pipelines.validate:jvp_prediction", "value", "injected failure", 2),
])
def test_failing_rank_fails_the_run_and_writes_nothing(single_validate, tmp_path, target, mode, needle, code):
    model_dir, roll, _ = single_validate
    out = tmp_path / "run"
    res = _torchrun(_args(model_dir, roll, out), [str(HERE / "dist_validate_hook.py")], DIST_HOOK_RANK="1",
                    DIST_HOOK_TARGET=target, DIST_HOOK_MODE=mode)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, _why(res)
    assert "rank 1 of 2 failed:" in errors[0] and needle in errors[0] and "injected failure" in errors[0]
    assert f"exitcode  : {code}" in res.stderr  # torchrun's report of the ranks' exit code
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# --device on a machine without a GPU
# ---------------------------------------------------------------------------------------------


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, (res.exit_code, res.output)
    return lines[0]


@pytest.mark.parametrize("args", [
    ["validate", "--device", "cuda"],
    ["validate", "--device", "cuda:1", "--dtype", "float32"],
    ["compare", "tokens.parquet", "--measure", "--device", "cuda"],
])
def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, args):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    line = _one_line(CliRunner().invoke(app, [*args, "-o", str(out)]))
    assert f"--device {args[args.index('--device') + 1]}: no GPU is visible" in line
    assert not out.exists()


def test_compare_refuses_several_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _one_line(CliRunner().invoke(app, ["compare", "tokens.parquet", "-o", str(tmp_path / "o")]))
    assert "compare does not split its work across torchrun ranks" in line
    assert not (tmp_path / "o").exists()
