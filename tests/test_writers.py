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
