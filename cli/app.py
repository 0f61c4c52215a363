"""The `entropy-lens` command line (thin: parse, call the library, print, write files)."""

from __future__ import annotations

import sys

import typer

from entropy_lens_cli import (
    analyze_cmd,
    compare_cmd,
    demo_cmd,
    plot_cmd,
    report_cmd,
    sample_cmd,
    train_cmd,
    validate_cmd,
)
from entropy_lens_cli.common import err_console, quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Entropy dynamics of RL with verifiable rewards.")


for _module in (sample_cmd, analyze_cmd, validate_cmd, compare_cmd, train_cmd, plot_cmd, report_cmd, demo_cmd):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    quiet_libraries()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
