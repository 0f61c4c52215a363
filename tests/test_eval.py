"""`entropy-lens eval` and its pipeline: graded rows, avg@k and pass@k recomputed independently,
resume after an interruption gives the same samples, tags from trainer checkpoints, and every bad
input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from math import comb
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from entropy_lens.io.datasets import load_problems
from entropy_lens.pipelines.evaluate import (
    EVAL_COLUMNS,
    EvalSettings,
    checkpoint_tags,
    chunk_seed,
    run_eval,
    summarize,
)
from entropy_lens.rewards import score_math
from entropy_lens_cli import common
from entropy_lens_cli.app import app

runner = CliRunner()
HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
TAIL = 'Remember to put your answer on its own line after "Answer:".'


@pytest.fixture(scope="module", autouse=True)
def quiet():
    common.quiet_libraries()


def verl_file(path: Path, items: list[tuple[str, str]], repeat: int = 1) -> Path:
    """A verl-schema parquet of (problem, answer), each row repeated ``repeat`` times (as AIME's)."""
    rows = [{"data_source": path.stem, "prompt": [{"role": "user", "content": f"{HEAD}\n\n{p}\n\n{TAIL}"}],
             "ability": "MATH", "reward_model": {"ground_truth": a, "style": "rule"},
             "extra_info": {"index": str(i), "raw_problem": p}}
            for i, (p, a) in enumerate(items) for _ in range(repeat)]
    pd.DataFrame(rows).to_parquet(path)
    return path


PROBLEMS = [(f"what is {a} + {b} ?", str(a + b)) for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 3)]]


def exact_pass(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(res, *needles):
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert "Traceback" not in res.output
    return err


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------------------------------------
# summary math on hand-made rows
# ---------------------------------------------------------------------------------------------


def test_summarize_exact_values():
    correct = {0: [1, 0, 0, 0], 1: [1, 1, 0, 1], 2: [0, 0, 0, 0]}
    rows = pd.DataFrame([{"dataset": "d", "problem": p, "sample": s, "correct": bool(c), "length": 10 * (s + 1),
                          "truncated": s == 3} for p, cs in correct.items() for s, c in enumerate(cs)])
    out = summarize(rows, EvalSettings(k=4))["d"]
    assert out["n_problems"] == 3 and out["k"] == 4
    assert out["avg_at_k"] == pytest.approx(4 / 12)
    assert list(out["pass_at_k"]) == ["1", "2", "4"]
    for k in (1, 2, 4):
        ref = (exact_pass(4, 1, k) + exact_pass(4, 3, k) + exact_pass(4, 0, k)) / 3
        assert out["pass_at_k"][str(k)] == pytest.approx(ref, abs=1e-12)
    assert out["mean_length"] == pytest.approx(25.0) and out["truncated_frac"] == pytest.approx(0.25)


def test_chunk_seed_is_stable_and_distinct():
    assert chunk_seed(0, "a", 0) == chunk_seed(0, "a", 0)
    assert len({chunk_seed(0, "a", 0), chunk_seed(0, "a", 1), chunk_seed(0, "b", 0), chunk_seed(1, "a", 0)}) == 4
    assert 0 <= chunk_seed(123, "x", 9) < 2**31


# ---------------------------------------------------------------------------------------------
# the pipeline on a tiny model
# ---------------------------------------------------------------------------------------------


def test_rows_are_graded_and_resume_gives_the_same_samples(tmp_path, tiny_model, tiny_tokenizer):
    probs = {"toy": load_problems(verl_file(tmp_path / "toy.parquet", PROBLEMS, repeat=3))}
    s = EvalSettings(k=4, temperature=1.0, max_new_tokens=6, reward="math", seed=0, batch_size=8)
    rows, timing = run_eval(tiny_model, tiny_tokenizer, probs, s, tmp_path / "a", "tiny")
    assert list(rows.columns) == list(EVAL_COLUMNS) and len(rows) == 5 * 4
    assert rows["problem"].tolist() == [p for p in range(5) for _ in range(4)]
    assert rows["sample"].tolist() == list(range(4)) * 5
    assert timing["tokens"] == int(rows["length"].sum()) and timing["wall_s"] > 0
    # 3 chunks of 2 problems (batch 8 / k 4), the last one short
    assert sorted(p.name for p in (tmp_path / "a" / "toy").iterdir()) == [f"chunk_0000{i}.parquet" for i in range(3)]
    for r in rows.itertuples():  # graded by math-verify, independently re-scored
        assert r.correct == (score_math(r.response, r.ground_truth) > 0) and r.reward == float(r.correct)
        assert 1 <= r.length <= 6 and r.truncated == (r.length == 6 and not r.response.endswith("<|im_end|>"))
        assert r.prompt.startswith(HEAD) and r.ground_truth == PROBLEMS[r.problem][1]

    # interrupted after the first chunk, then resumed: the same samples as the uninterrupted run
    def stop_after_first(_responses, _tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_model, tiny_tokenizer, probs, s, tmp_path / "b", "tiny", progress=stop_after_first)
    assert [p.name for p in (tmp_path / "b" / "toy").iterdir()] == ["chunk_00000.parquet"]
    calls = []
    real = tiny_model.generate

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    tiny_model.generate = counting
    resumed, again = run_eval(tiny_model, tiny_tokenizer, probs, s, tmp_path / "b", "tiny")
    assert len(calls) == 2  # only the two missing chunks were generated
    assert again["tokens"] == timing["tokens"]  # the first chunk's count is kept in its file
    pd.testing.assert_frame_equal(resumed, rows)

    # another setting in the same chunk folder is refused
    with pytest.raises(ValueError, match="holds samples of a different evaluation"):
        run_eval(tiny_model, tiny_tokenizer, probs, EvalSettings(k=2, max_new_tokens=6, batch_size=8), tmp_path / "b",
                 "tiny")


def test_checkpoint_tags(tmp_path):
    run = tmp_path / "runs" / "steer-s3"
    step = run / "checkpoints" / "step_000040"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"config": {"preset": "p", "method": "steer", "seed": 3}}))
    (step / "trainer_state.json").write_text(json.dumps({"step": 40}))
    assert checkpoint_tags(step) == {"run": "steer-s3", "method": "steer", "seed": "3", "step": "40"}
    assert checkpoint_tags(None) == {} and checkpoint_tags(tmp_path) == {}


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def test_eval_command_writes_run_and_resumes(tmp_path, tiny_model_dir):
    a = verl_file(tmp_path / "aime_like.parquet", PROBLEMS[:3], repeat=4)
    b = tmp_path / "table.jsonl"
    b.write_text("".join(json.dumps({"problem": p, "answer": x}) + "\n" for p, x in PROBLEMS))
    # a trainer checkpoint: tags method/seed/step/run come from the run, explicit --tag wins
    step = tmp_path / "myrun" / "checkpoints" / "step_000007"
    shutil.copytree(tiny_model_dir, step)
    (step / "trainer_state.json").write_text(json.dumps({"step": 7}))
    (tmp_path / "myrun" / "config.yaml").write_text(yaml.safe_dump({"config": {"method": "grpo", "seed": 1}}))
    out = tmp_path / "ev"
    args = ["eval", "--model", step, "-d", a, "-d", b, "-k", 4, "--limit", 4, "--max-new-tokens", 5,
            "--batch-size", 8, "--tag", "seed=9", "--tag", "note=x", "-o", out]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert {"eval.parquet", "summary.json", "config.yaml"} <= set(files_under(out))
    rows = pd.read_parquet(out / "eval.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "eval" and summary["model"] == str(step.resolve())
    assert summary["settings"] == {"k": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 5, "reward": "math",
                                   "seed": 0, "limit": 4}
    assert summary["tags"] == {"run": "myrun", "method": "grpo", "seed": "9", "step": "7", "note": "x"}
    import torch

    gpu = torch.cuda.is_available()  # --device/--dtype auto
    assert (summary["device"].split(":")[0], summary["dtype"]) == (("cuda", "bfloat16") if gpu else ("cpu", "float32"))
    assert list(summary["datasets"]) == ["aime_like", "table"]
    assert summary["datasets"]["aime_like"]["n_problems"] == 3 and summary["datasets"]["table"]["n_problems"] == 4
    for name, d in summary["datasets"].items():  # recomputed from eval.parquet
        r = rows[rows["dataset"] == name]
        c = r.groupby("problem")["correct"].sum().tolist()
        assert d["avg_at_k"] == pytest.approx(r["correct"].mean())
        for k in ("1", "2", "4"):
            assert d["pass_at_k"][k] == pytest.approx(sum(exact_pass(4, ci, int(k)) for ci in c) / len(c))
        assert d["mean_length"] == pytest.approx(r["length"].mean())
        assert d["truncated_frac"] == pytest.approx(r["truncated"].mean())
    assert summary["wall_s"] > 0 and summary["tokens_per_s"] > 0

    again = invoke(*args)  # the same options: every chunk is read back, the same result
    assert again.exit_code == 0, again.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "eval.parquet"), rows)

    other = invoke(*args[:8], 2, *args[9:])  # -k 2
    one_line(other, f"-o {out}", "holds a different run", "→ 2")


@pytest.mark.parametrize("extra, needles", [
    (["-k", 0], ["-k must be an integer >= 1"]),
    (["--top-p", 0], ["--top-p must be in (0, 1]"]),
    (["--top-p", 1.5], ["--top-p must be in (0, 1]"]),
    (["--temperature", 0], ["--temperature must be > 0"]),
    (["--device", "tpu"], ["--device must be auto, cpu, cuda or cuda:N"]),
    (["--dtype", "int8"], ["--dtype must be auto, float32, bfloat16 or float16"]),
    (["--tag", "novalue"], ["--tag 'novalue': expected key=value"]),
])
def test_bad_options(tmp_path, extra, needles):
    d = verl_file(tmp_path / "d.parquet", PROBLEMS[:2])
    out = tmp_path / "o"
    one_line(invoke("eval", "-d", d, *extra, "-o", out), *needles)
    assert not out.exists()


def test_bad_datasets(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    one_line(invoke("eval", "--model", tiny_model_dir, "-o", out), "--dataset: give at least one dataset")
    nogt = tmp_path / "nogt.parquet"
    pd.DataFrame([{"data_source": "x", "prompt": [{"role": "user", "content": "what is 1 + 1 ?"}]}]).to_parquet(nogt)
    one_line(invoke("eval", "--model", tiny_model_dir, "-d", nogt, "-o", out), str(nogt), "no ground truth")
    clash = verl_file(tmp_path / "clash.parquet", [("what is 1 + 1 ?", "2"), ("what is 2 + 2 ?", "4"),
                                                  ("what is  1 + 1 ?", "3")])
    one_line(invoke("eval", "--model", tiny_model_dir, "-d", clash, "-o", out), str(clash), "problem 0",
             "repeated with different answers")
    (tmp_path / "x").mkdir()
    twice = verl_file(tmp_path / "x" / "clash.parquet", PROBLEMS[:1])
    one_line(invoke("eval", "-d", clash, "-d", twice, "-o", out), "a second dataset named 'clash'")
    assert not out.exists()


def test_eval_refuses_several_ranks(tmp_path, monkeypatch):
    """eval does not split its work: under torchrun with 2 ranks it stops with one line, writes nothing."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = verl_file(tmp_path / "d.parquet", PROBLEMS[:2])
    out = tmp_path / "o"
    one_line(invoke("eval", "-d", d, "-o", out), "eval does not split its work across torchrun ranks")
    assert not out.exists()
