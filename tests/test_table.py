"""The results table (entropy_lens.results, `entropy-lens table`) on run folders built by hand with
the trainer's and the eval command's real file schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from entropy_lens.io.tables import InputError
from entropy_lens.methods import params_from_dict
from entropy_lens.results import (
    aggregate,
    collect_rows,
    method_label,
    model_label,
    parse_metric,
    results_markdown,
    results_table,
    task_benchmark,
)
from entropy_lens_cli.app import app

TASK = {"name": "arithmetic", "digits": 2, "n_operands": 2, "ops": "+", "eval_size": 256, "split_seed": 1234,
        "path": None, "grader": "math", "reward": "task", "convention": "pm1", "max_new_tokens": 0}
BENCH = "arithmetic 2×2-digit +"


def train_run(root: Path, name: str, method: str, seed: int, pass1: float, pass16: float = 0.9,
              greedy: float = 0.5, params: dict | None = None, status: str = "completed", steps: int = 4,
              planned: int = 4) -> Path:
    """A trainer run folder: config.yaml as train.loop._write_config writes it, metrics.jsonl, and
    summary.json with summarize_run's keys."""
    run = root / name
    run.mkdir(parents=True)
    resolved = params_from_dict(method, params or {}).to_dict()
    config = {"preset": "arithmetic-tiny", "method": method, "method_params": params or {}, "seed": seed,
              "steps": planned, "threads": None, "deterministic": True, "task": TASK,
              "set": {f"method.{k}": v for k, v in (params or {}).items()}}
    (run / "config.yaml").write_text(yaml.safe_dump({"config": config, "versions": {"entropy_lens": "0"}}))
    recs = [{"step": s, "method": method, "seed": seed, "accuracy": 0.3, "entropy_mean": 1.0} for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if status == "diverged":
        summary = {"status": "diverged", "message": "non-finite loss (nan) at step 3", "last_checkpoint": "x"}
    else:
        summary = {
            "status": status, "preset": "arithmetic-tiny", "method": method, "method_params": resolved,
            "seed": seed, "steps": steps, "entropy_first": 1.0, "entropy_last": 0.5, "entropy_drop": 0.5,
            "accuracy_first": 0.3, "accuracy_last": 0.6, "eval_accuracy_step0": 0.4, "eval_accuracy_last": greedy,
            "pass_at_k": {"1": pass1, "2": 0.7, "4": 0.8, "8": 0.85, "16": pass16}, "wall_s_steps": 1.0,
            "wall_s_this_process": 2.0, "info": {}, "closed_form_note": "…",
        }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def eval_run(root: Path, name: str, datasets: dict[str, float], method: str | None = "grpo", seed=0,
             model: str = "runs/grpo/checkpoints/step_000200") -> Path:
    """An eval run folder: summary.json in the eval command's schema."""
    run = root / name
    run.mkdir(parents=True)
    tags = {"run": "runs/x", "step": 200, "seed": seed}
    if method is not None:
        tags["method"] = method
    summary = {
        "kind": "eval", "model": model, "settings": {"k": 4, "temperature": 1.0}, "tags": tags,
        "datasets": {d: {"n_problems": 30, "k": 4, "avg_at_k": v, "pass_at_k": {"1": v, "2": v + 0.05, "4": v + 0.1},
                         "mean_length": 300.0, "truncated_frac": 0.0} for d, v in datasets.items()},
        "wall_s": 10.0, "tokens_per_s": 100.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def train_grid(tmp_path):
    """grpo seeds 0, 1 (0.40, 0.50) and steer seeds 0, 1 (0.45, 0.65) on the arithmetic set."""
    return [
        train_run(tmp_path, "grpo_s0", "grpo", 0, 0.40, pass16=0.80),
        train_run(tmp_path, "grpo_s1", "grpo", 1, 0.50, pass16=0.90),
        train_run(tmp_path, "steer_s0", "steer", 0, 0.45, pass16=0.70),
        train_run(tmp_path, "steer_s1", "steer", 1, 0.65, pass16=0.80),
    ]


def test_parse_metric():
    assert parse_metric("avg_at_k").name == "avg_at_k"
    assert (parse_metric("pass_at_1").name, parse_metric("pass_at_1").k) == ("pass_at_k", 1)
    assert parse_metric("pass_at_k:16").k == 16
    for bad in ("pass_at_k:0", "pass_at_k:x", "avg", "pass_at_k"):
        with pytest.raises(ValueError, match="--metric must be one of"):
            parse_metric(bad)


def test_labels():
    assert task_benchmark(TASK) == BENCH
    assert task_benchmark({"name": "gsm8k", "path": "/data/gsm8k_test.parquet"}) == "gsm8k_test"
    assert task_benchmark({"name": "gsm8k", "path": None}) == "gsm8k"
    assert method_label("steer", {}) == "steer"
    assert method_label("steer", {"mapping": "linear", "eps_high": 0.28}) == "steer (eps_high=0.28, mapping=linear)"
    assert method_label("grpo", {"eps_high": 1e-3, "dual_clip": None}) == "grpo (dual_clip=none, eps_high=0.001)"
    assert model_label("runs/steer/checkpoints/step_000200") == "steer"
    assert model_label("ckpt/global_step_200/actor/huggingface") == "ckpt"
    assert model_label("Qwen/Qwen2.5-Math-7B") == "Qwen2.5-Math-7B"


def test_train_runs_mean_std_and_best(train_grid):
    res = results_table(train_grid)
    t = res.table.set_index("method")
    assert list(res.table["method"]) == ["grpo", "steer"]  # order of first appearance
    assert set(res.table["benchmark"]) == {BENCH}  # one benchmark: no average column
    assert t.loc["grpo", "mean"] == pytest.approx(0.45)
    assert t.loc["grpo", "std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.40, 0.50
    assert t.loc["steer", "mean"] == pytest.approx(0.55)
    assert t.loc["steer", "std"] == pytest.approx(0.1414214, rel=1e-5)
    assert list(t["best"]) == [False, True]
    assert t.loc["steer", "seeds"] == "0;1" and t.loc["steer", "n_seeds"] == 2
    lines = res.markdown.splitlines()
    assert lines[0].startswith("avg@k (%), mean ± sample std over seeds")
    assert lines[2] == f"| method | seeds | {BENCH} |"
    assert lines[4] == "| grpo | 2 | 45.0 ± 7.1 |"
    assert lines[5] == "| steer | 2 | **55.0 ± 14.1** |"


def test_train_runs_other_metrics(train_grid):
    t16 = results_table(train_grid, "pass_at_k:16").table.set_index("method")
    assert t16.loc["grpo", "mean"] == pytest.approx(0.85) and t16.loc["steer", "mean"] == pytest.approx(0.75)
    assert list(t16["best"]) == [True, False]
    greedy = results_table(train_grid, "greedy").table
    assert list(greedy["mean"]) == pytest.approx([0.5, 0.5]) and list(greedy["best"]) == [True, True]  # tie
    with pytest.raises(InputError, match=r"no pass@32 \(has pass@1, pass@2, pass@4, pass@8, pass@16\)"):
        results_table(train_grid, "pass_at_k:32")


def test_method_params_split_rows(tmp_path):
    runs = [train_run(tmp_path, "s", "steer", 0, 0.3)] + [
        train_run(tmp_path, f"s{e}", "steer", 0, v, params={"eps_high": e}) for e, v in ((0.2, 0.4), (0.28, 0.6))]
    rows, _ = collect_rows(runs)
    assert list(rows["method"]) == ["steer", "steer (eps_high=0.2)", "steer (eps_high=0.28)"]
    assert list(rows["value"]) == pytest.approx([0.3, 0.4, 0.6])


def test_eval_runs_benchmarks_average_and_labels(tmp_path):
    runs = [
        eval_run(tmp_path, "g0", {"aime24": 0.10, "math500": 0.70}, "grpo", 0),
        eval_run(tmp_path, "g1", {"aime24": 0.20, "math500": 0.72}, "grpo", "1"),  # tags are text
        eval_run(tmp_path, "s0", {"aime24": 0.30, "math500": 0.70}, "steer", 0),
        eval_run(tmp_path, "base", {"aime24": 0.05, "math500": 0.50}, None, None, model="Qwen/Qwen2.5-Math-7B"),
    ]
    res = results_table(runs)
    cell = res.table.set_index(["method", "benchmark"])
    assert cell.loc[("grpo", "aime24"), "seeds"] == "0;1"
    dup = eval_run(tmp_path, "g0_again", {"aime24": 0.1}, "grpo", "0")
    with pytest.raises(InputError, match="both are method 'grpo', seed 0, benchmark 'aime24'"):
        collect_rows([*runs, dup])
    assert list(dict.fromkeys(res.table["benchmark"])) == ["aime24", "math500", "average"]
    assert cell.loc[("grpo", "aime24"), "mean"] == pytest.approx(0.15)
    assert cell.loc[("grpo", "average"), "mean"] == pytest.approx((0.40 + 0.46) / 2)
    assert cell.loc[("grpo", "average"), "std"] == pytest.approx(pd.Series([0.40, 0.46]).std())
    assert cell.loc[("steer", "average"), "mean"] == pytest.approx(0.5)
    assert pd.isna(cell.loc[("steer", "aime24"), "std"])
    assert cell.loc[("Qwen2.5-Math-7B", "math500"), "mean"] == pytest.approx(0.5)
    best = res.table[res.table["best"]].set_index("benchmark")["method"]
    assert best["aime24"] == "steer" and best["average"] == "steer"
    assert res.table[(res.table["benchmark"] == "math500") & res.table["best"]]["method"].tolist() == ["grpo"]
    md = res.markdown.splitlines()
    assert md[2] == "| method | seeds | aime24 | math500 | average |"
    assert md[4] == "| grpo | 2 | 15.0 ± 7.1 | **71.0 ± 1.4** | 43.0 ± 4.2 |"
    assert md[5] == "| steer | 1 | **30.0** | 70.0 | **50.0** |"
    assert md[6] == "| Qwen2.5-Math-7B | 1 | 5.0 | 50.0 | 27.5 |"
    p2 = results_table(runs, "pass_at_k:2").table.set_index(["method", "benchmark"])
    assert p2.loc[("steer", "aime24"), "mean"] == pytest.approx(0.35)


def test_missing_cells_and_partial_seeds(tmp_path):
    runs = [eval_run(tmp_path, "g0", {"a": 0.1, "b": 0.2}, "grpo", 0),
            eval_run(tmp_path, "g1", {"a": 0.3}, "grpo", 1),
            eval_run(tmp_path, "s0", {"a": 0.5}, "steer", 0)]
    res = results_table(runs)
    md = res.markdown.splitlines()
    # grpo's average uses seed 0 only (seed 1 lacks b); steer has no b and no average
    assert md[4] == "| grpo | 2 | 20.0 ± 14.1 | **20.0** (n=1) | **15.0** (n=1) |"
    assert md[5] == "| steer | 1 | **50.0** | – | – |"


def test_errors(tmp_path, train_grid):
    ev = eval_run(tmp_path, "ev", {"a": 0.1})
    with pytest.raises(InputError, match="runs of different kinds in one table: .*grpo_s0 is a train run, .*ev an eval run"):
        collect_rows([*train_grid, ev])
    dup = train_run(tmp_path, "grpo_again", "grpo", 0, 0.3)
    with pytest.raises(InputError, match=r"grpo_s0 and .*grpo_again: both are method 'grpo', seed 0"):
        collect_rows([*train_grid, dup])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no summary.json"):
        collect_rows([tmp_path / "empty"])
    with pytest.raises(InputError, match="nope: no such run folder"):
        collect_rows([tmp_path / "nope"])
    analyze = tmp_path / "an"
    analyze.mkdir()
    (analyze / "config.yaml").write_text(yaml.safe_dump({"config": {"command": "analyze"}}))
    (analyze / "summary.json").write_text("{}")
    with pytest.raises(InputError, match="an: not a trainer or eval run"):
        collect_rows([analyze])
    with pytest.raises(InputError, match="--metric greedy is for trainer runs"):
        collect_rows([ev], "greedy")


def test_incomplete_runs(tmp_path, train_grid):
    div = train_run(tmp_path, "div", "grpo", 5, 0.1, status="diverged")
    short = train_run(tmp_path, "short", "grpo", 6, 0.1, steps=2, planned=4)
    running = train_run(tmp_path, "running", "grpo", 7, 0.1)
    (running / "summary.json").unlink()
    for run, why in ((div, "trainer run diverged"), (short, r"unfinished trainer run \(2 of 4 steps\)"),
                     (running, r"unfinished trainer run \(no summary.json\)")):
        with pytest.raises(InputError, match=f"{why}.*pass --skip-incomplete"):
            collect_rows([*train_grid, run])
    ev_running = tmp_path / "ev_running"  # the eval command writes config.yaml first, summary.json last
    ev_running.mkdir()
    (ev_running / "config.yaml").write_text(yaml.safe_dump({"config": {"command": "eval", "model": "m"}}))
    with pytest.raises(InputError, match=r"ev_running: unfinished eval run \(no summary.json\)"):
        collect_rows([ev_running])
    rows, skipped = collect_rows([*train_grid, div, short, running], skip_incomplete=True)
    assert len(rows) == 4 and len(skipped) == 3
    with pytest.raises(InputError, match="no finished runs among the 1 given"):
        collect_rows([div], skip_incomplete=True)


def test_aggregate_is_pure_on_rows():
    rows = pd.DataFrame({"method": ["a", "a", "b"], "seed": [0, 1, 0], "benchmark": ["x"] * 3,
                         "value": [0.2, 0.4, 0.3], "run": ["r1", "r2", "r3"]})
    t = aggregate(rows)
    assert list(t["mean"]) == pytest.approx([0.3, 0.3]) and list(t["best"]) == [True, True]
    assert results_markdown(t, "pass_at_1").splitlines()[0].startswith("pass@1 (%)")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_cli_prints_markdown(train_grid):
    res = CliRunner().invoke(app, ["table", *map(str, train_grid)])
    assert res.exit_code == 0, res.output
    assert "| steer | 2 | **55.0 ± 14.1** |" in res.output


def test_cli_writes_md_and_csv(tmp_path, train_grid):
    out = tmp_path / "table"
    res = CliRunner().invoke(app, ["table", *map(str, train_grid), "--metric", "pass_at_k:16", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]
    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns) == ["method", "benchmark", "mean", "std", "n_seeds", "seeds", "best", "metric"]
    assert csv["mean"].tolist() == pytest.approx([0.85, 0.75]) and csv["metric"].tolist() == ["pass_at_k:16"] * 2
    assert "| grpo | 2 | **85.0 ± 7.1** |" in (out / "results.md").read_text()


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, train_grid):
    div = train_run(tmp_path, "div", "grpo", 5, 0.1, status="diverged")
    out = tmp_path / "o" / "table"
    for args, msg in (([*map(str, train_grid), str(div)], "trainer run diverged"),
                      ([str(train_grid[0]), "--metric", "pass@3"], "--metric must be one of")):
        res = CliRunner().invoke(app, ["table", *args, "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert msg in res.output and len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["table", *map(str, train_grid), str(div), "--skip-incomplete", "-o", str(out)])
    assert res.exit_code == 0 and "skipped:" in res.output and (out / "results.md").is_file()
