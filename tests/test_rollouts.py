"""The rollout reader's schema (io/rollouts.py, io/tables.py): every bad cell is a one-line
InputError ``FILE: row R: column C: problem``; good files read exactly. Property-based tests
throw malformed files at ``load_rollouts`` + ``tokenize_rollouts`` + ``old_logp_grid`` and
require success or an InputError naming the file, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import arithmetic_rows, make_tokenizer, write_rollouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entropy_lens.io.rollouts import (
    LOGP_TOLERANCE,
    MAX_ABS_REWARD,
    MIN_LOGP,
    load_rollouts,
    old_logp_grid,
    tokenize_rollouts,
    validate_rollouts,
)
from entropy_lens.io.tables import InputError

TOK = make_tokenizer()
VOCAB = len(TOK)


def exact_rows() -> list[dict]:
    """arithmetic_rows with exact prompt/response ids and one old_logp per response token."""
    rows = arithmetic_rows()
    for r in rows:
        r["prompt_ids"] = [2, 4, 10, 11, 3, 2, 5]
        r["response_ids"] = TOK(r["response"], add_special_tokens=False)["input_ids"]
        r["old_logp"] = [-0.5 - 0.1 * j for j in range(len(r["response_ids"]))]
    return rows


def read_all(path: Path):
    """What every pipeline reads: the validated frame, its token ids and the old_logp grid."""
    df = load_rollouts(path)
    tok = tokenize_rollouts(df, TOK, path)
    grid = old_logp_grid(df, [len(r) for r in tok.response_ids], path)
    return df, tok, grid


def assert_one_line_error(exc: BaseException, path: Path, *needles: str) -> None:
    msg = str(exc)
    assert isinstance(exc, InputError), f"{type(exc).__name__}: {msg}"
    assert "\n" not in msg and msg.startswith(f"{path}:"), msg
    for n in needles:
        assert n in msg, msg


def fails(path: Path, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        read_all(path)
    assert_one_line_error(info.value, path, *needles)
    return str(info.value)


# ------------------------------------------------------------------------------ the schema, case by case


def test_exact_ids_and_old_logp_read_exactly(tmp_path):
    rows = exact_rows()
    rows[0]["response_ids"] = [float(x) for x in rows[0]["response_ids"]]  # integral floats are ids
    rows[1]["old_logp"][0] = LOGP_TOLERANCE / 2  # rounding above 0 is accepted
    path = write_rollouts(tmp_path / "r.jsonl", rows)
    df, tok, grid = read_all(path)
    assert not tok.retokenized
    assert tok.response_ids == [TOK(r["response"], add_special_tokens=False)["input_ids"] for r in rows]
    assert all(type(x) is int for ids in tok.response_ids + tok.prompt_ids for x in ids)
    assert grid.shape == (len(rows), max(len(r) for r in tok.response_ids))
    assert df["reward"].dtype == np.float64
    pq_path = tmp_path / "r.parquet"
    pd.DataFrame(exact_rows()).to_parquet(pq_path)
    assert read_all(pq_path)[1].response_ids == tok.response_ids


BAD_CELLS = [
    # (row, column, value, needles)
    (0, "response_ids", [7.5, 8], ("row 0: column response_ids", "element 0 is 7.5", "not an integer")),
    (0, "response_ids", "123", ("row 0: column response_ids", "text '123'", "not split into ids")),
    (1, "prompt_ids", [float("nan"), 4], ("row 1: column prompt_ids", "element 0 is nan")),
    (1, "prompt_ids", ["7", 8], ("row 1: column prompt_ids", "element 0 is text '7'")),
    (1, "prompt_ids", [True, 8], ("row 1: column prompt_ids", "boolean")),
    (1, "prompt_ids", [3, [4]], ("row 1: column prompt_ids", "element 1 is list")),
    (1, "prompt_ids", [3, -1], ("row 1: column prompt_ids", "element 1 is -1")),
    (1, "prompt_ids", [3, 10**30], ("row 1: column prompt_ids", "element 1 is 1000000", "too large to be a token id")),
    (1, "prompt_ids", [3, 2**40], ("row 1: column prompt_ids", "outside the tokenizer's vocabulary")),
    (2, "response_ids", [3, VOCAB], ("row 2: column response_ids", f"token id {VOCAB}", "vocabulary")),
    (2, "response_ids", [], ("row 2: empty response", "response_ids")),
    (2, "prompt_ids", [], ("row 2: column prompt_ids", "empty")),
    (2, "response_ids", None, ("row 2: column response_ids", "missing")),
    (3, "old_logp", [0.5] * 5, ("row 3: column old_logp", "0.5 > 0", "<= 0")),
    (3, "old_logp", [-1.0], ("row 3: column old_logp", "1 value for")),
    (3, "old_logp", ["-0.5"], ("row 3: column old_logp", "text '-0.5'")),
    (3, "old_logp", [float("-inf")], ("row 3: column old_logp", "-inf", "finite")),
    (3, "old_logp", [-1e300] * 5, ("row 3: column old_logp", "-1e+300 < -1000")),
    (3, "old_logp", {"a": 1}, ("row 3: column old_logp", "dict")),
    (4, "reward", 1e308, ("row 4: column reward", "1e+308", f"{MAX_ABS_REWARD:g}")),
    (4, "reward", -(10**400), ("row 4: column reward", f"{MAX_ABS_REWARD:g}")),
    (4, "reward", float("nan"), ("row 4: column reward", "missing")),
    (4, "reward", float("inf"), ("row 4: column reward", "inf", "finite")),
    (4, "reward", "1.0", ("row 4: column reward", "text '1.0'", "expected a number")),
    (4, "reward", True, ("row 4: column reward", "boolean")),
    (5, "prompt", {"role": "user"}, ("row 5: column prompt", "dict")),
    (5, "prompt", [{"role": "user", "content": 3}], ("row 5: column prompt", "message 0")),
    (5, "prompt", [], ("row 5: column prompt", "empty list")),
    (5, "response", 42, ("row 5: column response", "int 42", "expected text")),
    (6, "group", [1, 2], ("row 6: column group", "list")),
    (6, "group", None, ("row 6: column group", "missing")),
]


@pytest.mark.parametrize("row,column,value,needles", BAD_CELLS, ids=[f"{c}-{i}" for i, (_, c, *_) in enumerate(BAD_CELLS)])
def test_bad_cell_is_one_line_naming_file_row_and_column(tmp_path, row, column, value, needles):
    rows = exact_rows()
    for r in rows:
        r["group"] = r["prompt"]
    rows[row][column] = value
    if column == "response_ids" and isinstance(value, list) and value:
        rows[row]["old_logp"] = [-1.0] * len(value)  # only the ids are wrong
    fails(write_rollouts(tmp_path / "r.jsonl", rows), *needles)


@pytest.mark.parametrize(
    "column,arrow_type,values,needle",
    [
        ("response_ids", pa.list_(pa.float64()), [[7.0, 8.25]], "element 1 is 8.25"),
        ("response_ids", pa.list_(pa.string()), [["1", "2"]], "element 0 is text '1'"),
        ("response_ids", pa.string(), ["123"], "text '123'"),
        ("response_ids", pa.list_(pa.list_(pa.int64())), [[[7], [8]]], "element 0 is ndarray"),
        ("reward", pa.string(), ["1.0"], "row 0: column reward: is text '1.0'"),
        ("reward", pa.bool_(), [True], "row 0: column reward: is a boolean"),
        ("reward", pa.float64(), [None], "row 0: column reward: missing"),
        ("old_logp", pa.list_(pa.float64()), [[0.7]], "row 0: column old_logp: element 0 is 0.7 > 0"),
    ],
)
def test_bad_parquet_column_types(tmp_path, column, arrow_type, values, needle):
    cols = {"prompt": ["what is 1 ?"], "response": ["so 1"], "reward": [1.0], "prompt_ids": [[2, 4, 10]],
            "response_ids": [[35, 8]], "old_logp": [[-1.0, -2.0]]}
    table = pa.table({**{k: pa.array(v) for k, v in cols.items()}, column: pa.array(values, type=arrow_type)})
    path = tmp_path / "r.parquet"
    pq.write_table(table, path)
    fails(path, needle)


def test_ids_come_in_pairs(tmp_path):
    rows = exact_rows()
    for r in rows:
        del r["prompt_ids"]
    msg = fails(write_rollouts(tmp_path / "r.jsonl", rows), "column response_ids without prompt_ids")
    assert "old_logp" not in msg  # the old message blamed old_logp's length after re-tokenising
    rows = exact_rows()
    for r in rows:
        del r["response_ids"]
    fails(write_rollouts(tmp_path / "s.jsonl", rows), "column prompt_ids without response_ids")


def test_empty_files_say_they_have_no_rows(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    fails(empty, "no rows (the file is empty)")
    blank = tmp_path / "b.jsonl"
    blank.write_text("\n  \n")
    fails(blank, "no rows")
    no_rows = tmp_path / "n.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "response": pd.Series([], dtype=str),
                  "reward": pd.Series([], dtype=float)}).to_parquet(no_rows)
    fails(no_rows, "no rows")


def test_retokenised_old_logp_length_says_why(tmp_path):
    rows = arithmetic_rows()
    for r in rows:
        r["old_logp"] = [-1.0, -2.0]  # the responses have more tokens
    fails(write_rollouts(tmp_path / "r.jsonl", rows), "row 0: column old_logp", "re-tokenised")


def test_jsonl_hostile_lines(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(b'{"prompt": "a", "response": "1", "reward": 1}\n' + b"[" * 100_000 + b"\n")
    fails(deep, "line 2", "nested too deeply")
    lone = tmp_path / "lone.jsonl"
    lone.write_bytes(b'{"prompt": "a", "response": "1", "reward": 1}\n{"prompt": "\\ud800", "response": "1", "reward": 1}\n')
    fails(lone, "line 2", "surrogate")
    pair = tmp_path / "pair.jsonl"  # an escaped surrogate pair is a real character
    pair.write_bytes(b'{"prompt": "\\ud83d\\ude00 1", "response": "1", "reward": 1}\n')
    assert load_rollouts(pair)["prompt"][0] == "\U0001F600 1"
    bad_utf8 = tmp_path / "u.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a", "response": "\xff", "reward": 1}\n')
    fails(bad_utf8, "line 1", "invalid UTF-8")


def test_verl_dump_errors_name_the_dump_column(tmp_path):
    line = {"input": "<|im_start|> user 1 <|im_end|>", "output": "so 1", "gts": "1", "score": "high", "step": 3}
    path = tmp_path / "3.jsonl"
    path.write_text(json.dumps(line) + "\n")
    fails(path, "row 0: column score: is text 'high'")
    msg = str(pytest.raises(InputError, load_rollouts, tmp_path).value)  # the folder form names the file
    assert msg.startswith(f"{path}: row 0: column score")


def test_validate_is_idempotent(tmp_path):
    df = load_rollouts(write_rollouts(tmp_path / "r.jsonl", exact_rows()))
    again = validate_rollouts(df.head(5), "r.jsonl")
    pd.testing.assert_frame_equal(again, df.head(5))


# ------------------------------------------------------------------------------ property-based

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
COLUMNS = ("prompt", "response", "reward", "group", "prompt_ids", "response_ids", "old_logp", "ground_truth")
WORDS = ["so", "is", "the", "+", "="] + [str(i) for i in range(20)]


@st.composite
def valid_rows(draw) -> list[dict]:
    """1–6 rows that satisfy the schema, with exact ids (sometimes as integral floats)."""
    n = draw(st.integers(1, 6))
    exact, chat, as_float = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    rows = []
    for _ in range(n):
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
        prompt = [{"role": "user", "content": draw(st.sampled_from(WORDS))}] if chat else draw(st.sampled_from(WORDS))
        row = {"prompt": prompt,
               "response": " ".join(words),
               "reward": draw(st.floats(-MAX_ABS_REWARD, MAX_ABS_REWARD, allow_nan=False))}
        if exact:
            ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
            row["prompt_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6))
            row["response_ids"] = [float(x) for x in ids] if as_float else ids
            row["old_logp"] = draw(st.lists(st.floats(MIN_LOGP, 0), min_size=len(ids), max_size=len(ids)))
        rows.append(row)
    return rows


def _check(path: Path) -> None:
    """read_all succeeds with sane output, or raises a one-line InputError naming ``path``."""
    try:
        df, tok, grid = read_all(path)
    except ValueError as exc:
        assert_one_line_error(exc, path)
        return
    assert len(tok.response_ids) == len(df) and all(tok.response_ids)
    assert all(0 <= x < VOCAB and type(x) is int for ids in tok.prompt_ids + tok.response_ids for x in ids)
    if "reward" in df:
        assert (np.abs(df["reward"].to_numpy(np.float64)) <= MAX_ABS_REWARD).all()
    if grid is not None:
        g = grid.numpy()
        assert np.isfinite(g).all() and (g <= LOGP_TOLERANCE).all() and (g >= MIN_LOGP).all()


PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(rows=valid_rows(), suffix=st.sampled_from([".jsonl", ".parquet"]))
def test_valid_rollouts_always_read(rows, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = write_rollouts(Path(d) / f"r{suffix}", rows)
        df, tok, grid = read_all(path)
    if "response_ids" in rows[0]:
        assert tok.response_ids == [[int(x) for x in r["response_ids"]] for r in rows]
        for i, r in enumerate(rows):
            np.testing.assert_allclose(grid[i, : len(r["old_logp"])].numpy(), r["old_logp"], rtol=1e-6, atol=1e-30)
    np.testing.assert_array_equal(df["reward"].to_numpy(), [r["reward"] for r in rows])


@PROPERTY
@given(rows=valid_rows(), row=st.integers(0, 5), column=st.sampled_from(COLUMNS), junk=JUNK)
def test_one_junk_cell_is_read_or_refused_in_one_line(rows, row, column, junk):
    rows[row % len(rows)][column] = junk
    with tempfile.TemporaryDirectory() as d:
        _check(write_rollouts(Path(d) / "r.jsonl", rows))


@PROPERTY
@given(rows=st.lists(st.dictionaries(st.sampled_from(COLUMNS), JUNK, max_size=len(COLUMNS)), max_size=4))
def test_junk_rows_are_read_or_refused_in_one_line(rows):
    with tempfile.TemporaryDirectory() as d:
        _check(write_rollouts(Path(d) / "r.jsonl", rows))


@PROPERTY
@given(lines=st.lists(st.binary(max_size=40) | st.sampled_from([b'{"prompt": "1", "response": "so", "reward": 1}']),
                      max_size=4))
def test_raw_bytes_are_read_or_refused_in_one_line(lines):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        path.write_bytes(b"\n".join(lines))
        _check(path)


ARROW_JUNK = {
    "ids": [pa.list_(pa.int64()), pa.list_(pa.float64()), pa.list_(pa.string()), pa.string(), pa.float64(),
            pa.list_(pa.bool_())],
    "scalar": [pa.float64(), pa.int64(), pa.string(), pa.bool_()],
}


@st.composite
def arrow_cell(draw, arrow_type: pa.DataType):
    """One value of ``arrow_type`` (NaN, inf, huge and negative numbers, digit strings, nulls)."""
    def scalar(t):
        if pa.types.is_floating(t):
            return st.floats(allow_nan=True, allow_infinity=True) | st.none()
        if pa.types.is_integer(t):
            return st.integers(-(2**63), 2**63 - 1) | st.none()
        if pa.types.is_boolean(t):
            return st.booleans() | st.none()
        return st.text(alphabet="0123456789 .-x", max_size=5) | st.none()
    if pa.types.is_list(arrow_type):
        return draw(st.lists(scalar(arrow_type.value_type), max_size=5) | st.none())
    return draw(scalar(arrow_type))


@PROPERTY
@given(data=st.data(), n=st.integers(1, 3))
def test_parquet_with_junk_column_types_is_read_or_refused(data, n):
    types = {"prompt_ids": data.draw(st.sampled_from(ARROW_JUNK["ids"])),
             "response_ids": data.draw(st.sampled_from(ARROW_JUNK["ids"])),
             "old_logp": data.draw(st.sampled_from(ARROW_JUNK["ids"])),
             "reward": data.draw(st.sampled_from(ARROW_JUNK["scalar"]))}
    cols = {"prompt": pa.array(["what is 1 ?"] * n), "response": pa.array(["so 1"] * n)}
    for name, t in types.items():
        cols[name] = pa.array([data.draw(arrow_cell(t)) for _ in range(n)], type=t)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.parquet"
        pq.write_table(pa.table(cols), path)
        _check(path)
