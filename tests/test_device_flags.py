"""--device and --dtype: parsing, refusals (one line, exit 2, nothing written), resolution under
torchrun, and a bfloat16 analyze on the CPU recorded in its run and close to float32."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, write_rollouts
from typer.testing import CliRunner

from entropy_lens_cli import placement
from entropy_lens_cli.app import app
from entropy_lens_cli.common import resolve_dtype

runner = CliRunner()


def _error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(("args", "expected"), [
    (["analyze", "--device", "cuda"], "--device cuda: no GPU is visible"),
    (["analyze", "--device", "cuda:1"], "--device cuda:1: no GPU is visible"),
    (["analyze", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["analyze", "--dtype", "fp8"], "--dtype must be auto, float32, bfloat16 or float16, got 'fp8'"),
    (["sample", "--device", "cuda"], "--device cuda: no GPU is visible"),
    (["sample", "--dtype", "half"], "--dtype must be"),
    (["compare", "tokens.parquet", "--measure", "--device", "cuda"], "--device cuda: no GPU is visible"),
    (["demo", "--device", "cuda:0"], "--device cuda:0: no GPU is visible"),
    (["eval", "-d", "gsm8k-demo", "--device", "cuda"], "--device cuda: no GPU is visible"),
    (["demo", "--dtype", "int8"], "--dtype must be"),
])
def test_bad_device_or_dtype_is_one_line_and_exit_2(tmp_path, no_gpu, args, expected):
    out = tmp_path / "out"
    target = ["-o", str(out.with_suffix(".parquet") if args[0] == "sample" else out)]
    res = runner.invoke(app, [*args, *target])
    assert res.exit_code == 2, res.output
    assert expected in _error_line(res)
    assert not out.exists() and not out.with_suffix(".parquet").exists()


def test_auto_is_the_cpu_and_float32_without_a_gpu(no_gpu):
    assert placement.resolve_placement("auto", "auto") == ("cpu", "float32")
    assert placement.resolve_placement("cpu", "bfloat16") == ("cpu", "bfloat16")
    assert resolve_dtype("auto", "cuda:0") == "bfloat16" and resolve_dtype("auto") == "float32"


def test_cuda_resolution_with_a_visible_gpu(monkeypatch):
    """With (pretend) GPUs: auto/cuda → cuda:LOCAL_RANK, an index beyond the GPUs or cuda:N under
    torchrun is refused."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert placement.resolve_placement("auto", "auto") == ("cuda:0", "bfloat16")
    assert placement.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="only 2 GPU"):
        placement.resolve_device("cuda:7")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert placement.resolve_device("cuda") == "cuda:1"
    with pytest.raises(ValueError, match="every rank uses cuda:LOCAL_RANK"):
        placement.resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK 2 but only 2 GPU"):
        placement.resolve_device("cuda")
    assert chosen == [0, 1, 1]


def test_train_refuses_several_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, ["train", "--preset", "arithmetic-tiny", "--method", "grpo", "-o", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "rank 0 of 2: train does not split its work across torchrun ranks" in _error_line(res)
    assert not (tmp_path / "run").exists()


def test_bfloat16_analyze_on_the_cpu_is_recorded_and_close_to_float32(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        res = runner.invoke(app, ["analyze", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--device", "cpu",
                                  "--dtype", dtype, "--no-figures", "-o", str(out)])
        assert res.exit_code == 0, res.output
        s = json.loads((out / "summary.json").read_text())
        assert (s["device"], s["dtype"], s["world_size"]) == ("cpu", dtype, 1)
        assert f"dtype: {dtype}" in (out / "config.yaml").read_text()
        runs[dtype] = pd.read_parquet(out / "tokens.parquet")
        assert s["statistics_path"] == {"torch": len(runs[dtype])}  # every response row, eager blocks (no CPU kernel in tests)
    a, b = runs["float32"], runs["bfloat16"]
    assert (a["token_id"] == b["token_id"]).all()
    # bf16 weights and logits (8 bits of mantissa), statistics reduced in fp32: entropies within
    # a few hundredths of a nat of the fp32 run on this model
    assert (a["entropy"] - b["entropy"]).abs().max() < 0.1
    assert (a["logp"] - b["logp"]).abs().max() < 0.2
    assert not (a["entropy"] == b["entropy"]).all()  # it did run in bf16


def test_analyze_rerun_with_another_dtype_is_refused(tmp_path, tiny_model_dir):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    out = tmp_path / "a"
    base = ["analyze", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--no-figures", "-o", str(out)]
    assert runner.invoke(app, [*base, "--dtype", "float32"]).exit_code == 0
    res = runner.invoke(app, [*base, "--dtype", "bfloat16"])
    assert res.exit_code == 2 and "--dtype float32 → bfloat16" in _error_line(res)


@pytest.mark.parametrize("args", [["eval", "-d", "gsm8k-demo"], ["demo"], ["attribute"]])
def test_commands_that_do_not_split_their_work_refuse_several_ranks(tmp_path, monkeypatch, args):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert f"rank 0 of 2: {args[0]} does not split its work across torchrun ranks" in _error_line(res)
    assert not (tmp_path / "run").exists()
