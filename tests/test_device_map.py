"""--device-map: analyze and sample spread the model with ``auto`` (without a GPU everything lands
on the CPU, with the results of ``none``) and record it; every other command that loads a model
refuses it, as do torchrun, ``--device cpu``/``cuda:N`` and unknown values (one line, exit 2,
nothing written); the inputs go where the input embedding runs, also when its weight is offloaded.
--allow-pickle says the same on every command."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
import typer
from conftest import arithmetic_rows, make_model, write_rollouts
from typer.testing import CliRunner

from entropy_lens.model.forward import pack, response_stats
from entropy_lens.model.load import load_model, model_device, model_devices
from entropy_lens.placement import resolve_device_map
from entropy_lens_cli.app import app
from entropy_lens_cli.common import ALLOW_PICKLE_HELP

runner = CliRunner()
PROBLEMS = [("what is 1 + 2 ?", "3"), ("what is 3 + 4 ?", "7"), ("what is 12 + 3 ?", "15")]


def _error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _files(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_analyze_auto_on_the_cpu_equals_the_plain_run_and_is_recorded(tmp_path, tiny_model_dir, no_gpu, one_process):
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    runs = {}
    for mode in ("none", "auto"):
        out = tmp_path / mode
        res = runner.invoke(app, ["analyze", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--no-figures",
                                  "--device-map", mode, "-o", str(out)])
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["device"], summary["dtype"], summary["device_map"]) == ("cpu", "float32", mode)
        assert f"device_map: {mode}" in (out / "config.yaml").read_text()
        runs[mode] = (pd.read_parquet(out / "tokens.parquet"), summary)
    pd.testing.assert_frame_equal(runs["none"][0], runs["auto"][0])
    assert "model_devices" not in runs["none"][1] and runs["auto"][1]["model_devices"] == ["cpu"]


def test_analyze_rerun_with_another_device_map_resumes(tmp_path, tiny_model_dir, no_gpu, one_process):
    """Like --device, the map is not among the options a rerun must repeat (same numbers)."""
    roll = write_rollouts(tmp_path / "r.jsonl", arithmetic_rows())
    base = ["analyze", "--model", str(tiny_model_dir), "--rollouts", str(roll), "--no-figures", "-o", str(tmp_path / "a")]
    assert runner.invoke(app, base).exit_code == 0
    res = runner.invoke(app, [*base, "--device-map", "auto"])
    assert res.exit_code == 0, res.output


def test_sample_auto_on_the_cpu_gives_the_same_rollouts(tmp_path, tiny_model_dir, no_gpu, one_process):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    frames = {}
    for mode in ("none", "auto"):
        out = tmp_path / f"{mode}.parquet"
        res = runner.invoke(app, ["sample", "--model", str(tiny_model_dir), "-d", str(data), "-n", "2",
                                  "--max-new-tokens", "5", "--temperature", "0.8", "--seed", "3", "--device-map", mode,
                                  "-o", str(out)])
        assert res.exit_code == 0, res.output
        frames[mode] = pd.read_parquet(out)
    a, b = frames["none"], frames["auto"]
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == len(PROBLEMS) * 2
    for c in a.columns:
        assert [x.tolist() if hasattr(x, "tolist") else x for x in a[c]] == \
               [x.tolist() if hasattr(x, "tolist") else x for x in b[c]], c
    sa, sb = dict(a.attrs["sampling"]), dict(b.attrs["sampling"])
    assert (sa.pop("device_map"), sb.pop("device_map"), sb.pop("model_devices")) == ("none", "auto", ["cpu"])
    assert sa == sb and sa["device"] == "cpu"


def test_eval_auto_on_the_cpu_equals_the_plain_run_and_is_recorded(tmp_path, tiny_model_dir, no_gpu, one_process):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    runs = {}
    for mode in ("none", "auto"):
        out = tmp_path / mode
        res = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "-d", str(data), "-k", "2",
                                  "--max-new-tokens", "4", "--device-map", mode, "-o", str(out)])
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["device"], summary["dtype"], summary["device_map"]) == ("cpu", "float32", mode)
        runs[mode] = (pd.read_parquet(out / "eval.parquet"), summary)
    pd.testing.assert_frame_equal(runs["none"][0], runs["auto"][0])
    assert runs["none"][1]["datasets"] == runs["auto"][1]["datasets"] and runs["auto"][1]["model_devices"] == ["cpu"]


@pytest.mark.parametrize(("args", "expected"), [
    (["validate"], "validate updates the weights: use --device"),
    (["train", "--preset", "arithmetic-tiny"], "train updates the weights: use --device"),
    (["compare", "tokens.parquet", "--measure"], "compare --measure updates the weights: use --device"),
    (["compare", "tokens.parquet"], "compare --measure updates the weights"),
    (["attribute"], "attribute differentiates through the model"),
])
def test_commands_that_update_or_differentiate_refuse_a_map(tmp_path, args, expected):
    out = tmp_path / "out"
    res = runner.invoke(app, [*args, "--device-map", "auto", "-o", str(out)])
    assert res.exit_code == 2, res.output
    line = _error_line(res)
    assert line.startswith("error: --device-map auto splits the model across devices for the forward-only commands "
                           "(analyze, sample, eval); ") and expected in line
    assert not out.exists()


def test_the_refused_option_is_hidden_and_the_forward_only_one_documented():
    command = typer.main.get_command(app)
    for name in ("validate", "train", "compare", "attribute", "analyze", "sample", "eval"):
        opt = next(p for p in command.commands[name].params if "--device-map" in p.opts)
        assert opt.default == "none" and opt.hidden == (name not in ("analyze", "sample", "eval")), name


@pytest.mark.parametrize(("args", "expected"), [
    (["analyze", "--device-map", "foo"], "--device-map must be none, auto or sequential, got 'foo'"),
    (["sample", "--device-map", "balanced_low_0"], "--device-map must be none, auto or sequential"),
    (["analyze", "--device-map", "auto", "--device", "cpu"],
     "--device-map auto with --device cpu: the map places the model over every visible GPU itself"),
    (["sample", "--device-map", "sequential", "--device", "cuda:1"],
     "--device-map sequential with --device cuda:1: the map places the model over every visible GPU itself"),
    (["analyze", "--device-map", "auto", "--device", "cuda"], "--device cuda: no GPU is visible"),
    (["eval", "-d", "gsm8k-demo", "--device-map", "foo"], "--device-map must be none, auto or sequential, got 'foo'"),
])
def test_bad_map_is_one_line_and_exit_2(tmp_path, no_gpu, one_process, args, expected):
    out = tmp_path / ("r.parquet" if args[0] == "sample" else "out")
    res = runner.invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert expected in _error_line(res)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("command", ["analyze", "sample"])
def test_a_map_under_torchrun_is_refused(tmp_path, monkeypatch, command):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / ("r.parquet" if command == "sample" else "out")
    res = runner.invoke(app, [command, "--device-map", "auto", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert ("rank 0 of 2: --device-map auto under torchrun (WORLD_SIZE=2): every rank would spread its model over "
            "all the visible GPUs") in _error_line(res)
    assert _files(tmp_path) == []


def test_resolve_device_map(monkeypatch, one_process):
    assert resolve_device_map("none", "cpu", "analyze") is None
    assert resolve_device_map("auto", "auto", "analyze") == "auto"
    assert resolve_device_map("sequential", "cuda", "sample") == "sequential"
    assert resolve_device_map("none", "cuda:3", "validate") is None  # none is the plain placement everywhere
    with pytest.raises(ValueError, match="validate updates the weights"):
        resolve_device_map("sequential", "auto", "validate")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert resolve_device_map("none", "auto", "analyze") is None
    with pytest.raises(ValueError, match="under torchrun"):
        resolve_device_map("auto", "auto", "sample")


def test_load_model_with_a_map_on_the_cpu(tiny_model_dir, no_gpu):
    plain, _ = load_model(tiny_model_dir)
    spread, _ = load_model(tiny_model_dir, device_map="auto")
    assert model_devices(spread) == ["cpu"] and model_device(spread) == torch.device("cpu")
    for (name, a), (_, b) in zip(plain.state_dict().items(), spread.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="unknown device map 'cuda:0'"):
        load_model(tiny_model_dir, device_map="cuda:0")


def test_inputs_go_where_the_input_embedding_runs(tmp_path):
    """A model spread by accelerate with its embedding and LM head offloaded (weights on the meta
    device, run on the CPU by their hooks): the input device is the hook's, not the first
    parameter's, and the statistics equal the plain model's."""
    from accelerate import dispatch_model

    model = make_model(attn="sdpa")
    plain = copy.deepcopy(model)
    dispatch_model(model, device_map={"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                                      "model.rotary_emb": "cpu", "lm_head": "disk"}, offload_dir=str(tmp_path))
    assert next(model.parameters()).device.type == "meta"
    assert model_device(model) == torch.device("cpu") and model_devices(model) == ["cpu", "disk"]
    packed = pack([[2, 3, 4], [5, 6]], [[7, 8, 9], [10]], 0)
    want, got = response_stats(plain, packed), response_stats(model, packed.to(model_device(model)))
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_allow_pickle_help_is_the_same_everywhere():
    command = typer.main.get_command(app)
    helps = {}
    for name in ("analyze", "sample", "validate", "attribute", "compare"):
        opt = next(p for p in command.commands[name].params if "--allow-pickle" in p.opts)
        helps[name] = opt.help.removeprefix("with --measure: ")  # compare: the scope its --measure options share
    assert set(helps.values()) == {ALLOW_PICKLE_HELP}, helps
    assert "can run code from the file" in ALLOW_PICKLE_HELP and "need no flag" in ALLOW_PICKLE_HELP
