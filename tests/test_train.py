"""The reference trainer: resume after kill -9, bad input, NaN handling, the metrics schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from entropy_lens.train import (
    build_config,
    check_record,
    read_metrics,
    train,
)
from entropy_lens.train import loop as train_loop
from entropy_lens.train import step as train_step
from entropy_lens.train.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_set_items,
)
from entropy_lens.train.metrics import METRIC_KEYS
from entropy_lens_cli.app import app

runner = CliRunner()

#: A seconds-scale setting of the arithmetic-tiny preset: 1-layer width-32 model, 1-digit sums.
TINY = [
    "model.hidden_size=32", "model.layers=1", "model.intermediate_size=64", "task.digits=1", "task.eval_size=16",
    "sft.steps=100", "sft.lr=1e-2", "sft.batch_size=32", "rollout.batch_size=32", "rollout.n=4",
    "rollout.gen_batch=32", "optim.mini_batches=2", "optim.lr=1e-3", "log.eval_every=0", "log.jvp_every=2",
    "log.pass_k=", "checkpoint.every=2", "checkpoint.keep_last=10", "threads=1",
]


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sft_cache"))


def tiny(sft_cache: str, *extra: str) -> list[str]:
    return TINY + [f"sft.cache_dir={sft_cache}", *extra]


def set_args(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def strip_wall(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in recs]


def raising_reward(response: str, answer: str) -> float:
    """A user reward function with a bug (used through --set task.reward=test_train:raising_reward)."""
    return 1.0 / 0


# ---------------------------------------------------------------------------------------------
# kill -9, then --resume: identical metrics
# ---------------------------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
from entropy_lens.train import build_config, parse_set_items, train
from entropy_lens.train import checkpoint as ckpt
out, method, where, kill_at, steps, items = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
cfg = build_config("arithmetic-tiny", method, items, steps=steps)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def on_step(step):
    if where == "after_step" and step == kill_at:
        die()

if where == "in_checkpoint":  # killed inside checkpoint kill_at's write, its weights already saved
    from transformers import LlamaForCausalLM
    real_save, real_checkpoint, saving = LlamaForCausalLM.save_pretrained, ckpt.save_checkpoint, []

    def save_checkpoint(run_dir, step, *args, **kwargs):
        saving.append(step)
        try:
            return real_checkpoint(run_dir, step, *args, **kwargs)
        finally:
            saving.pop()

    def save_pretrained(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        if saving and saving[-1] == kill_at:
            die()

    ckpt.save_checkpoint, LlamaForCausalLM.save_pretrained = save_checkpoint, save_pretrained
train(cfg, out, set_items=parse_set_items(items), on_step=on_step)
"""

#: Methods by the random streams a resume must restore. steer draws nothing from the ``method``
#: stream; clip_cov draws one uniform key per token from it at every update, and with these
#: settings detaches a random 10% of all tokens, so a stream not restored changes the run.
RESUME_METHODS = {
    "steer": [],
    "clip_cov": ["method.clip_ratio=0.1", "method.lb=-1000", "method.ub=1000"],
}


def resume_items(sft_cache: str, method: str) -> list[str]:
    return tiny(sft_cache, "log.eval_every=2", "log.pass_k=1,2", *RESUME_METHODS[method])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sft_cache):
    """``reference_run(method)``: an uninterrupted 6-step run of :func:`resume_items`, made once."""
    runs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp("ref") / method
            res = runner.invoke(app, ["train", "--method", method, "--steps", "6",
                                      *set_args(resume_items(sft_cache, method)), "-o", str(out)])
            assert res.exit_code == 0, res.output
            runs[method] = out
        return runs[method]

    return get


def kill_run(out: Path, method: str, where: str, kill_at: int, items: list[str]) -> None:
    """A 6-step run in a child process, killed with SIGKILL after step ``kill_at``
    (``where="after_step"``) or inside the write of checkpoint ``kill_at`` (``"in_checkpoint"``)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), method, where, str(kill_at), "6", *items],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]


def assert_resumed_like(ref: Path, out: Path) -> list[dict]:
    """``--resume`` on ``out`` finishes the run with the metrics and final weights of ``ref``."""
    res = runner.invoke(app, ["train", "-o", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert strip_wall(a) == strip_wall(b)
    assert "pass_at_k" in b[-1] and "eval_accuracy" in b[1]
    final = "checkpoints/step_000006/model.safetensors"
    assert (ref / final).read_bytes() == (out / final).read_bytes()
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    return b


@pytest.mark.parametrize("method", sorted(RESUME_METHODS))
def test_kill9_then_resume_gives_identical_metrics(tmp_path, sft_cache, reference_run, method):
    items = resume_items(sft_cache, method)
    ref, killed = reference_run(method), tmp_path / "killed"
    kill_run(killed, method, "after_step", 3, items)
    assert len(read_metrics(killed / "metrics.jsonl")) == 3  # step 3 was logged, its checkpoint was not
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000000", "step_000002"]
    recs = assert_resumed_like(ref, killed)
    if method == "clip_cov":  # the method stream mattered after the resume point: tokens were detached
        assert all(r["weight_min"] == 0.0 and 0.8 < r["weight_mean"] < 0.95 for r in recs[2:])
        return

    # resuming with a different setting is refused; with more steps it extends the run
    a = read_metrics(ref / "metrics.jsonl")
    res = runner.invoke(app, ["train", "-o", str(killed), "--resume", "--set", "optim.lr=0.5"])
    assert res.exit_code == 2 and "config differs" in res.output and "optim.lr" in res.output
    res = runner.invoke(app, ["train", "-o", str(killed), "--resume", "--steps", "7"])
    assert res.exit_code == 0, res.output
    longer = read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in longer] == [1, 2, 3, 4, 5, 6, 7] and strip_wall(longer[:6]) == strip_wall(a)
    assert yaml.safe_load((killed / "config.yaml").read_text())["config"]["steps"] == 7


def test_kill9_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, sft_cache, reference_run):
    """Killed while checkpoint 4 is being written (its weights saved, the rest not): checkpoint 4
    does not exist, only a hidden temporary folder; --resume starts from checkpoint 2, removes the
    leftover, and ends with the uninterrupted run's metrics and weights (clip_cov: every stream)."""
    items = resume_items(sft_cache, "clip_cov")
    out = tmp_path / "killed"
    kill_run(out, "clip_cov", "in_checkpoint", 4, items)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]  # logged before its checkpoint
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [e for e in entries if not e.startswith(".")] == ["step_000000", "step_000002"]
    partial = [out / "checkpoints" / e for e in entries if e.startswith(".step_000004.")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / "trainer_state.json").exists()
    assert_resumed_like(reference_run("clip_cov"), out)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# metrics schema, measured ΔH, rollouts, steer vs grpo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["steer", "grpo"])
def test_tiny_run_schema_and_measurements(tmp_path, sft_cache, method):
    out = tmp_path / method
    cfg = build_config("arithmetic-tiny", method, tiny(sft_cache, "checkpoint.every=1", "log.eval_every=2",
                                                       "log.pass_k=1,2,4"), steps=4)
    summary = train(cfg, out)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        check_record(r)
        assert list(r)[: len(METRIC_KEYS)] == list(METRIC_KEYS)
        assert r["method"] == method and r["seed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["entropy_mean"] > 0
        assert (r["dh_pred"]["dh_jvp"] is None) == (r["step"] % 2 == 1)
        assert ("eval_accuracy" in r) == (r["step"] % 2 == 0)
        shares = sum(r["quadrant"][q]["token_share"] for q in ("Q1", "Q2", "Q3", "Q4"))
        assert 0.0 < shares <= 1.0 + 1e-12
        # per-quadrant Ω sums add up to the batch Ω (A = 0 tokens predict 0 for grpo and steer)
        q_pred = sum(r["quadrant"][q]["dh_pred"] for q in ("Q1", "Q2", "Q3", "Q4"))
        assert q_pred == pytest.approx(r["dh_pred"]["omega_paper"], rel=1e-6, abs=1e-15)
    assert set(recs[-1]["pass_at_k"]) == {"1", "2", "4"}
    assert "pass_at_k" not in recs[0]
    if method == "grpo":
        assert all(r["weight_min"] == 1.0 == r["weight_max"] for r in recs)
    else:
        assert min(r["weight_min"] for r in recs) < 1.0
        assert all(0.8 - 1e-6 <= r["weight_min"] <= r["weight_max"] <= 1.0 for r in recs)
    assert summary["status"] == "completed" and summary["steps"] == 4

    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["config"]["method"] == method and conf["config"]["preset"] == "arithmetic-tiny"
    assert conf["config"]["seed"] == 0 and "set" in conf["config"] and "torch" in conf["versions"]

    # rollouts in the rollout format: exact ids and old_logp, readable by the rollout loader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entropy_lens.io.rollouts import load_rollouts, old_logp_grid, tokenize_rollouts
    from entropy_lens.model.forward import pack, response_stats

    roll_path = out / "rollouts" / "step_000002.parquet"
    frame = load_rollouts(roll_path)
    assert len(frame) == 32 and frame["group_id"].nunique() == 8
    tok = AutoTokenizer.from_pretrained(out / "checkpoints" / "step_000001")
    ids = tokenize_rollouts(frame, tok, roll_path)
    assert not ids.retokenized
    assert tok.decode(ids.response_ids[0], skip_special_tokens=True) == frame["response"][0]

    # step 2 recomputed from checkpoints 1 and 2 on step 2's tokens: measured ΔH = H(θ2) − H(θ1),
    # dh_jvp = ∇H(θ1)·(θ2 − θ1), and old_logp = log p under θ1
    from entropy_lens.model.jvp import jvp_prediction
    from entropy_lens.model.update import snapshot

    packed = pack(ids.prompt_ids, ids.response_ids, tok.pad_token_id)
    models = {k: AutoModelForCausalLM.from_pretrained(out / "checkpoints" / f"step_{k:06d}").eval() for k in (1, 2)}
    st = {k: response_stats(m, packed) for k, m in models.items()}
    old = old_logp_grid(frame, [len(r) for r in ids.response_ids], roll_path)
    assert torch.allclose(st[1]["logp"][packed.mask], old[packed.mask], atol=1e-5)
    measured = float((st[2]["entropy"] - st[1]["entropy"])[packed.mask].double().sum())
    assert measured == pytest.approx(recs[1]["dh_measured"], rel=1e-4, abs=1e-4)
    theta1, theta2 = snapshot(models[1]), snapshot(models[2])
    delta = {k: theta2[k] - theta1[k] for k in theta1}
    jvp = jvp_prediction(models[1], packed, theta1, delta, 1.0, 32)
    assert float(jvp[packed.mask].double().sum()) == pytest.approx(recs[1]["dh_pred"]["dh_jvp"], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# NaN loss: stop, keep the last good checkpoint, clear message, non-zero exit
# ---------------------------------------------------------------------------------------------


def poison_losses(monkeypatch, after_step: int) -> dict:
    state = {"poison": after_step == 0}
    real = train_step.method_loss

    def fake(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if state["poison"] else loss

    monkeypatch.setattr(train_step, "method_loss", fake)

    def on_step(step):
        if step == after_step:
            state["poison"] = True

    state["on_step"] = on_step
    return state


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, sft_cache, monkeypatch):
    state = poison_losses(monkeypatch, after_step=2)
    cfg = build_config("arithmetic-tiny", "grpo", tiny(sft_cache), steps=6)
    out = tmp_path / "nan"
    with pytest.raises(train_loop.TrainingDiverged, match=r"non-finite loss .*step 3.*step_000002"):
        train(cfg, out, on_step=state["on_step"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000", "step_000002"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["last_checkpoint"].endswith("step_000002")


def test_nan_loss_cli_exit_code(tmp_path, sft_cache, monkeypatch):
    poison_losses(monkeypatch, after_step=0)
    out = tmp_path / "nan_cli"
    res = runner.invoke(app, ["train", "--steps", "3", *set_args(tiny(sft_cache)), "-o", str(out)])
    assert res.exit_code == 3
    assert "non-finite loss" in res.output and "step_000000" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "arithmetic-huge"], "unknown preset 'arithmetic-huge'; available: arithmetic-tiny, gsm8k-smollm2"),
        (["--method", "stear"], "unknown method 'stear'; available:"),
        (["--set", "optim.lr=0"], "optim.lr must be > 0"),
        (["--set", "optim.lr=-1e-3"], "optim.lr must be > 0"),
        (["--set", "rollout.batch_size=30"], "rollout.batch_size=30 is not divisible by the group size rollout.n=8"),
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys of optim:"),
        (["--set", "optimizer.lr=1"], "unknown config section 'optimizer'"),
        (["--set", "optim.lr"], "--set expects KEY=VALUE"),
        (["--set", "rollout.n=two"], "rollout.n must be an integer"),
        (["--method", "steer", "--set", "method.lambda_min=1.5"], "steer: lambda_min must be in (0, 1]"),
        (["--method", "grpo", "--set", "method.beta=1"], "grpo: unknown parameter(s) beta"),
        (["--set", "task.reward=no_such_module:fn"], "cannot import"),
        (["--resume"], "no such file"),
        (["--set", "task.digits=1", "--set", "task.eval_size=16", "--set", "rollout.n=2", "--set", "rollout.batch_size=256"],
         "the task has 84 training problems but a step needs 128 prompts"),
        (["--set", "task.digits=1"], "task.eval_size must be in [0, 99], got 256"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_reward_function_that_raises(tmp_path, sft_cache):
    cfg = build_config("arithmetic-tiny", "grpo", tiny(sft_cache), steps=2)

    def broken(response: str, answer: str) -> float:
        raise KeyError("lookup table missing")

    with pytest.raises(ValueError, match=r"reward function broken raised KeyError on response 0"):
        train(cfg, tmp_path / "a", reward_fn=broken)
    res = runner.invoke(app, ["train", "--steps", "2", *set_args(tiny(sft_cache, "task.reward=test_train:raising_reward")),
                              "-o", str(tmp_path / "b")])
    assert res.exit_code == 2
    assert "reward function test_train:raising_reward raised ZeroDivisionError" in res.output


def test_sft_stops_at_the_target_accuracy(tmp_path):
    items = [x for x in TINY if not x.startswith("sft.steps")] + [
        "sft.steps=300", "sft.target_accuracy=0.1", "sft.check_every=10", "sft.dev_size=32", "log.jvp_every=0"]
    summary = train(build_config("arithmetic-tiny", "grpo", items, steps=1), tmp_path / "r")
    sft = summary["info"]["sft"]
    assert sft["steps_run"] % 10 == 0 and sft["steps_run"] < 300 and sft["dev_accuracy"] >= 0.1


def test_existing_run_folder_needs_resume(tmp_path, sft_cache):
    out = tmp_path / "r"
    train(build_config("arithmetic-tiny", "grpo", tiny(sft_cache, "log.jvp_every=0", "log.save_rollouts=false"), steps=1), out)
    assert not (out / "rollouts").exists()
    res = runner.invoke(app, ["train", "--steps", "1", *set_args(tiny(sft_cache)), "-o", str(out)])
    assert res.exit_code == 2 and "already holds a run" in res.output


# ---------------------------------------------------------------------------------------------
# config and pass@k
# ---------------------------------------------------------------------------------------------


def test_config_overrides_roundtrip():
    cfg = build_config("arithmetic-tiny", "steer", ["optim.lr=3e-4", "method.lambda_min=0.7", "log.pass_k=1,4",
                                                    "optim.grad_clip=none", "seed=5", "task.ops=+-"])
    assert cfg.optim.lr == 3e-4 and cfg.method_param_dict() == {"lambda_min": 0.7}
    assert cfg.log.pass_k == (1, 4) and cfg.optim.grad_clip is None and cfg.seed == 5 and cfg.task.ops == "+-"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert build_config("arithmetic-tiny", "grpo", seed=3, steps=7).seed == 3
    with pytest.raises(ValueError, match="must be true or false"):
        apply_overrides(cfg, {"deterministic": "maybe"})
    assert parse_set_items(["a.b = 1"]) == {"a.b": "1"}
    gsm = build_config("gsm8k-smollm2", "grpo")
    assert gsm.model.source == "bundled" and gsm.task.name == "gsm8k" and gsm.sft.steps == 0


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


def test_arithmetic_task_split_and_verifier():
    from entropy_lens.train.tasks import ArithmeticTask

    task = ArithmeticTask(digits=1, n_operands=3, ops="+*", eval_size=50)
    texts = {p.text for p in task.train_problems}
    assert not texts & {p.text for p in task.eval_problems}
    p = next(p for p in task.train_problems if "*" in p.text)
    assert str(eval(p.text[:-1])) == p.answer  # noqa: S307 - digits and + * only
    ids = task.prompt_ids(p) + task.answer_ids(p)
    assert task.decode(ids) == p.text + p.answer
    assert task.reward(p.answer, p.answer) == 1.0 and task.reward(p.answer + "0", p.answer) == -1.0
    hf = task.tokenizer.to_hf()
    assert hf.decode(task.prompt_ids(p), skip_special_tokens=True) == p.text
    assert hf(p.text, add_special_tokens=False)["input_ids"] == task.tokenizer.encode(p.text)
    with pytest.raises(ValueError, match="task.ops"):
        ArithmeticTask(ops="/")


def test_gsm8k_task_files(tmp_path):
    from entropy_lens.train.tasks import GSM8KTask

    plain = tmp_path / "p.parquet"
    pd.DataFrame({"problem": [f"What is {i} + {i}?" for i in range(6)], "answer": [str(2 * i) for i in range(6)]}).to_parquet(plain)
    task = GSM8KTask(None, path=str(plain), eval_size=2)
    assert len(task.eval_problems) == 2 and len(task.train_problems) == 4
    assert task.reward("so the sum is 8.\nAnswer: 8", task.train_problems[2].answer) == 1.0
    assert task.reward("Answer: 7", "8") == -1.0
    # verl schema, DAPO-Math-17k style: no raw_problem, the problem between the instruction lines,
    # and a problem repeated with a different answer (left out, as in the public file)
    head = "Solve the following math problem step by step. The last line of your response should be of the form \\boxed{Answer} where Answer is the answer to the problem."
    tail = "Remember to put your answer in \\boxed{...} format on its own line."
    texts = ["What is 1 + 2?", "What is 2 + 2?", "What is 3 + 3?", "What is 2 + 2?"]
    answers = ["3", "4", "6", "5"]
    verl = tmp_path / "v.parquet"
    pd.DataFrame({
        "data_source": ["math_dapo"] * 4,
        "prompt": [[{"role": "user", "content": f"{head}\n\n{t}\n\n{tail}"}] for t in texts],
        "ability": ["MATH"] * 4,
        "reward_model": [{"ground_truth": a, "style": "rule"} for a in answers],
        "extra_info": [{"index": str(i)} for i in range(4)],
    }).to_parquet(verl)
    task = GSM8KTask(None, path=str(verl), eval_size=1, name="math")
    assert task.name == "math"
    assert [(p.text, p.answer) for p in task.eval_problems + task.train_problems] == [
        ("What is 1 + 2?", "3"), ("What is 3 + 3?", "6")]
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"question": ["q"]}).to_parquet(bad)
    with pytest.raises(ValueError, match="not a prompt dataset"):
        GSM8KTask(None, path=str(bad))
    with pytest.raises(ValueError, match="no such problem file"):
        GSM8KTask(None, path=str(tmp_path / "missing.parquet"))
    with pytest.raises(ValueError, match="task.name=math needs task.path"):
        build_config("gsm8k-smollm2", "grpo", ["task.name=math"])
    assert build_config("gsm8k-smollm2", "grpo", ["task.name=math", f"task.path={verl}"]).task.name == "math"
