"""``entropy-lens kernels build [--force]`` and ``entropy-lens kernels status``: the ahead-of-time
compiled CPU kernel of the per-token statistics.

Thin: building, keying and loading are in :mod:`entropy_lens.kernels.cpu_aot`. ``build`` compiles the
kernel once into the cache folder (``$ENTROPY_LENS_CACHE`` or ``~/.cache/entropy_lens``) and prints
where it went and how long it took; ``status`` prints whether a valid artefact is there. No other
command ever compiles: they use the artefact when it is present and the eager path otherwise.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from entropy_lens_cli.common import add_command, console, fail

kernels_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Ahead-of-time compiled CPU kernel for the logit statistics.")


def build(
    force: Annotated[bool, typer.Option("--force", help="rebuild even when a valid artefact exists")] = False,
) -> None:
    """Compile the CPU statistics kernel into the cache (once per torch version and CPU ISA)."""
    from entropy_lens.kernels import cpu_aot

    try:
        built = cpu_aot.build(force=force)
    except cpu_aot.KernelBuildError as exc:
        fail(str(exc))
    t0 = time.perf_counter()
    op = cpu_aot.load()
    load_ms = (time.perf_counter() - t0) * 1e3
    if op is None:
        fail(f"{built.library}: built but could not be loaded by this torch")
    what = f"built in {built.seconds:.1f} s" if built.seconds else "already built (--force rebuilds)"
    console.print(f"{built.library}: {what}; loads in {load_ms:.0f} ms; ISA {built.manifest['isa']}, "
                  f"torch {built.manifest['torch']}, dtypes {', '.join(built.manifest['dtypes'])}",
                  markup=False, highlight=False, soft_wrap=True)


def status() -> None:
    """Say whether a valid CPU kernel artefact is in the cache for this torch and CPU."""
    from entropy_lens.kernels import cpu_aot

    found = cpu_aot.info()
    if found is None:
        console.print(f"no CPU kernel for this torch and CPU under {cpu_aot.artefact_dir()} "
                      "(run `entropy-lens kernels build`; until then the eager path is used)",
                      markup=False, highlight=False, soft_wrap=True)
        return
    console.print(f"{found.library}: ISA {found.manifest['isa']}, torch {found.manifest['torch']}, "
                  f"dtypes {', '.join(found.manifest['dtypes'])}, built in {found.manifest['build_seconds']} s",
                  markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``kernels`` command group (``build``, ``status``) to the main app."""
    add_command(kernels_app, "build", build)
    add_command(kernels_app, "status", status)
    app.add_typer(kernels_app, name="kernels")
