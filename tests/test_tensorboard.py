"""TensorBoard logging of the trainer: the scalars are the metrics.jsonl values."""

from __future__ import annotations

import pytest

from entropy_lens.tensorboard import scalar_items


def test_scalar_items_flattens_numbers_and_skips_labels():
    rec = {"step": 3, "method": "steer", "seed": 0, "loss": 0.5, "dh_pred": {"dh_jvp": None, "dh_cov": -1.0},
           "quadrant": {"Q1": {"token_share": 0.25}}, "pass_at_k": {"4": 0.5}, "flag": True, "bad": float("nan")}
    assert scalar_items(rec) == {"loss": 0.5, "dh_pred/dh_cov": -1.0, "quadrant/Q1/token_share": 0.25,
                                 "pass_at_k/4": 0.5}


def test_a_run_with_tensorboard_writes_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import TINY

    from entropy_lens.train import build_config, read_metrics, train

    cfg = build_config("arithmetic-tiny", "grpo", TINY + ["sft.steps=0", "log.jvp_every=0", "log.tensorboard=true"],
                       steps=2)
    train(cfg, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for name in ("entropy_mean", "loss", "dh_measured", "quadrant/Q1/token_share"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [1, 2]
        want = [scalar_items(r)[name] for r in recs]
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6)


def test_eval_summary_goes_to_tensorboard_at_the_step_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from entropy_lens_cli.eval_cmd import log_tensorboard

    summary = {"tags": {"step": "40", "method": "steer"}, "datasets": {
        "gsm8k_test": {"n_problems": 8, "k": 4, "avg_at_k": 0.0625, "pass_at_k": {"1": 0.0625, "4": 0.25},
                       "mean_length": 172.8, "truncated_frac": 0.5}}}
    log_tensorboard(tmp_path, summary)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = {name: [(e.step, e.value) for e in acc.Scalars(name)] for name in acc.Tags()["scalars"]}
    assert got["gsm8k_test/avg_at_k"] == [(40, pytest.approx(0.0625))]
    assert got["gsm8k_test/pass_at_k/4"] == [(40, pytest.approx(0.25))]
    assert set(got) == {"gsm8k_test/n_problems", "gsm8k_test/k", "gsm8k_test/avg_at_k", "gsm8k_test/pass_at_k/1",
                        "gsm8k_test/pass_at_k/4", "gsm8k_test/mean_length", "gsm8k_test/truncated_frac"}
