"""`entropy-lens attribute`: end to end on a tiny saved model, bad input (one line, exit 2, no
output), the attribution figures and the report's attribution view."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, write_rollouts
from typer.testing import CliRunner

from entropy_lens import plots
from entropy_lens_cli import common
from entropy_lens_cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def quiet_one_thread():
    common.quiet_libraries()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def attribute_run(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("attr")
    roll = write_rollouts(d / "r.jsonl", arithmetic_rows(n_groups=2, n=3))
    out = d / "run"
    res = runner.invoke(app, ["attribute", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--lr", "0.05",
                              "--by", "kind,source,quadrant", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_attribute_end_to_end(attribute_run):
    out, res = attribute_run
    parts = pd.read_parquet(out / "attribution.parquet")
    assert list(parts.columns) == ["sample", "pos", "by", "part", "dh"]
    assert set(parts["by"]) == {"kind", "source", "quadrant"}
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert {"dh_jvp", "dh_measured", "dh_lm_head", "dh_self_kernel", "quadrant"} <= set(tokens.columns)
    summary = json.loads((out / "summary.json").read_text())
    for kind in ("kind", "source", "quadrant"):
        assert summary["attribution"][kind]["residual"] < 1e-5  # a float32 model: float32 rounding of each part
        shares = [r["share_abs"] for r in summary["attribution"][kind]["parts"].values()]
        assert sum(shares) == pytest.approx(1.0)
    assert summary["estimators"]["dh_lm_head"]["cost_seconds"] > 0
    assert (out / "config.yaml").exists() and (out / "figures" / "attribution_sources.png").exists()
    assert "dh_lm_head" in res.output and "own" in res.output


def test_figures_and_report_view(attribute_run):
    out, _ = attribute_run
    run = plots.load_run(out)
    built, notes = plots.build_plots([run], only=["attribution_layers", "attribution_sources"])
    assert [p.name for p in built] == ["attribution_layers", "attribution_sources"], notes
    layers = built[0].data
    assert layers["share"].sum() == pytest.approx(1.0) and "lm_head" in set(layers["role"])
    mat = built[1].data
    parts = pd.read_parquet(out / "attribution.parquet")
    src = parts[parts["by"] == "source"]["dh"].sum()
    assert mat[mat["by"] == "source"]["dh"].sum() == pytest.approx(src)
    from entropy_lens.report import build_report

    html = build_report(run.tokens, run.summary, figures=[])
    assert "where the first-order entropy change comes from" in html


def test_attribution_figures_skip_without_attribution(tmp_path):
    tokens = pd.DataFrame({"sample": [0], "pos": [0], "logp": [-1.0], "entropy": [1.0], "adv": [1.0]})
    tokens.to_parquet(tmp_path / "tokens.parquet")
    _, notes = plots.build_plots([plots.load_run(tmp_path)], only=["attribution_layers"])
    assert notes == [f"attribution_layers: skipped (no attribution.parquet in {tmp_path})"]


def _fails(tmp_path, args, needle):
    out = tmp_path / "out"
    res = runner.invoke(app, ["attribute", *args, "-o", str(out)])
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not out.exists()


def test_unknown_split(tmp_path, tiny_model_dir):
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--by", "layer,heads"], "--by: unknown part 'heads'")


def test_all_zero_advantages(tmp_path, tiny_model_dir):
    rows = [{**r, "reward": 1.0} for r in arithmetic_rows(n_groups=2, n=3)]
    roll = write_rollouts(tmp_path / "r.jsonl", rows)
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll)], "every advantage is zero")


def test_no_rewards(tmp_path, tiny_model_dir):
    rows = [{k: v for k, v in r.items() if k != "reward"} for r in arithmetic_rows(n_groups=2, n=3)]
    roll = write_rollouts(tmp_path / "r.jsonl", rows)
    _fails(tmp_path, ["--model", str(tiny_model_dir), "--rollouts", str(roll)], "")
