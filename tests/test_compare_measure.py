import json

import pandas as pd
from conftest import arithmetic_rows, write_rollouts
from typer.testing import CliRunner

from entropy_lens_cli.app import app

runner = CliRunner()


def test_compare_measure_takes_one_step_per_method(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    run = tmp_path / "v"
    assert runner.invoke(app, ["validate", "--model", str(tiny_model_dir), "-r", str(roll), "--lr", "0.05",
                               "--no-jvp", "-o", str(run)]).exit_code == 0
    out = tmp_path / "c"
    res = runner.invoke(app, ["compare", str(run / "tokens.parquet"), "-m", "grpo", "-m", "steer", "-m", "w_reinforce",
                              "--set", "steer.lambda_min=0.5", "--lr", "0.05", "--measure", "--model", str(tiny_model_dir),
                              "-r", str(roll), "-o", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    v = json.loads((run / "summary.json").read_text())
    grpo = s["methods"]["grpo"]["measured_dh"]
    # grpo's counterfactual step is the validate step: same measured batch ΔH
    assert abs(grpo - v["estimators"]["omega_paper"]["total_measured"]) < 1e-4 * max(1.0, abs(grpo))
    assert s["methods"]["w_reinforce"]["measured_dh"] != grpo and s["methods"]["steer"]["measured_dh"] != grpo
    df = pd.read_parquet(out / "compare.parquet")
    assert df["dh_measured_step"].notna().all()
    q = s["methods"]["steer"]["measured_quadrants"]
    assert abs(sum(q.values()) - s["methods"]["steer"]["measured_dh"]) < 1e-6


def test_compare_measure_with_wrong_rollouts_is_refused(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    run = tmp_path / "v"
    assert runner.invoke(app, ["validate", "--model", str(tiny_model_dir), "-r", str(roll), "--no-jvp", "-o", str(run)]).exit_code == 0
    other = write_rollouts(tmp_path / "o.jsonl", arithmetic_rows(n_groups=2))
    out = tmp_path / "c"
    res = runner.invoke(app, ["compare", str(run / "tokens.parquet"), "-m", "grpo", "--measure", "--model",
                              str(tiny_model_dir), "-r", str(other), "-o", str(out)])
    assert res.exit_code == 2 and "tokens file has" in res.output and not out.exists()
