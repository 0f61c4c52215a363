"""Where a command runs: ``--device`` (a GPU when one is visible, ``cuda:LOCAL_RANK`` under
torchrun), ``--dtype`` with it, and the ranks of a torchrun launch as the CLI sees them: the
process group for a command's block, the run folder prepared by rank 0 alone, and progress and
status drawn by rank 0 only (:mod:`entropy_lens.dist` holds the library side)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from entropy_lens.dist import env_ranks
from entropy_lens_cli.common import (
    DTYPES,
    check_choice,
    console,
    describe_failure,
    prepare_out_dir,
    resolve_dtype,
    stage_progress,
)

#: ``--device`` values: ``auto`` (a GPU when one is visible, else the CPU), ``cpu``, ``cuda``
#: (under torchrun: ``cuda:LOCAL_RANK``), ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def check_device(device: str) -> None:
    """``--device`` is one of :data:`DEVICES` (``cuda:N`` with an integer N)."""
    if not _DEVICE.match(device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_device(device: str) -> str:
    """``--device`` to the device this process uses: ``cpu`` or ``cuda:I``. ``auto`` is a GPU when
    torch sees one, else the CPU; ``cuda`` is ``cuda:LOCAL_RANK`` (0 without torchrun); under
    torchrun every rank takes its own GPU, so ``cuda:N`` is refused there. One line (exit 2) when
    no GPU is visible or the index is out of range. The chosen GPU becomes torch's current device."""
    check_device(device)
    if device == "cpu":
        return "cpu"
    import torch

    visible = torch.cuda.is_available()
    if device == "auto":
        if not visible:
            return "cpu"
        device = "cuda"
    if not visible:
        raise ValueError(f"--device {device}: no GPU is visible (torch.cuda.is_available() is false); "
                         "use --device cpu or auto")
    _, world, local = env_ranks()
    if device != "cuda" and world > 1:
        raise ValueError(f"--device {device}: under torchrun every rank uses cuda:LOCAL_RANK; pass --device cuda or auto")
    index = local if device == "cuda" else int(device.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        what = f"LOCAL_RANK {local}" if device == "cuda" else device
        raise ValueError(f"--device {device}: {what} but only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def resolve_placement(device: str, dtype: str, cpu_only: str | None = None) -> tuple[str, str]:
    """``(device, dtype)`` of ``--device`` and ``--dtype``, both checked (dtype first: it needs no
    GPU to be refused). ``cpu_only``: the name of a command whose work does not run on a GPU yet;
    ``auto`` is then the CPU and ``cuda``/``cuda:N`` are refused with one line naming it."""
    check_choice("--dtype", dtype, DTYPES)
    check_device(device)
    if cpu_only is not None and device.startswith("cuda"):
        raise ValueError(f"--device {device}: {cpu_only} runs on the CPU only so far; use --device cpu or auto")
    where = "cpu" if cpu_only is not None else resolve_device(device)
    return where, resolve_dtype(dtype, where)


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
