"""Atomic writers: nothing half-written, ordinary permissions."""

import os
import stat

import pandas as pd
import pytest

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
