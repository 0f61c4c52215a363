"""Every command of the `entropy-lens` app answers --help (exit 0, its own usage line)."""

import pytest
from typer.testing import CliRunner

from entropy_lens_cli.app import app

COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]


def test_all_commands_are_registered():
    assert set(COMMANDS) == {"sample", "analyze", "validate", "compare", "methods", "train", "plot", "report", "demo",
                             "attribute", "eval", "table"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    assert f"entropy-lens {command}" in res.output or f" {command} [OPTIONS]" in res.output


def test_top_level_help_lists_every_command():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for c in COMMANDS:
        assert c in res.output
