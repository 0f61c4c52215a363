"""Atomic writers: nothing half-written — not on a failed write or rename, not when the writing
process is killed —, ordinary permissions. Each fault check is shown to catch a non-atomic writer."""

import errno
import io
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from entropy_lens.io import writers
from entropy_lens.io.writers import atomic_write_json, atomic_write_parquet, temp_dir


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_written_files_and_folders_get_the_umask_permissions(tmp_path, umask_027):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_parquet(tmp_path / "b.parquet", pd.DataFrame({"x": [1, 2]}))
    d = temp_dir(tmp_path, prefix=".t.")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.parquet").stat().st_mode) == 0o640
    assert stat.S_IMODE(d.stat().st_mode) == 0o750


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "s.json", {"bad": object()})
    with pytest.raises(Exception):
        atomic_write_parquet(tmp_path / "s.parquet", pd.DataFrame({"x": [object()]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
    assert (tmp_path / "s.json").read_text().strip() == '{\n  "ok": true\n}'


def test_json_ready_one_convention_for_non_finite_numbers(tmp_path):
    import json
    import math

    import numpy as np
    import torch

    from entropy_lens.io.tables import finite_or_nan, read_json
    from entropy_lens.io.writers import atomic_write_json, atomic_write_yaml, json_ready

    class Version(str):
        pass

    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "t": torch.tensor([1.0, float("nan")]),
           "n": np.float32(2.0), "v": Version("2.13.0"), "p": tmp_path}
    ready = json_ready(obj)
    assert ready == {"a": None, "b": [None, None, 1.5], "t": [1.0, None], "n": 2.0, "v": "2.13.0", "p": str(tmp_path)}
    assert type(ready["v"]) is str
    atomic_write_json(tmp_path / "s.json", obj)
    back = read_json(tmp_path / "s.json")
    assert back == json.loads(json.dumps(ready)) and math.isnan(finite_or_nan(back["a"]))
    atomic_write_yaml(tmp_path / "c.yaml", obj)  # str subclasses and tensors are representable
    assert "2.13.0" in (tmp_path / "c.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Fault injection: a write or a rename fails midway (disk full, I/O error). The old file or folder
# must stay byte for byte, and no temporary file may be left behind.
# ---------------------------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]
OLD_FRAME = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
NEW_FRAME = pd.DataFrame({"x": np.arange(20_000), "y": np.arange(20_000) * 0.5})


def state(path: Path):
    """What a reader finds at ``path``: ``None`` (absent), a file's bytes, or a folder's
    ``{relative name: bytes, or None for a folder}`` of everything below it, hidden entries included."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _size(content) -> str:
    return "a folder" if content is None else f"{len(content)} bytes"


def changes(before: dict, folder: Path) -> list[str]:
    """How ``folder`` differs from ``before`` (a :func:`state` of it): entries changed, gone, or new
    (a temporary file or folder left behind is a new entry)."""
    after = state(folder)
    out = [f"{n}: changed ({_size(after[n])}, was {_size(b)})" for n, b in before.items() if n in after and after[n] != b]
    out += [f"{n}: gone" for n in before if n not in after]
    out += [f"{n}: left behind" for n in after if n not in before]
    return out


def failed_write_changes(folder: Path, write, fault) -> list[str]:
    """Run ``write()`` with ``fault`` in force; it must fail with an OSError. Returns what the
    failed write changed in ``folder`` (``[]`` for an atomic writer)."""
    before = state(folder)
    with fault, pytest.raises(OSError):
        write()
    return changes(before, folder)


@contextmanager
def full_disk(monkeypatch, at: int = 1):
    """The ``at``-th file write (``Path.write_bytes``/``write_text``, ``DataFrame.to_parquet``) writes
    half its bytes, then fails as on a full disk; the writes before it succeed."""
    real_write, real_parquet, seen = Path.write_bytes, pd.DataFrame.to_parquet, [0]

    def write(path, data: bytes):
        seen[0] += 1
        if seen[0] != at:
            return real_write(Path(path), data)
        real_write(Path(path), data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def to_parquet(self, path, *args, **kwargs):
        buf = io.BytesIO()
        real_parquet(self, buf, *args, **kwargs)
        write(path, buf.getvalue())

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", lambda self, data: write(self, bytes(data)))
        m.setattr(Path, "write_text", lambda self, data, encoding=None, errors=None, newline=None:
                  write(self, data.encode(encoding or "utf-8")))
        m.setattr(pd.DataFrame, "to_parquet", to_parquet)
        yield


@contextmanager
def failing_rename(monkeypatch, at: int = 1):
    """The ``at``-th ``os.replace`` fails (an I/O error); the others work."""
    real, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        seen[0] += 1
        if seen[0] == at:
            raise OSError(errno.EIO, "Input/output error", str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        yield


#: kind → (writer's name in entropy_lens.io.writers, a non-atomic version of it — the mutation
#: "plain write_text / to_parquet" —, old content, new content)
SINGLE = {
    "bytes": ("atomic_write_bytes", lambda p, v: Path(p).write_bytes(v), b"old\n" * 100, bytes(range(256)) * 64),
    "json": ("atomic_write_json", lambda p, v: Path(p).write_text(writers.json_text(v)), {"old": [1, 2]},
             {"new": list(range(2000))}),
    "yaml": ("atomic_write_yaml", lambda p, v: Path(p).write_text(yaml.safe_dump(v)), {"old": 1}, {"new": list(range(2000))}),
    "parquet": ("atomic_write_parquet", lambda p, v: v.to_parquet(p, index=False), OLD_FRAME, NEW_FRAME),
}
FAULTS = {"full_disk": full_disk, "failing_rename": failing_rename}


def single_file_fault(folder: Path, monkeypatch, kind: str, fault: str) -> list[str]:
    """Write the old content with the ``kind`` writer, then the new content with ``fault`` in force;
    returns what the failed write changed in ``folder``. The writer is looked up in
    :mod:`entropy_lens.io.writers` when called, so a replaced (mutated) writer is what runs."""
    name, _, old, new = SINGLE[kind]
    target = folder / f"out.{kind}"
    getattr(writers, name)(target, old)
    return failed_write_changes(folder, lambda: getattr(writers, name)(target, new), FAULTS[fault](monkeypatch))


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", sorted(SINGLE))
def test_write_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, kind, fault):
    assert single_file_fault(tmp_path, monkeypatch, kind, fault) == []
    getattr(writers, SINGLE[kind][0])(tmp_path / f"out.{kind}", SINGLE[kind][3])  # the writer still works
    assert os.listdir(tmp_path) == [f"out.{kind}"]


@pytest.mark.parametrize("kind", sorted(SINGLE))
def test_the_fault_check_catches_a_non_atomic_writer(tmp_path, monkeypatch, kind):
    """Sensitivity: with the writer replaced by a plain write (the mutation), the check above
    reports the half-written file."""
    monkeypatch.setattr(writers, SINGLE[kind][0], SINGLE[kind][1])
    found = single_file_fault(tmp_path, monkeypatch, kind, "full_disk")
    assert len(found) == 1 and found[0].startswith(f"out.{kind}: changed"), found


FILES_OLD = {"a.parquet": OLD_FRAME, "b.json": {"old": True}}
FILES_NEW = {"a.parquet": NEW_FRAME, "b.json": {"new": list(range(500))}, "c.yaml": {"new": 1}, "d.txt": "new\n"}


def one_by_one(folder, files):
    """A file-set writer that renames its temporary files in one after another and does not put
    the old files back when a later rename fails (atomic_write_files before the rollback)."""
    tmps = {}
    try:
        for name, content in files.items():
            tmps[name] = str(Path(folder) / f".{name}.12345678.tmp")
            writers.file_writer(content)(tmps[name])
        for name, tmp in tmps.items():
            os.replace(tmp, Path(folder) / name)
    finally:
        for tmp in tmps.values():
            Path(tmp).unlink(missing_ok=True)


def file_set_fault(folder: Path, monkeypatch, fault: str, at: int) -> list[str]:
    writers.atomic_write_files(folder, FILES_OLD)
    injected = FAULTS[fault](monkeypatch, at=at)
    return failed_write_changes(folder, lambda: writers.atomic_write_files(folder, FILES_NEW), injected)


@pytest.mark.parametrize("fault, at", [("full_disk", 1), ("full_disk", 3), ("failing_rename", 1),
                                       ("failing_rename", 2), ("failing_rename", 4)])
def test_file_set_failing_midway_is_all_or_nothing(tmp_path, monkeypatch, fault, at):
    """A failure in any write or any rename — the 2nd rename comes after a.parquet was already
    renamed into place — leaves every old file as it was and adds nothing (c.yaml, d.txt)."""
    assert file_set_fault(tmp_path, monkeypatch, fault, at) == []
    writers.atomic_write_files(tmp_path, FILES_NEW)
    assert sorted(os.listdir(tmp_path)) == sorted(FILES_NEW)


def test_the_file_set_check_catches_renames_without_rollback(tmp_path, monkeypatch):
    """Sensitivity: the set written file by file (plain writes), or renamed in one by one without
    a rollback, is reported."""
    monkeypatch.setattr(writers, "atomic_write_files", one_by_one)
    found = file_set_fault(tmp_path, monkeypatch, "failing_rename", 2)
    assert len(found) == 1 and found[0].startswith("a.parquet: changed"), found

    def plain(folder, files):
        Path(folder).mkdir(exist_ok=True)
        for name, content in files.items():
            writers.file_writer(content)(str(Path(folder) / name))

    monkeypatch.setattr(writers, "atomic_write_files", plain)
    found = file_set_fault(tmp_path / "plain", monkeypatch, "full_disk", 2)
    assert [f.split(":")[0] for f in found] == ["a.parquet", "b.json"], found  # a new, b half-written


def fill(folder: Path, new: bool) -> None:
    """A checkpoint-like folder: weights (bytes), a JSON file and a parquet table."""
    (folder / "weights.bin").write_bytes(bytes(range(256)) * (64 if new else 1))
    (folder / "state.json").write_text(writers.json_text({"step": 2 if new else 1}))
    (NEW_FRAME if new else OLD_FRAME).to_parquet(folder / "table.parquet")


@contextmanager
def in_place(final, replace=True):
    """A non-atomic folder writer: the old folder deleted, the new one filled where it will stay."""
    final = Path(final)
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    yield final


@contextmanager
def delete_then_rename(final, replace=True):
    """atomic_folder before this check: the old folder deleted first, then the new one renamed in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = writers.temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder_fault(parent: Path, monkeypatch, fault: str, at: int) -> list[str]:
    """A complete old folder ``parent/ckpt``, then a new one written with ``fault`` in force."""
    final = parent / "ckpt"
    with writers.atomic_folder(final) as tmp:
        fill(tmp, new=False)

    def write():
        with writers.atomic_folder(final) as tmp:
            fill(tmp, new=True)

    return failed_write_changes(parent, write, FAULTS[fault](monkeypatch, at=at))


@pytest.mark.parametrize("fault, at", [("full_disk", 2), ("failing_rename", 1), ("failing_rename", 2)])
def test_folder_failing_midway_leaves_the_old_folder_and_no_temporary(tmp_path, monkeypatch, fault, at):
    """A failed write while filling, or a failed rename (of the old folder aside, or of the new
    one into place), leaves the old folder byte for byte and nothing else."""
    assert folder_fault(tmp_path, monkeypatch, fault, at) == []
    with writers.atomic_folder(tmp_path / "ckpt") as tmp:
        fill(tmp, new=True)
    assert os.listdir(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "weights.bin").stat().st_size == 256 * 64


def test_the_folder_check_catches_non_atomic_folder_writers(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "atomic_folder", in_place)
    found = folder_fault(tmp_path / "a", monkeypatch, "full_disk", 2)
    assert "ckpt/weights.bin: changed (16384 bytes, was 256 bytes)" in found and "ckpt/table.parquet: gone" in found
    monkeypatch.setattr(writers, "atomic_folder", delete_then_rename)
    found = folder_fault(tmp_path / "b", monkeypatch, "failing_rename", 1)
    assert "ckpt: gone" in found and "ckpt/weights.bin: gone" in found and len(found) == 4, found


def test_folder_that_exists_is_kept_without_replace(tmp_path):
    final = tmp_path / "cache"
    with writers.atomic_folder(final) as tmp:
        fill(tmp, new=False)
    before = state(tmp_path)
    with writers.atomic_folder(final, replace=False) as tmp:
        fill(tmp, new=True)
    assert state(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# kill -9 while writing: a child process writes through the writer; a patched write (or rename)
# tells the parent through a pipe where it is, then waits; the parent kills it with SIGKILL.
# The target must then be the complete old content (or, between the renames of a folder swap,
# absent or the complete new one) — never partial.
# ---------------------------------------------------------------------------------------------

KILL_BYTES = bytes(range(256)) * 8192  # 2 MiB
KILL_JSON = {"values": list(range(100_000))}
KILL_FRAME = pd.DataFrame({"x": np.arange(200_000), "y": np.arange(200_000) * 0.5})


def write_new(kind: str, target: Path) -> None:
    """The large write the child process is killed in (and the parent's reference of its result);
    every writer is looked up in :mod:`entropy_lens.io.writers` when called."""
    if kind == "bytes":
        writers.atomic_write_bytes(target, KILL_BYTES)
    elif kind == "json":
        writers.atomic_write_json(target, KILL_JSON)
    elif kind == "parquet":
        writers.atomic_write_parquet(target, KILL_FRAME)
    elif kind == "files":
        writers.atomic_write_files(target, {"a.parquet": KILL_FRAME, "b.json": KILL_JSON, "c.bin": KILL_BYTES})
    else:
        with writers.atomic_folder(target) as tmp:
            (tmp / "a.bin").write_bytes(KILL_BYTES)
            (tmp / "b.json").write_text(writers.json_text(KILL_JSON))
            KILL_FRAME.to_parquet(tmp / "c.parquet")


CHILD = r"""
import io, os, shutil, sys, time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from entropy_lens.io import writers
from test_writers import write_new

kind, target, point, nth, plain, fd = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6])
seen = [0]
real_write, real_parquet, real_replace, real_rmtree = Path.write_bytes, pd.DataFrame.to_parquet, os.replace, shutil.rmtree


def reached(what):
    if what != point:
        return False
    seen[0] += 1
    return seen[0] == nth


def wait_for_the_kill():
    os.write(fd, b"!")  # the parent kills us now
    time.sleep(300)
    os._exit(3)


def write(path, data):
    if not reached("write"):
        return real_write(Path(path), data)
    with open(path, "wb") as f:  # half the bytes are on disk when the kill comes
        f.write(data[: len(data) // 2])
        f.flush()
    wait_for_the_kill()


def to_parquet(self, path, *args, **kwargs):
    buf = io.BytesIO()
    real_parquet(self, buf, *args, **kwargs)
    write(path, buf.getvalue())


def replace(src, dst):
    if reached("rename"):
        wait_for_the_kill()
    return real_replace(src, dst)


def rmtree(path, *args, **kwargs):
    if reached("rename"):  # killed while deleting: one file already gone
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        wait_for_the_kill()
    return real_rmtree(path, *args, **kwargs)


Path.write_bytes = lambda self, data: write(self, bytes(data))
Path.write_text = lambda self, data, encoding=None, errors=None, newline=None: write(self, data.encode(encoding or "utf-8"))
pd.DataFrame.to_parquet = to_parquet
os.replace = replace
shutil.rmtree = rmtree

if plain:  # the mutation: non-atomic writers
    writers.atomic_write_bytes = lambda p, data: Path(p).write_bytes(data)
    writers.atomic_write_json = lambda p, obj: Path(p).write_text(writers.json_text(obj))
    writers.atomic_write_parquet = lambda p, frame: frame.to_parquet(p, index=False)

    def files(folder, contents):
        for name, content in contents.items():
            writers.file_writer(content)(str(Path(folder) / name))

    @contextmanager
    def folder(final, replace=True):
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
        yield final

    writers.atomic_write_files, writers.atomic_folder = files, folder

write_new(kind, target)
"""


def write_old(kind: str, target: Path) -> None:
    if kind == "bytes":
        writers.atomic_write_bytes(target, b"old\n" * 1000)
    elif kind == "json":
        writers.atomic_write_json(target, {"old": list(range(1000))})
    elif kind == "parquet":
        writers.atomic_write_parquet(target, OLD_FRAME)
    elif kind == "files":
        writers.atomic_write_files(target, {"a.parquet": OLD_FRAME, "b.json": {"old": 1}, "c.bin": b"old\n"})
    else:
        with writers.atomic_folder(target) as tmp:
            fill(tmp, new=False)


def visible(content):
    """A :func:`state` without hidden entries (the temporary files a kill leaves behind)."""
    if not isinstance(content, dict):
        return content
    return {n: b for n, b in content.items() if not any(part.startswith(".") for part in Path(n).parts)}


def kill_while_writing(tmp_path: Path, kind: str, point: str, nth: int, plain: bool = False) -> tuple[str, bool]:
    """Write old content to ``tmp_path/run/target`` (in this process), then new content in a child
    process that is killed with SIGKILL at the ``nth`` file write (``point="write"``: half of it
    written) or the ``nth`` rename or folder deletion (``"rename"``). Returns (what the target
    holds: "old", "new", "absent" or "partial"; whether the child was killed — it runs to the end
    when it has no ``nth`` such step)."""
    ref = tmp_path / "ref" / "target"
    ref.parent.mkdir(parents=True)
    write_new(kind, ref)
    run = tmp_path / "run"
    run.mkdir()
    target = run / "target"
    write_old(kind, target)
    old, new = state(target), state(ref)

    r, w = os.pipe()
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]  # the child imports write_new from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(target), point, str(nth), "1" if plain else "0", str(w)],
                            pass_fds=(w,), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        said = os.read(r, 1) if ready else b""  # b"" at end of file: the child ended without stopping
    finally:
        os.close(r)
    killed = said == b"!"
    if killed or not ready:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert ready, "the child neither stopped at its kill point nor ended within 120 s"
    assert proc.returncode == (-signal.SIGKILL if killed else 0), err.decode()[-2000:]
    now = visible(state(target))
    assert {p.name for p in run.iterdir() if not p.name.startswith(".")} <= {"target"}  # leftovers are hidden
    if now is None:
        return "absent", killed
    return ("old" if now == visible(old) else "new" if now == visible(new) else "partial"), killed


@pytest.mark.parametrize("kind, nth", [("bytes", 1), ("json", 1), ("parquet", 1), ("files", 2), ("folder", 2)])
def test_kill9_while_writing_leaves_the_old_content(tmp_path, kind, nth):
    """Killed with half of a large file written (files, folder: the second one): the old
    content, complete."""
    assert kill_while_writing(tmp_path, kind, "write", nth) == ("old", True)


@pytest.mark.parametrize("kind", ["bytes", "folder"])
def test_kill9_at_any_rename_never_leaves_a_partial_target(tmp_path, kind):
    """Killed before each rename (and inside each folder deletion) in turn, until the writer has
    none left: the target is always complete — old, new, or (a folder between its two renames)
    absent."""
    seen = []
    for nth in range(1, 8):
        outcome, killed = kill_while_writing(tmp_path / str(nth), kind, "rename", nth)
        seen.append(outcome)
        if not killed:
            break
    assert seen[-1] == "new" and len(seen) >= 2 and "partial" not in seen, seen
    assert kind != "bytes" or seen == ["old", "new"]


@pytest.mark.parametrize("kind, point", [("bytes", "write"), ("parquet", "write"), ("files", "write"), ("folder", "rename")])
def test_the_kill_check_catches_non_atomic_writers(tmp_path, kind, point):
    """Sensitivity: with the writers replaced by plain writes in the child (the mutation), the
    same kill leaves a partial target, and the check reports it."""
    assert kill_while_writing(tmp_path, kind, point, 2 if kind == "files" else 1, plain=True) == ("partial", True)
