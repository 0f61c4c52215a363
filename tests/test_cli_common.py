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


def test_stage_clocks_start_when_the_previous_stage_completes():
    clock = [0.0]
    with common.stage_progress({"a": 2, "b": 1, "c": 1}, get_time=lambda: clock[0]) as advance:
        clock[0] = 5.0
        advance("a", 2)  # a: 0 -> 5 s; b's clock starts now
        clock[0] = 12.0
        advance("b", 1)  # b reports once, at its end: 7 s, not 0
        clock[0] = 13.0
        a, b, c = advance.elapsed("a"), advance.elapsed("b"), advance.elapsed("c")
    assert (a, b, c) == (5.0, 7.0, 1.0)
