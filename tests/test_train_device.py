"""`train --device/--dtype`: the options parse, resolve and are recorded in config.yaml; a GPU that
is not there is one line and exit 2 with nothing written; a bfloat16 run (autocast over float32
weights) of the tiny preset trains on the CPU. CUDA itself is tested where a GPU is visible."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from entropy_lens.train import build_config
from entropy_lens.train.setup import autocast, resolve_placement
from entropy_lens_cli.app import app

runner = CliRunner()

#: tests/test_train.py's TINY settings, without SFT and with 2 RL steps in mind.
TINY = [
    "model.hidden_size=32", "model.layers=1", "model.intermediate_size=64", "task.digits=1", "task.eval_size=16",
    "sft.steps=0", "rollout.batch_size=16", "rollout.n=4", "rollout.gen_batch=16", "optim.mini_batches=2",
    "optim.lr=1e-3", "log.eval_every=0", "log.jvp_every=2", "log.pass_k=", "checkpoint.every=2",
    "checkpoint.keep_last=10", "threads=1",
]


def _args(out, *extra: str, steps: int = 2) -> list[str]:
    return ["train", "--steps", str(steps), *[a for item in TINY for a in ("--set", item)], *extra, "-o", str(out)]


def _error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def test_presets_and_defaults():
    assert build_config("arithmetic-tiny").device == "cpu" and build_config("arithmetic-tiny").dtype == "float32"
    smol = build_config("gsm8k-smollm2")
    assert (smol.device, smol.dtype) == ("auto", "auto")
    if not torch.cuda.is_available():
        assert (resolve_placement(smol).device, resolve_placement(smol).dtype) == ("cpu", "float32")
    cfg = build_config("arithmetic-tiny", overrides=["device=auto", "dtype=bfloat16"])
    assert resolve_placement(cfg).dtype == "bfloat16"
    for bad, why in (("device=gpu", "device must be auto, cpu, cuda or cuda:N"),
                     ("dtype=float16", "float16 needs loss scaling"), ("dtype=half", "dtype must be auto, float32")):
        with pytest.raises(ValueError, match=why):
            build_config("arithmetic-tiny", overrides=[bad])


def test_autocast_only_for_bfloat16():
    f32 = resolve_placement(build_config("arithmetic-tiny"))
    bf16 = resolve_placement(build_config("arithmetic-tiny", overrides=["dtype=bfloat16"]))
    w = torch.randn(4, 4)
    with autocast(f32):
        assert (w @ w).dtype == torch.float32
    with autocast(bf16):
        assert (w @ w).dtype == torch.bfloat16
    with autocast(bf16, enabled=False):
        assert (w @ w).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(tmp_path, device):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(out, "--device", device))
    assert res.exit_code == 2
    errors = _error_lines(res)
    assert len(errors) == 1 and f"--device {device}: no GPU is visible" in errors[0], res.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--dtype", "half"], "--dtype must be auto, float32, bfloat16 or float16, got 'half'"),
    (["--dtype", "float16"], "float16 needs loss scaling"),
])
def test_bad_device_or_dtype_is_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(out, *args))
    assert res.exit_code == 2
    errors = _error_lines(res)
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert not out.exists()


def test_bfloat16_run_on_the_cpu_trains_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(out, "--device", "cpu", "--dtype", "bfloat16"))
    assert res.exit_code == 0, res.output
    config = yaml.safe_load((out / "config.yaml").read_text())["config"]
    assert config["device"] == "cpu" and config["dtype"] == "bfloat16"
    assert config["set"]["device"] == "cpu" and config["set"]["dtype"] == "bfloat16"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert math.isfinite(r["loss"]) and math.isfinite(r["entropy_mean"]) and math.isfinite(r["dh_measured"])
    assert recs[1]["dh_pred"]["dh_jvp"] is not None and math.isfinite(recs[1]["dh_pred"]["dh_jvp"])
    # the weights stay float32 (the master copy): autocast computes in bfloat16
    with safe_open(str(out / "checkpoints" / "step_000002" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118 (not a dict)
    # resume with the same options continues the run; another dtype is refused
    res = runner.invoke(app, ["train", "--steps", "3", "--resume", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    res = runner.invoke(app, ["train", "--steps", "4", "--resume", "--dtype", "float32", "-o", str(out)])
    assert res.exit_code == 2 and "dtype" in _error_lines(res)[0]


def test_float32_default_is_recorded(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(out, steps=1))
    assert res.exit_code == 0, res.output
    config = yaml.safe_load((out / "config.yaml").read_text())["config"]
    assert config["device"] == "cpu" and config["dtype"] == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible (torch.cuda.is_available() is false)")
def test_cuda_bfloat16_run(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(out, "--device", "cuda", "--dtype", "bfloat16"))
    assert res.exit_code == 0, res.output
    config = yaml.safe_load((out / "config.yaml").read_text())["config"]
    assert config["device"].startswith("cuda:") and config["dtype"] == "bfloat16"
