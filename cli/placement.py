"""Where a command runs: ``--device`` (a GPU when one is visible, ``cuda:LOCAL_RANK`` under
torchrun), ``--dtype`` with it, ``--device-map`` (one model spread over the GPUs, for the
forward-only commands; refused by the others), and the ranks of a torchrun launch as the CLI sees
them: the process group for a command's block, the run folder prepared by rank 0 alone, and
progress and status drawn by rank 0 only (:mod:`entropy_lens.dist` holds the library side)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from entropy_lens.dist import env_ranks
from entropy_lens.placement import (  # noqa: F401 (the CLI's names)
    DEVICE_MAPS,
    DEVICES,
    check_device,
    resolve_device,
    resolve_device_map,
    resolve_placement,
)
from entropy_lens_cli.common import (
    console,
    describe_failure,
    prepare_out_dir,
    stage_progress,
)

#: ``--device-map``'s help on the forward-only commands (``analyze``, ``sample``, ``eval``).
DEVICE_MAP_HELP = ("none (the whole model on --device), auto (accelerate: the layers balanced over the visible GPUs, "
                   "then CPU memory; without a GPU, all on the CPU) or sequential (the GPUs filled in order). "
                   "For models too large for one GPU; one process, not under torchrun.")
#: ``--device-map`` on the commands that update or differentiate the weights: hidden, there only
#: to be refused with the reason (:func:`entropy_lens.placement.resolve_device_map`).
REFUSED_DEVICE_MAP_HELP = "Refused here: a device map is for the forward-only commands (analyze, sample, eval)."


def device_map_record(device_map: str | None, *models) -> dict:
    """What a run records of ``--device-map`` beside ``device`` and ``dtype``: ``device_map``
    (``none`` without one) and, with a map, ``model_devices``: every device that holds a part of
    the loaded ``models``."""
    if device_map is None:
        return {"device_map": "none"}
    from entropy_lens.model.load import model_devices

    return {"device_map": device_map,
            "model_devices": sorted({d for m in models if m is not None for d in model_devices(m)})}


def refuse_ranks(command: str) -> None:
    """One line (exit 2) when ``command``, which does not split its work across ranks, is started
    by torchrun with more than one process (every rank would do and write the same work)."""
    _, world, _ = env_ranks()
    if world > 1:
        raise ValueError(f"{command} does not split its work across torchrun ranks (WORLD_SIZE={world}); "
                         "run it as one process")


@contextmanager
def rank_session(device: str) -> Iterator:
    """The process group of a torchrun launch for the block (:func:`entropy_lens.dist.session`,
    backend by ``device``), with failures told to the other ranks as this boundary words them;
    a single process gets :data:`entropy_lens.dist.SINGLE`."""
    from entropy_lens import dist

    with dist.session("cuda" if str(device).startswith("cuda") else "cpu", describe_failure) as ranks:
        yield ranks


@contextmanager
def rank_progress(ranks, stages: dict[str, int]) -> Iterator:
    """:func:`stage_progress` on rank 0; a silent ``advance`` on the other ranks (only rank 0 of a
    torchrun launch draws bars)."""
    if ranks.is_main:
        with stage_progress(stages) as advance:
            yield advance
        return

    def advance(stage: str, n: int) -> None:
        return None

    advance.elapsed = lambda stage: 0.0
    yield advance


@contextmanager
def quiet_status(ranks, text: str) -> Iterator[None]:
    """``console.status(text)`` on rank 0, nothing on the other ranks."""
    if ranks.is_main:
        with console.status(text):
            yield
    else:
        yield


@contextmanager
def prepare_rank_out_dir(out: Path, command: str, options: dict | None, ranks) -> Iterator[Path]:
    """:func:`prepare_out_dir` on rank 0 only (it alone holds the folder's lock for the run),
    agreed with the other ranks (:func:`entropy_lens.dist.agreed`): a refused folder stops every
    rank before any work. One process: :func:`prepare_out_dir` itself."""
    from contextlib import ExitStack

    from entropy_lens import dist

    if not ranks.distributed:
        with prepare_out_dir(out, command, options) as folder:
            yield folder
        return
    with ExitStack() as stack:
        with dist.agreed(ranks):
            if ranks.is_main:
                stack.enter_context(prepare_out_dir(out, command, options))
        yield Path(out)
