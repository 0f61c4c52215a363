"""The package list in pyproject.toml covers every package of the tree (a forgotten subpackage
would be missing from a wheel install while an editable install still works)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed():
    setup = _pyproject()["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "entropy_lens").rglob("__init__.py")}
    listed = set(setup["packages"])
    assert found == listed - {"entropy_lens_cli"}
    assert setup["package-dir"] == {"entropy_lens_cli": "cli"}
    assert (ROOT / "cli" / "__init__.py").is_file()


def test_report_template_is_package_data():
    data = _pyproject()["tool"]["setuptools"]["package-data"]["entropy_lens"]
    templates = sorted(p.relative_to(ROOT / "entropy_lens").as_posix() for p in (ROOT / "entropy_lens" / "report").glob("*.j2"))
    assert templates and all(any(Path(t).match(pattern) for pattern in data) for t in templates)
