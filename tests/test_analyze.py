import json

import pandas as pd
from conftest import arithmetic_rows, make_model, make_tokenizer, write_rollouts
from typer.testing import CliRunner

import entropy_lens.pipelines.analyze as an
from entropy_lens_cli.app import app

runner = CliRunner()


def _run(args):
    return runner.invoke(app, ["analyze", *args])


def test_analyze_writes_tokens_and_summary(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "a"
    res = _run(["--model", str(tiny_model_dir), "--rollouts", str(roll), "--shard-size", "5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "tokens.parquet")
    for c in ("logp", "entropy", "adv", "omega_paper", "omega_code", "dh_all_logit", "dh_cov", "quadrant", "token"):
        assert c in df.columns
    assert len(list((out / "shards").glob("shard_*.parquet"))) == 3  # 12 sequences / 5
    s = json.loads((out / "summary.json").read_text())
    assert abs(sum(q["token_share"] for q in s["quadrants"].values()) - 1) < 1e-9
    assert len(s["top_tokens_by_abs_omega"]) == 20 and s["entropy_by_position"]
    assert "estimators" not in s  # no second checkpoint: nothing measured
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert "quadrants.png" in figs and "quadrants.csv" in figs and "dh_scatter.png" not in figs  # nothing measured


def test_interrupted_run_resumes_without_recomputing(tmp_path, tiny_model_dir, monkeypatch):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "a"
    calls = []
    real = an.shard_frame

    def flaky(*args, **kw):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while working on the second shard
        return real(*args, **kw)

    monkeypatch.setattr(an, "shard_frame", flaky)
    res = _run(["--model", str(tiny_model_dir), "--rollouts", str(roll), "--shard-size", "5", "-o", str(out)])
    assert res.exit_code == 130 and res.stderr.strip().splitlines()[-1] == "interrupted", res.output  # Ctrl-C
    assert not (out / "tokens.parquet").exists()
    assert len(list((out / "shards").glob("shard_*.parquet"))) == 1
    calls.clear()
    monkeypatch.setattr(an, "shard_frame", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    res = _run(["--model", str(tiny_model_dir), "--rollouts", str(roll), "--shard-size", "5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert calls == [5, 10]  # the finished first shard (start 0) was not recomputed
    fresh = tmp_path / "b"
    assert _run(["--model", str(tiny_model_dir), "--rollouts", str(roll), "--shard-size", "5", "-o", str(fresh)]).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tokens.parquet"), pd.read_parquet(fresh / "tokens.parquet"))


def test_other_run_in_same_folder_is_refused(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "a"
    assert _run(["--model", str(tiny_model_dir), "--rollouts", str(roll), "-o", str(out)]).exit_code == 0
    roll2 = write_rollouts(tmp_path / "r2.jsonl", arithmetic_rows(n_groups=2))
    res = _run(["--model", str(tiny_model_dir), "--rollouts", str(roll2), "-o", str(out)])
    assert res.exit_code == 2 and "different run" in res.output


def test_next_model_measures_change_and_scores(tmp_path, tiny_model_dir):
    nxt = tmp_path / "next"
    m = make_model(seed=0, attn="sdpa")
    import torch

    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(nxt)
    make_tokenizer().save_pretrained(nxt)
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "a"
    res = _run(["--model", str(tiny_model_dir), "--next-model", str(nxt), "--rollouts", str(roll), "-o", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "tokens.parquet")
    assert "dh_measured" in df.columns and df["dh_measured"].abs().max() > 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["estimators"]) == {"omega_paper", "omega_code", "dh_all_logit", "dh_cov"}
    assert (out / "figures" / "dh_scatter.png").is_file()  # measured change between checkpoints


def test_next_model_with_other_vocabulary_is_refused(tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    make_model(vocab=64, attn="sdpa").save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "a"
    res = _run(["--model", str(tiny_model_dir), "--next-model", str(other), "--rollouts", str(roll), "-o", str(out)])
    assert res.exit_code == 2 and "vocabulary of 64 tokens differs" in res.output
    assert not (out / "tokens.parquet").exists()


def test_all_equal_rewards_give_zero_advantage_and_a_note(tmp_path, tiny_model_dir):
    rows = arithmetic_rows()
    for r in rows[:4]:  # group 0: all correct
        r["reward"] = 1.0
    roll = write_rollouts(tmp_path / "r.jsonl", rows)
    out = tmp_path / "a"
    assert _run(["--model", str(tiny_model_dir), "--rollouts", str(roll), "-o", str(out)]).exit_code == 0
    df = pd.read_parquet(out / "tokens.parquet")
    assert (df.loc[df["group"] == 0, "adv"] == 0).all() and (df.loc[df["group"] == 0, "quadrant"] == 0).all()
    s = json.loads((out / "summary.json").read_text())
    assert any("1 of 3 groups have equal rewards" in n for n in s["notes"])


def test_verl_dump_format_is_read(tmp_path, tiny_model_dir):
    """verl trainer.rollout_data_dir dump: {step}.jsonl with input, output, gts, score, step."""
    tok = make_tokenizer()
    dump = tmp_path / "dump"
    dump.mkdir()
    rows = []
    for r in arithmetic_rows():
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False)
        rows.append({"input": text, "output": r["response"], "gts": "3", "score": r["reward"], "step": 7})
    write_rollouts(dump / "6.jsonl", rows[:4])
    write_rollouts(dump / "7.jsonl", rows)
    out = tmp_path / "a"
    res = _run(["--model", str(tiny_model_dir), "--rollouts", str(dump), "-o", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "tokens.parquet")
    assert df["sample"].nunique() == len(rows)  # the last step's file was used
    assert df["group"].nunique() == 3  # grouped by identical prompt text


def test_tokenizer_model_vocabulary_mismatch(tmp_path):
    small = tmp_path / "small"
    make_model(vocab=16, attn="sdpa").save_pretrained(small)
    make_tokenizer().save_pretrained(small)
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    res = _run(["--model", str(small), "--rollouts", str(roll), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "tokenizer has" in res.output and "vocabulary is 16" in res.output
