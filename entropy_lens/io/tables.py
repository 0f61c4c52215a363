"""Reading the files this toolkit consumes: JSON, JSONL, YAML and parquet.

One home for every reader, with one error type: :class:`InputError` (a ``ValueError``) whose
message is a single line that names the file, the line where there is one, and the problem.
Writers live in :mod:`entropy_lens.io.writers`.

JSON convention for non-finite numbers (everywhere in this project): written as ``null``; read
back as ``None`` (use :func:`finite_or_nan` where a float is wanted).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd


class InputError(ValueError):
    """Bad input file; the message names the file and the problem on one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def _decode(path: Path, raw: bytes, where: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: {where}invalid UTF-8 at byte {exc.start}") from exc


#: A JSON ``\\uXXXX`` escape of a UTF-16 surrogate; a lone one decodes to a str no encoder accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (value or key) in a parsed JSON value that holds a lone surrogate, or None."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if any("\ud800" <= ch <= "\udfff" for ch in x):
                return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def _loads(path: Path, text: str, where: str = "") -> Any:
    """``json.loads`` with InputError for malformed JSON (``where``: e.g. "line 3: " of a JSONL
    file; without it the parser's line is named), nesting too deep to parse, and strings with a
    lone surrogate escape such as ``"\\ud800"`` (valid JSON, but no text: pandas, pyarrow and
    tokenizers cannot encode it)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: {where or f'line {exc.lineno}: '}malformed JSON ({exc.msg})") from exc
    except RecursionError:
        raise InputError(f"{path}: {where}JSON nested too deeply to read") from None
    bad = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(text) else None
    if bad is not None:
        raise InputError(f"{path}: {where}text {json.dumps(bad)[:40]} holds a lone UTF-16 surrogate escape (not valid Unicode)")
    return obj


def read_json(path: str | Path) -> dict[str, Any]:
    """One JSON object from ``path`` (e.g. ``summary.json``); InputError if it is anything else."""
    path = Path(path)
    obj = _loads(path, _decode(path, _read_bytes(path)))
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl_numbered(path: str | Path, tolerate_partial_last: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of a JSON-lines file, one object per non-blank line (1-based).

    ``tolerate_partial_last``: a file that is being appended to (``metrics.jsonl``) may end in an
    incomplete line (no trailing newline, or not valid JSON); it is then dropped instead of
    raising. Every other malformed line raises InputError naming the file and the line number.
    """
    path = Path(path)
    lines = _read_bytes(path).split(b"\n")
    out: list[tuple[int, dict[str, Any]]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        partial_ok = tolerate_partial_last and i == len(lines)  # no newline after it
        try:
            obj = _loads(path, _decode(path, line, f"line {i}: "), f"line {i}: ")
        except InputError:
            if partial_ok:
                break
            raise
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")
        out.append((i, obj))
    return out


def read_jsonl(path: str | Path, tolerate_partial_last: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (:func:`read_jsonl_numbered` without the line numbers)."""
    return [rec for _, rec in read_jsonl_numbered(path, tolerate_partial_last)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a trainer ``metrics.jsonl``, one JSON object per step; none when the file does
    not exist yet.

    The file may be being written: an incomplete last line is ignored. A malformed line
    elsewhere, a non-object or a record without an integer ``step`` raises InputError naming the
    file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = read_jsonl_numbered(path, tolerate_partial_last=True)
    for line, rec in records:
        if not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool):
            raise InputError(f"{path}: line {line}: missing integer 'step'")
    return [rec for _, rec in records]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping (``config.yaml``); an empty file or a non-mapping gives ``{}``."""
    import yaml

    path = Path(path)
    text = _decode(path, _read_bytes(path))
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: malformed YAML ({first_line(exc)})") from exc
    return obj if isinstance(obj, dict) else {}


def read_parquet(path: str | Path) -> pd.DataFrame:
    """A parquet file as a frame (pyarrow)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a parquet file")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path}: cannot read parquet ({first_line(exc)})") from exc


def read_table(path: str | Path) -> pd.DataFrame:
    """A parquet or JSON-lines table, format by suffix (``.json`` is read as JSON lines)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return pd.DataFrame(read_jsonl(path))
    if suffix in (".parquet", ".pq"):
        return read_parquet(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a parquet or JSONL file")
    raise InputError(f"{path}: unknown file type {suffix!r} (expected .parquet or .jsonl)")


def finite_or_nan(x: Any) -> float:
    """A JSON number back as a float: ``None`` (this project's non-finite marker) -> NaN."""
    return float("nan") if x is None else float(x)
