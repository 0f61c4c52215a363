"""The `entropy-lens` command line (thin: parse, call the library, print, write files)."""

from __future__ import annotations

import sys

import typer

from entropy_lens_cli import (
    analyze_cmd,
    attribute_cmd,
    compare_cmd,
    demo_cmd,
    eval_cmd,
    kernels_cmd,
    plot_cmd,
    report_cmd,
    sample_cmd,
    table_cmd,
    train_cmd,
    validate_cmd,
)
from entropy_lens_cli.common import (
    EXIT_INTERRUPTED,
    interrupt_reported,
    quiet_libraries,
    report_interrupt,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Entropy dynamics of RL with verifiable rewards.")


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", envvar="ENTROPY_LENS_DEBUG",
                               help="On an internal error (a bug), also print the traceback."),
) -> None:
    """Entropy dynamics of RL with verifiable rewards."""


for _module in (sample_cmd, analyze_cmd, validate_cmd, compare_cmd, train_cmd, plot_cmd, report_cmd, table_cmd, demo_cmd,
                eval_cmd, attribute_cmd):
    _module.register(app)
kernels_cmd.register(app)  # the `kernels` group (build, status)


def main() -> None:
    """Console-script entry point: Ctrl-C anywhere prints ``interrupted`` and exits with 130 (inside
    a command the error boundary does it; typer itself exits 130 silently, so it is said here)."""
    try:
        quiet_libraries()
        app()
    except KeyboardInterrupt:
        report_interrupt()
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED and not interrupt_reported():
            report_interrupt()
        raise


if __name__ == "__main__":
    main()
