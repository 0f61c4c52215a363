"""Atomic writers: every output file is written to a temporary name and renamed into place."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN written as null), indented."""
    text = json.dumps(json_ready(obj), indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_yaml(path: str | Path, obj: Any) -> None:
    """YAML (config.yaml) of plain values (:func:`json_ready`), keys in the given order."""
    atomic_write_bytes(path, yaml.safe_dump(json_ready(obj), sort_keys=False).encode())


def atomic_write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    """Parquet via pyarrow, written to a temporary file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def versions() -> dict[str, str]:
    """Versions of Python and the main libraries, for config.yaml."""
    out = {"python": platform.python_version()}
    for mod in ("entropy_lens", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional library is recorded as such
            out[mod] = "not installed"
    return out
