"""Trainer configuration: the reference defaults, the ``paper`` profile, new options' validation."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from entropy_lens.train import build_config
from entropy_lens.train.config import PROFILES, config_from_dict, config_to_dict
from entropy_lens_cli.app import app

runner = CliRunner()


def test_optimizer_defaults_follow_the_steer_reference_script():
    o = build_config("arithmetic-tiny").optim
    assert (o.weight_decay, o.grad_clip, o.agg_scope, o.mix_groups) == (0.01, 1.0, "micro", False)


def test_paper_profile_sets_the_reference_setting_and_set_still_wins():
    cfg = build_config("gsm8k-smollm2", "steer", ["optim.lr=2e-6"], profile="paper")
    assert cfg.profile == "paper"
    assert (cfg.rollout.batch_size, cfg.rollout.n, cfg.prompts_per_step) == (4096, 8, 512)
    assert cfg.rollout.batch_size // cfg.optim.mini_batches == 32 * 8  # mini-batches of 32 prompts
    assert (cfg.optim.micro_batch, cfg.optim.mix_groups, cfg.optim.agg_scope) == (8, True, "micro")
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.task.max_new_tokens, cfg.steps) == (0.01, 1.0, 3072, 200)
    assert cfg.optim.lr == 2e-6  # --set after the profile
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert set(PROFILES) == {"paper"}


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["rollout.top_p=0"], "rollout.top_p must be in (0, 1]"),
        (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1]"),
        (["rollout.max_sampling_rounds=0"], "rollout.max_sampling_rounds must be >= 1"),
        (["task.overlong_buffer=-1"], "task.overlong_buffer must be >= 0"),
        (["task.max_new_tokens=8", "task.overlong_buffer=9"], "task.overlong_buffer=9 exceeds"),
        (["optim.agg_scope=global"], "optim.agg_scope must be one of micro, mini"),
    ],
)
def test_bad_values_name_the_key(items, needle):
    with pytest.raises(ValueError, match=None) as exc:
        build_config("arithmetic-tiny", "grpo", items)
    assert needle in str(exc.value)


def test_unknown_profile_and_logger_are_one_line_exit_2(tmp_path):
    for args in (["--profile", "bogus"], ["--logger", "wandb"]):
        res = runner.invoke(app, ["train", "-o", str(tmp_path / "run"), *args])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and ("bogus" in lines[0] or "wandb" in lines[0])
        assert not (tmp_path / "run").exists()
