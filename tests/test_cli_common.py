"""CLI helpers: one-line errors print model/user text verbatim."""

import pytest
import typer

from entropy_lens_cli import common


def test_fail_prints_one_line_verbatim_and_exits_with_the_code(capsys):
    with pytest.raises(typer.Exit) as exc:
        common.fail("rollouts.jsonl: column [response_ids] is\nmissing  [bold]x[/bold]", code=3)
    assert exc.value.exit_code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    assert "column [response_ids] is missing [bold]x[/bold]" in err  # markup-like text is not eaten
