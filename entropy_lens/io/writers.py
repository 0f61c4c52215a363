"""Atomic writers: every output file (or folder) is written under a temporary name and renamed
into place, so an interrupted command never leaves a half-written result. One home for writing;
reading is :mod:`entropy_lens.io.tables`."""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import yaml


def json_ready(o: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars/arrays unpacked, paths as text, containers
    recursed, and non-finite floats (NaN, ±inf) as ``None`` — this project's one convention for
    non-finite numbers in JSON (read back with :func:`entropy_lens.io.tables.finite_or_nan`)."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if isinstance(o, (str, Path)):  # str subclasses too (e.g. torch's version string)
        return str(o)
    if hasattr(o, "tolist") and not isinstance(o, (str, bytes)):  # tensors, numpy arrays and scalars
        return json_ready(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_permissions(folder: str | Path) -> None:
    """Give every file under ``folder`` the permissions a plain ``open`` would (0666 minus the
    umask), like :func:`temp_file`: libraries such as ``save_pretrained`` write some files with
    mode 0600 and others with 0644."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def temp_file(folder: str | Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` with the permissions a plain ``open`` would give
    (0666 minus the umask, not mkstemp's 0600), so the renamed result looks like any other file."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def temp_dir(folder: str | Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``folder`` with ``mkdir``'s permissions (0777 minus the umask)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=folder)
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


def _write_via_temp(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it into place;
    on any failure (interrupt included) the temporary file is removed and ``path`` untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    _write_via_temp(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def json_text(obj: Any) -> str:
    """Strict, indented JSON of :func:`json_ready` values (non-finite numbers as ``null``)."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (:func:`json_text`), written atomically."""
    atomic_write_bytes(path, json_text(obj).encode())


def atomic_write_yaml(path: str | Path, obj: Any) -> None:
    """YAML (config.yaml) of plain values (:func:`json_ready`), keys in the given order."""
    atomic_write_bytes(path, yaml.safe_dump(json_ready(obj), sort_keys=False).encode())


def atomic_write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    """Parquet via pyarrow, written to a temporary file and renamed."""
    _write_via_temp(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


def file_writer(obj: Any) -> Callable[[str], None]:
    """How to write ``obj`` to a path by its kind: a frame as parquet, bytes as they are, text as
    UTF-8, anything else as strict JSON (:func:`json_text`)."""
    if isinstance(obj, pd.DataFrame):
        return lambda p: obj.to_parquet(p, index=False)
    if isinstance(obj, bytes):
        return lambda p: Path(p).write_bytes(obj)
    if isinstance(obj, str):
        return lambda p: Path(p).write_text(obj, encoding="utf-8")
    return lambda p: Path(p).write_text(json_text(obj), encoding="utf-8")


def _keep_old(final: Path) -> str | None:
    """A hidden hard link to the file ``final`` (a copy where the file system has no hard links),
    so a set of renames can be undone; ``None`` when ``final`` is not a file."""
    if not final.is_file():
        return None
    keep = str(final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(final, keep)
    except OSError:
        shutil.copy2(final, keep)
    return keep


def atomic_write_files(folder: str | Path, files: dict[str, Any]) -> list[Path]:
    """Write several files of one result into ``folder`` all or nothing.

    ``files``: name → content (:func:`file_writer`: a frame, bytes, text, or a JSON value; a name
    ending in ``.yaml`` is written as YAML). Every file goes to a temporary name first; only when
    all are written are they renamed into place, each old file kept under a hidden name until the
    last rename is done, so an error or interrupt (in a write or a rename) leaves the folder as it
    was. (A kill -9 between two renames can leave some files new and some old; none is ever
    half-written.) Returns the final paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, str] = {}
    kept: dict[str, str | None] = {}  # name → its old file, for every name renamed into place
    try:
        for name, content in files.items():  # one temporary file per output
            fd, tmp = temp_file(folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            tmps[name] = tmp
            if name.endswith(".yaml"):
                Path(tmp).write_text(yaml.safe_dump(json_ready(content), sort_keys=False), encoding="utf-8")
            else:
                file_writer(content)(tmp)
        for name, tmp in tmps.items():
            old = _keep_old(folder / name)
            try:
                os.replace(tmp, folder / name)
            finally:
                kept[name] = old  # removed below (and put back first if this rename failed)
    except BaseException:
        for name, old in reversed(list(kept.items())):  # undo the renames done: old files back
            if old is not None:
                os.replace(old, folder / name)
            elif not os.path.exists(tmps[name]):  # renamed in, and there was no file before
                os.unlink(folder / name)
        raise
    finally:
        for tmp in [*tmps.values(), *(k for k in kept.values() if k is not None)]:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [folder / name for name in files]


@contextmanager
def atomic_folder(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final``; rename it into place on success.

    Yields the temporary folder to fill. On an exception (interrupt included) it is removed and
    ``final`` is untouched. ``replace``: an existing ``final`` is replaced (:func:`_swap_folder`:
    ``final`` is at every moment the complete old folder, absent, or the complete new one); else the
    new folder is discarded when ``final`` already exists (a concurrent writer of the same content won).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        yield tmp
        if replace:
            _swap_folder(tmp, final)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_folder(new: Path, final: Path) -> None:
    """Rename the folder ``new`` to ``final``. An old ``final`` is first renamed aside (one rename,
    never deleted in place), put back when the second rename fails, and deleted once the new
    folder is in place."""
    old = None
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(final))
        old = final.parent / f".{final.name}.{secrets.token_hex(4)}"
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions of Python and the main libraries, for config.yaml."""
    out = {"python": platform.python_version()}
    for mod in ("entropy_lens", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional library is recorded as such
            out[mod] = "not installed"
    return out
