"""Nothing a user types ends in a traceback, a wrong number or a poisoned folder.

Every command as a careless or hostile user runs it: output folders that are files, below files,
read-only or being written by another command; options out of range; pickle-only and corrupt
checkpoints; folders that hold another run; full disks; bugs; Ctrl-C. Each case asserts the exit
code, ONE line on stderr naming the culprit (file or option), no traceback, and no output left.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import arithmetic_rows, write_rollouts
from typer.testing import CliRunner

from entropy_lens.io import writers
from entropy_lens.io.lock import LOCK_NAME, folder_lock
from entropy_lens_cli import common
from entropy_lens_cli.app import app

runner = CliRunner()
FOLDER_COMMANDS = ["validate", "analyze", "compare", "train", "demo"]


# ---------------------------------------------------------------------------------------------
# helpers and inputs
# ---------------------------------------------------------------------------------------------


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line(res, code: int, *needles: str, after_progress: bool = False) -> str:
    """Exit ``code``, exactly one line on stderr containing every needle, no traceback.
    ``after_progress``: the command got as far as its progress bars (also on stderr); the message
    is then the one ``error:`` line, and the last line."""
    err = res.stderr.strip()
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = err.splitlines()
    if after_progress:
        assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
        err = lines[-1]
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in res.output
    return err


def files_under(path: Path) -> list[str]:
    """Every file below ``path`` (relative names), or [] when it does not exist."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module", autouse=True)
def quiet():
    """What the entry point does first: no progress bars of transformers' own on stderr."""
    common.quiet_libraries()


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    return write_rollouts(tmp_path_factory.mktemp("roll") / "r.jsonl", arithmetic_rows())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, rollouts) -> dict[str, Path]:
    """One finished run folder per command that makes one cheaply: validate, analyze, compare."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("validate", "analyze", "compare")}
    assert invoke("validate", "--model", tiny_model_dir, "--rollouts", rollouts, "--lr", "0.05", "--no-jvp",
                  "-o", out["validate"]).exit_code == 0
    assert invoke("analyze", "--model", tiny_model_dir, "--rollouts", rollouts, "--no-figures",
                  "-o", out["analyze"]).exit_code == 0
    assert invoke("compare", out["validate"] / "tokens.parquet", "-m", "grpo", "-o", out["compare"]).exit_code == 0
    return out


def command_args(command: str, out: Path, model: Path, rollouts: Path, tokens: Path) -> list:
    """A valid command line of ``command`` writing to ``out`` (the tiny model, small settings)."""
    return {
        "validate": ["validate", "--model", model, "--rollouts", rollouts, "--lr", "0.05", "--no-jvp", "-o", out],
        "analyze": ["analyze", "--model", model, "--rollouts", rollouts, "--no-figures", "-o", out],
        "compare": ["compare", tokens, "-m", "grpo", "-o", out],
        "train": ["train", "--steps", "1", "-o", out],
        "demo": ["demo", "--prompts", "1", "-n", "1", "--max-new-tokens", "2", "-o", out],
        "sample": ["sample", "--model", model, "--prompts", "1", "-n", "1", "--max-new-tokens", "2", "-o", out],
    }[command]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading any model is a bug in these tests: the folder must be refused before."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr("entropy_lens.model.load.load_model", refuse)


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with pickle-format weights only (pytorch_model.bin)."""
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("pickle_model")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")
    return d


@pytest.fixture(scope="module")
def corrupt_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with a truncated safetensors file."""
    d = tmp_path_factory.mktemp("corrupt_model")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    return d


# ---------------------------------------------------------------------------------------------
# 1. output paths: an existing file, a path below a file, a folder that cannot be written
# ---------------------------------------------------------------------------------------------


def _raise_on_temp_file(monkeypatch, code: int) -> None:
    """Every write through io.writers (the probe included) fails with ``code`` (EROFS, EACCES)."""

    def fail(folder, prefix, suffix=""):
        raise OSError(code, os.strerror(code), str(Path(folder) / f"{prefix}abcd1234{suffix}"))

    monkeypatch.setattr(writers, "temp_file", fail)


@pytest.mark.parametrize("command", FOLDER_COMMANDS)
@pytest.mark.parametrize("case", ["existing file", "below a file", "EROFS", "EACCES"])
def test_unusable_output_folder_is_refused_before_any_work(
    tmp_path, tiny_model_dir, rollouts, runs, no_model_load, monkeypatch, command, case
):
    blocker = tmp_path / "blocker"
    blocker.write_text("precious")
    out = {"existing file": blocker, "below a file": blocker / "sub"}.get(case, tmp_path / "new" / "out")
    if case in ("EROFS", "EACCES"):
        _raise_on_temp_file(monkeypatch, getattr(errno, case))
    res = invoke(*command_args(command, out, tiny_model_dir, rollouts, runs["validate"] / "tokens.parquet"))
    reason = {"existing file": "is a file, not a folder", "below a file": f"{blocker} is a file, not a folder",
              "EROFS": "read-only file system", "EACCES": "permission denied"}[case]
    assert_one_line(res, 2, f"-o {out}", reason)
    assert blocker.read_text() == "precious"
    assert not (tmp_path / "new").exists()  # the folders it made for the run are gone again


@pytest.mark.parametrize("case", ["existing folder", "below a file", "EROFS"])
def test_sample_output_file_is_checked_before_loading(tmp_path, tiny_model_dir, no_model_load, monkeypatch, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("precious")
    out = {"existing folder": tmp_path / "x.parquet", "below a file": blocker / "r.parquet"}.get(case, tmp_path / "r.parquet")
    if case == "existing folder":
        out.mkdir()
    if case == "EROFS":
        _raise_on_temp_file(monkeypatch, errno.EROFS)
    res = invoke(*command_args("sample", out, tiny_model_dir, None, None))
    reason = {"existing folder": "is a folder, not a file", "below a file": f"{blocker} is a file, not a folder",
              "EROFS": "read-only file system"}[case]
    assert_one_line(res, 2, f"-o {out}", reason)
    assert files_under(tmp_path) == ["blocker"]


def _chmod_read_only(folder: Path) -> None:
    """Make ``folder`` read-only; skip when that does not stop writes (running as root)."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return
    probe.unlink()
    folder.chmod(0o755)
    pytest.skip("chmod does not stop writes here (running as root); EROFS/EACCES are covered by monkeypatching")


@pytest.mark.parametrize("command", ["validate", "sample"])
def test_read_only_folder(tmp_path, tiny_model_dir, rollouts, no_model_load, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    _chmod_read_only(ro)
    try:
        out = ro / ("run" if command == "validate" else "r.parquet")
        res = invoke(*command_args(command, out, tiny_model_dir, rollouts, None))
        assert_one_line(res, 2, f"-o {out}", "permission denied")
        assert files_under(ro) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# 4. options: uniform messages, before anything is created
# ---------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("validate", ["--micro-batch", "0"], "--micro-batch must be an integer >= 1, got 0"),
    ("validate", ["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    ("validate", ["--lr", "0"], "--lr must be > 0"),
    ("validate", ["--max-samples", "-1"], "--max-samples must be an integer >= 1, got -1"),
    ("validate", ["--max-samples", "0"], "--max-samples must be an integer >= 1, got 0"),
    ("validate", ["--temperature", "nan"], "--temperature must be > 0 and finite, got nan"),
    ("validate", ["--eps-low", "-1"], "--eps-low must be >= 0"),
    ("validate", ["--optimizer", "lion"], "--optimizer must be sgd or adamw, got 'lion'"),
    ("analyze", ["--micro-batch", "0"], "--micro-batch must be an integer >= 1, got 0"),
    ("analyze", ["--shard-size", "0"], "--shard-size must be an integer >= 1, got 0"),
    ("analyze", ["--temperature", "0"], "--temperature must be > 0 and finite, got 0.0"),
    ("analyze", ["--advantage", "ppo"], "--advantage must be grpo, dr_grpo, rloo or opo, got 'ppo'"),
    ("analyze", ["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    ("analyze", ["--eps-high", "nan"], "--eps-high must be >= 0"),
    ("sample", ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    ("sample", ["--temperature", "inf"], "--temperature must be > 0 and finite, got inf"),
    ("sample", ["--prompts", "-1"], "--prompts must be an integer >= 1, got -1"),
    ("sample", ["-n", "0"], "-n must be an integer >= 1, got 0"),
    ("sample", ["--convention", "x"], "--convention must be pm1 or 01, got 'x'"),
    ("compare", ["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    ("train", ["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    ("demo", ["--prompts", "0"], "--prompts must be an integer >= 1, got 0"),
    ("demo", ["--lr", "-1"], "--lr must be > 0 and finite, got -1.0"),
]


@pytest.mark.parametrize("command, extra, message", BAD_OPTIONS, ids=[f"{c}{''.join(e)}" for c, e, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_creates_nothing(tmp_path, tiny_model_dir, rollouts, no_model_load, command, extra, message):
    out = tmp_path / ("r.parquet" if command == "sample" else "out")
    args = command_args(command, out, tiny_model_dir, rollouts, tmp_path / "t.parquet")
    assert_one_line(invoke(*args[:-2], *extra, *args[-2:]), 2, message)
    assert not out.exists()


def test_analyze_library_checks_settings_before_writing_a_manifest(tmp_path, tiny_model_dir, rollouts):
    from entropy_lens.io.rollouts import load_rollouts
    from entropy_lens.model.load import load_model
    from entropy_lens.pipelines.analyze import AnalyzeSettings, run_analyze

    model, tok = load_model(tiny_model_dir)
    frame = load_rollouts(rollouts)
    for bad in ({"temperature": 0.0}, {"micro_batch": 0}, {"shard_size": 0}, {"advantage": "ppo"},
                {"lr": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            run_analyze(model, tok, frame, AnalyzeSettings(**bad), tmp_path / "out" / "shards")
        assert not (tmp_path / "out").exists()
    res = invoke(*command_args("analyze", tmp_path / "out", tiny_model_dir, rollouts, None))
    assert res.exit_code == 0, res.output  # nothing poisoned the folder


def test_demo_says_when_it_has_fewer_problems_than_asked(tmp_path, monkeypatch):
    monkeypatch.setattr("entropy_lens_cli.demo_cmd.load_checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here")))
    res = invoke("demo", "--prompts", "6", "-o", tmp_path / "demo")
    assert "note: the shipped gsm8k-demo set has 2 problems; using all 2 (--prompts 6)" in res.stdout
    assert_one_line(res, 2, "stop here")
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------------------------------------
# 7. a folder that holds another command's run, or a run with other options
# ---------------------------------------------------------------------------------------------

OTHER_RUNS = [("analyze", "validate"), ("validate", "analyze"), ("compare", "validate"), ("validate", "compare"),
              ("train", "validate"), ("demo", "analyze")]


@pytest.mark.parametrize("command, held", OTHER_RUNS)
def test_folder_of_another_commands_run_is_refused(tiny_model_dir, rollouts, runs, no_model_load, command, held):
    out = runs[held]
    before = {f: (out / f).stat().st_mtime_ns for f in files_under(out)}
    res = invoke(*command_args(command, out, tiny_model_dir, rollouts, runs["validate"] / "tokens.parquet"))
    assert_one_line(res, 2, f"-o {out}", "holds a different run", f"entropy-lens {held}")
    assert {f: (out / f).stat().st_mtime_ns for f in files_under(out)} == before


@pytest.mark.parametrize("command, extra, option", [
    ("validate", ["--lr", "0.01"], "--lr 0.05 → 0.01"),
    ("analyze", ["--advantage", "rloo"], "--advantage grpo → rloo"),
    ("compare", ["-m", "steer"], "--method ['grpo'] → ['grpo', 'steer']"),
])
def test_same_command_with_other_options_is_refused(tiny_model_dir, rollouts, runs, no_model_load, command, extra, option):
    out = runs[command]
    before = files_under(out)
    args = command_args(command, out, tiny_model_dir, rollouts, runs["validate"] / "tokens.parquet")
    assert_one_line(invoke(*args[:-2], *extra, *args[-2:]), 2, f"-o {out}", "holds a different run", option)
    assert files_under(out) == before


def test_same_command_with_same_options_reruns(tmp_path, tiny_model_dir, rollouts):
    out = tmp_path / "v"
    args = command_args("validate", out, tiny_model_dir, rollouts, None)
    assert invoke(*args).exit_code == 0
    res = invoke(*args[:-2], "--micro-batch", "2", *args[-2:])  # micro-batch does not change the result
    assert res.exit_code == 0, res.output
    assert files_under(out) == ["config.yaml", "summary.json", "tokens.parquet"]


def test_foreign_config_is_not_overwritten(tmp_path, tiny_model_dir, rollouts, no_model_load):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("learning_rate: 3\n")
    res = invoke(*command_args("validate", out, tiny_model_dir, rollouts, None))
    assert_one_line(res, 2, f"-o {out}", "did not write")
    assert (out / "config.yaml").read_text() == "learning_rate: 3\n"


# ---------------------------------------------------------------------------------------------
# 3. one writer per run folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_second_writer_is_refused(tmp_path, tiny_model_dir, rollouts, runs, no_model_load, command):
    out = tmp_path / "busy"
    out.mkdir()
    with folder_lock(out):
        res = invoke(*command_args(command, out, tiny_model_dir, rollouts, runs["validate"] / "tokens.parquet"))
        assert_one_line(res, 2, f"{out}: another entropy-lens command is writing here (pid {os.getpid()})")
        assert files_under(out) == [LOCK_NAME]
    assert files_under(out) == []  # released: the lock file is gone


def test_lock_is_released_and_reacquired(tmp_path):
    with folder_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())
    with folder_lock(tmp_path):
        pass
    assert not (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# 5. --allow-pickle wherever a model is loaded; corrupt checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sample", "analyze", "analyze --next-model", "validate", "compare --measure"])
def test_pickle_only_model_names_the_option_the_command_has(tmp_path, tiny_model_dir, rollouts, runs, pickle_model, command):
    out = tmp_path / ("r.parquet" if command == "sample" else "out")
    tokens = runs["validate"] / "tokens.parquet"
    args = command_args(command.split()[0], out, pickle_model, rollouts, tokens)
    if command == "analyze --next-model":
        args = command_args("analyze", out, tiny_model_dir, rollouts, tokens)[:-2] + ["--next-model", pickle_model, "-o", out]
    if command == "compare --measure":
        args = args[:-2] + ["--measure", "--model", pickle_model, "--rollouts", rollouts, "-o", out]
    assert_one_line(invoke(*args), 2, str(pickle_model), "pass --allow-pickle")
    assert files_under(out) == []
    assert "--allow-pickle" in invoke(command.split()[0], "--help").stdout


def test_sample_loads_a_pickle_model_with_allow_pickle(tmp_path, pickle_model):
    out = tmp_path / "r.jsonl"
    res = invoke(*command_args("sample", out, pickle_model, None, None)[:-2], "--allow-pickle", "-o", out)
    assert res.exit_code == 0, res.output
    assert len(pd.read_json(out, lines=True)) == 1


@pytest.mark.parametrize("command", ["validate", "analyze", "sample"])
def test_corrupt_safetensors_is_one_line_naming_the_model(tmp_path, rollouts, corrupt_model, command):
    out = tmp_path / ("r.parquet" if command == "sample" else "out")
    res = invoke(*command_args(command, out, corrupt_model, rollouts, None))
    assert_one_line(res, 2, str(corrupt_model), "safetensors")  # the loader names the file, or the CLI --model
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 8. and the boundary: errors at write time, non-finite numbers, bugs, --debug
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, final", [("validate", "tokens.parquet"), ("compare", "compare.parquet")])
def test_full_disk_names_the_final_file_not_the_temporary_one(tmp_path, tiny_model_dir, rollouts, runs, monkeypatch,
                                                              command, final):
    real = pd.DataFrame.to_parquet

    def full(self, path, *a, **k):
        if Path(path).name.startswith("."):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    out = tmp_path / "out"
    res = invoke(*command_args(command, out, tiny_model_dir, rollouts, runs["validate"] / "tokens.parquet"))
    err = assert_one_line(res, 2, f"{out / final}: no space left on device", after_progress=True)
    assert f".{final}." not in err
    assert not out.exists()  # no temporary files, no lock file, no empty folder


@pytest.mark.parametrize("text, public", [
    ("/r/.tokens.parquet.ab12cd_9.tmp: no space", "/r/tokens.parquet: no space"),
    ("cannot write '/r/.rollouts.parquet.x1y2z3w4'", "cannot write '/r/rollouts.parquet'"),
    ("ckpt/.step_000002.k2j3h4g5 exists", "ckpt/step_000002 exists"),
    ("/r/.entropy-lens.lock and .config.yaml stay", "/r/.entropy-lens.lock and .config.yaml stay"),
])
def test_temporary_names_are_mapped_to_final_ones(text, public):
    assert common.public_text(text) == public


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                          (errno.ENOTDIR, "a part of the path is a file, not a folder"), (errno.EEXIST, "already exists"),
                                          (errno.ENOSPC, "no space left on device")])
def test_every_os_error_is_one_line_naming_the_file(code, reason):
    exc = OSError(code, os.strerror(code), "/runs/a/.summary.json.abcd1234.tmp")
    assert common.public_text(common.expected_error(exc)) == f"/runs/a/summary.json: {reason}"


def _break_validate(monkeypatch, exc: BaseException) -> None:
    def broken(*a, **k):
        raise exc

    monkeypatch.setattr("entropy_lens.pipelines.validate.run_validate", broken)


@pytest.mark.parametrize("exc, message", [
    (FloatingPointError("loss is nan"), "non-finite number: loss is nan"),
    (ValueError("r.jsonl: row 3: bad"), "r.jsonl: row 3: bad"),
])
def test_expected_failures_exit_2(tmp_path, tiny_model_dir, rollouts, monkeypatch, exc, message):
    _break_validate(monkeypatch, exc)
    out = tmp_path / "out"
    assert_one_line(invoke(*command_args("validate", out, tiny_model_dir, rollouts, None)), 2, message,
                    after_progress=True)
    assert not out.exists()


def test_a_bug_is_one_line_asking_for_a_report(tmp_path, tiny_model_dir, rollouts, monkeypatch):
    _break_validate(monkeypatch, TypeError("unsupported operand"))
    out = tmp_path / "out"
    err = assert_one_line(invoke(*command_args("validate", out, tiny_model_dir, rollouts, None)), 1,
                          "internal error", "TypeError: unsupported operand", "bug",
                          "please report this with the command you ran", "--debug", after_progress=True)
    assert "Traceback" not in err and not out.exists()


def test_debug_shows_the_traceback_of_a_bug(tmp_path, tiny_model_dir, rollouts, monkeypatch):
    _break_validate(monkeypatch, TypeError("unsupported operand"))
    res = invoke("--debug", *command_args("validate", tmp_path / "out", tiny_model_dir, rollouts, None))
    assert res.exit_code == 1
    assert "Traceback" in res.stderr and "TypeError: unsupported operand" in res.stderr
    assert "please report this with the command you ran" in res.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# 6. Ctrl-C: "interrupted", exit 130, nothing left
# ---------------------------------------------------------------------------------------------


def test_keyboard_interrupt_in_a_command(tmp_path, tiny_model_dir, rollouts, monkeypatch):
    _break_validate(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out"
    res = invoke(*command_args("validate", out, tiny_model_dir, rollouts, None))
    assert res.exit_code == 130 and res.stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in res.output
    assert not out.exists()


def test_sigint_prints_interrupted_and_exits_130(tmp_path, tiny_model_dir):
    """The real entry point in a subprocess, interrupted while it waits for its input (a FIFO
    nobody writes): exit 130, ``interrupted`` on stderr, no traceback, no output folder."""
    fifo = tmp_path / "rollouts.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    # the console-script entry point; Ctrl-C handled even where the test runner ignores SIGINT
    entry = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from entropy_lens_cli.app import main; sys.argv[0] = 'entropy-lens'; main()")
    cmd = [sys.executable, "-c", entry, "validate", "--model", str(tiny_model_dir), "--rollouts", str(fifo), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():  # it holds the folder and waits for its rollouts
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command did not reach its input"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists()


def test_a_loader_error_that_names_nothing_is_named_by_the_option(tmp_path, tiny_model_dir, rollouts, monkeypatch):
    from safetensors import SafetensorError

    def raw(*a, **k):
        raise SafetensorError("Error while deserializing header: header too small")

    monkeypatch.setattr("entropy_lens.model.load.load_model", raw)
    res = invoke("analyze", "--model", tiny_model_dir, "--next-model", "later", "--rollouts", rollouts, "-o", tmp_path / "a")
    assert_one_line(res, 2, f"--model {tiny_model_dir}: cannot load the model (invalid safetensors file", "header too small")
    assert not (tmp_path / "a").exists()
