import json

import pandas as pd
import pytest
from conftest import arithmetic_rows, write_rollouts
from typer.testing import CliRunner

from entropy_lens_cli import common
from entropy_lens_cli.app import app

runner = CliRunner()

COLUMNS = ["sample", "group", "pos", "token_id", "token", "logp", "old_logp", "entropy", "sum_p2", "sum_p2_logp",
           "adv", "ratio", "clip_active", "omega_paper", "omega_code", "dh_all_logit", "dh_cov", "dh_jvp",
           "dh_measured", "quadrant"]


def test_validate_end_to_end(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "run"
    res = runner.invoke(app, ["validate", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--lr", "0.05", "-o", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "tokens.parquet")
    assert set(COLUMNS) <= set(df.columns)
    assert len(df) == sum(len(r["response"].split()) for r in arithmetic_rows())
    summary = json.loads((out / "summary.json").read_text())
    for name in ("omega_paper", "omega_code", "dh_all_logit", "dh_cov", "dh_jvp"):
        s = summary["estimators"][name]
        assert {"pcc", "srcc", "mse", "sign_agreement", "total_pred", "total_measured"} <= set(s)
    assert summary["estimators"]["dh_jvp"]["pcc"] > 0.95
    assert summary["retokenized"] is True and any("re-tokenised" in n for n in summary["notes"])
    assert (out / "config.yaml").exists()
    assert "dh_jvp" in res.output


@pytest.fixture(scope="module", autouse=True)
def quiet():
    """What the entry point does first: no progress bars of transformers' own on stderr."""
    common.quiet_libraries()


def _fails(tmp_path, args, needle, after_progress=False):
    """Exit 2 and exactly one line on stderr (the README's promise). ``after_progress``: the
    command got as far as its progress bars (also on stderr); the message is then the one
    ``error:`` line, and the last line (as in test_cli_errors.assert_one_line)."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["validate", *args, "-o", str(out)])
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    if after_progress:
        assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], res.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())


def test_missing_column(tmp_path, tiny_model_dir):
    rows = [{k: v for k, v in r.items() if k != "reward"} for r in arithmetic_rows()]
    roll = write_rollouts(tmp_path / "r.parquet", rows)
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll)], "missing column(s): reward")


def test_empty_response(tmp_path, tiny_model_dir):
    rows = arithmetic_rows()
    rows[2]["response"] = ""
    roll = write_rollouts(tmp_path / "r.jsonl", rows)
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll)], "row 2: empty response")


def test_malformed_jsonl_line_and_invalid_utf8(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    lines = roll.read_text().splitlines()
    lines[3] = '{"prompt": "x", '
    roll.write_text("\n".join(lines) + "\n")
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll)], "line 4: malformed JSON")
    roll.write_bytes(b'{"prompt": "a", "response": "\xff\xfe", "reward": 1}\n')
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll)], "line 1: invalid UTF-8")


def test_missing_model_folder_and_unreadable_file(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    _fails(tmp_path, ["--model", str(tmp_path / "nope"), "--rollouts", str(roll)], "no such model folder")
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(tmp_path / "missing.jsonl")], "no such file")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(bad)], "cannot read parquet")


def test_folder_without_weights_and_pickle_opt_in(tmp_path, tiny_model_dir):
    import shutil

    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    empty = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, empty)
    for f in empty.glob("*.safetensors"):
        f.unlink()
    _fails(tmp_path, ["--model", str(empty), "--rollouts", str(roll)], "no weight files")
    (empty / "pytorch_model.bin").write_bytes(b"x")
    _fails(tmp_path, ["--model", str(empty), "--rollouts", str(roll)], "--allow-pickle")


def test_non_finite_logit_is_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, broken)
    st = broken / "model.safetensors"
    w = load_file(st)
    key = next(k for k in w if "embed_tokens" in k)
    w[key][7, 0] = float("nan")  # token 7 ("0"): its row feeds the logits of every state
    save_file(w, st, metadata={"format": "pt"})
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    _fails(tmp_path, ["--model", str(broken), "--rollouts", str(roll)], "non-finite logit", after_progress=True)


def test_bad_options(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll), "--lr", "0"], "--lr must be > 0")
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll), "--optimizer", "lion"], "sgd or adamw")


def test_validate_in_bfloat16_measures_in_float32(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "run"
    res = runner.invoke(app, ["validate", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--lr", "0.05",
                              "--dtype", "bfloat16", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == {"model_dtype": "bfloat16", "update": "fp32 master copy of the parameters",
                                    "measuring_dtype": "float32"}
    floor = summary["noise_floor"]
    assert floor["floor_abs_dh"]["max"] == 0.0 and floor["step_abs_dh"]["p50"] > 0
    assert summary["estimators"]["dh_jvp"]["pcc"] > 0.95
    assert "noise floor" in res.output


def test_bad_dtype_is_one_line(tmp_path, tiny_model_dir):
    res = runner.invoke(app, ["validate", "--model", str(tiny_model_dir), "--dtype", "float8", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--dtype must be" in lines[0]
    assert not (tmp_path / "o").exists()
