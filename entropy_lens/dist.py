"""Several processes on torch.distributed: ranks from the launcher's environment, the shard
assignment, and the agreement that makes one failing rank fail the whole run.

A command started by ``torchrun --nproc-per-node N --no-python entropy-lens ...`` runs once per
rank; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init_from_env` joins the process group (gloo on the CPU, nccl on CUDA) when ``WORLD_SIZE``
is above 1 and returns a :class:`Ranks`; without a launcher it returns :data:`SINGLE` and nothing
here talks to another process.

The unit of work is the shard: rank r takes shards r, r + N, r + 2N, ... (:func:`shard_indices`).
Every step that may fail on one rank only runs inside :func:`agreed`: each rank catches its own
error, then all ranks exchange a success flag (a monitored barrier, then an all-gather of each
rank's one-line error, on a gloo group); if any rank failed, every rank raises the same
:class:`RankFailed` naming the failed ranks, so no rank goes on to write merged output and none
waits forever. A rank that neither arrives nor fails (hung, killed) is reported by the barrier's
timeout (``ENTROPY_LENS_DIST_TIMEOUT`` seconds, default 1800): the wait for the slowest rank
counts against it, so a run whose ranks' work differs by more than that needs a larger value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from entropy_lens.io.tables import first_line

#: Seconds the agreement (and every other collective) waits for the slowest rank.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "ENTROPY_LENS_DIST_TIMEOUT"

#: ``exc -> (one-line message, exit code)`` of a rank's failure.
Describe = Callable[[BaseException], "tuple[str, int]"]


def describe_error(exc: BaseException) -> tuple[str, int]:
    """Default description of a failure: the message's first line (with the type's name unless it
    is a ``ValueError``/``OSError``, the library's input errors) and exit code 2 for those, 1
    for anything else."""
    if isinstance(exc, (ValueError, OSError)):
        return first_line(exc), 2
    return f"{type(exc).__name__}: {first_line(exc)}", 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its node),
    the gloo ``group`` the agreements run on (None: the default group), their ``timeout_s``, and
    ``describe`` (how a failure is told to the other ranks)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    describe: Describe = field(default=describe_error, compare=False)

    @property
    def distributed(self) -> bool:
        """Whether other ranks take part (world size > 1)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that merges, writes the run and prints."""
        return self.rank == 0


#: One process, no process group.
SINGLE = Ranks()


class RankFailed(Exception):
    """One or more ranks failed: ``failures`` holds ``(rank, message, exit code)`` for each (rank
    None: unknown, e.g. a rank that never arrived). ``agreed``: every rank raises this same error
    (only rank 0 needs to report it); ``rank``: the rank that raises it."""

    def __init__(self, failures: list[tuple[int | None, str, int]], world_size: int, rank: int, agreed: bool = True):
        self.failures = failures
        self.world_size = world_size
        self.rank = rank
        self.agreed = agreed
        parts = [f"rank {r} of {world_size} failed: {m}" if r is not None else m for r, m, _ in failures]
        super().__init__("; ".join(parts))

    @property
    def exit_code(self) -> int:
        """The highest exit code among the failures (2 for bad input, 1 for a bug)."""
        return max(code for _, _, code in self.failures)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer (set by torchrun)") from None


def env_ranks() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from the environment (``(0, 1, 0)`` without a launcher);
    ValueError (one line) when they are not integers or not consistent."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE "
                         "(set by torchrun)")
    return rank, world, local


def timeout_from_env() -> float:
    """``ENTROPY_LENS_DIST_TIMEOUT`` in seconds (default :data:`DEFAULT_TIMEOUT_S`)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"environment variable {TIMEOUT_ENV}={raw!r}: expected seconds > 0")
    return value


def backend_for(device_type: str) -> str:
    """The process-group backend for a device type: nccl for ``cuda``, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_from_env(device_type: str = "cpu", describe: Describe = describe_error) -> Ranks:
    """Join the process group the launcher described (``WORLD_SIZE`` > 1), or return
    :data:`SINGLE` (with ``describe``) for a single process. ``device_type`` (``cpu``/``cuda``)
    picks the backend (:func:`backend_for`); the agreements always run on gloo (a second group
    when the default one is nccl). A group this process already joined is reused."""
    import torch.distributed as tdist

    _, world, local = env_ranks()
    if world == 1:
        return Ranks(describe=describe)
    timeout = timeout_from_env()
    backend = backend_for(device_type)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    group = None if tdist.get_backend() == "gloo" else tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return Ranks(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local, group=group,
                 timeout_s=timeout, describe=describe)


def close(ranks: Ranks, synchronize: bool = True) -> None:
    """Leave the process group (nothing for a single process). With ``synchronize`` every rank
    first waits at a barrier for the others (rank 0 is the last to finish: it merges and writes),
    so no rank tears its connections down while a peer may still use them; a barrier that fails
    (a peer already gone) is ignored, since the group is being left anyway. Pass False after a
    rank was lost, where the barrier could only time out."""
    import torch.distributed as tdist

    if not (ranks.distributed and tdist.is_initialized()):
        return
    if synchronize:
        try:
            tdist.monitored_barrier(group=ranks.group, timeout=timedelta(seconds=ranks.timeout_s), wait_all_ranks=True)
        except RuntimeError:  # a peer that exited or died: nothing left to wait for
            pass
    tdist.destroy_process_group()


@contextmanager
def session(device_type: str = "cpu", describe: Describe = describe_error) -> Iterator[Ranks]:
    """:func:`init_from_env` for the block, :func:`close` after it: synchronized after the block
    ended or failed on every rank alike, not after a lost rank (:class:`RankFailed` not agreed) or
    an interrupt."""
    ranks = init_from_env(device_type, describe)
    synchronize = False
    try:
        yield ranks
        synchronize = True
    except RankFailed as exc:
        synchronize = exc.agreed
        raise
    finally:
        close(ranks, synchronize)


def shard_indices(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank ``rank`` of ``world_size`` computes: ``rank, rank + world_size, ...`` below
    ``n_shards`` (empty for a rank beyond the last shard: idle ranks are fine)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: need 0 <= rank < world size")
    return list(range(rank, max(n_shards, 0), world_size))


def agree(ranks: Ranks, failure: BaseException | None) -> None:
    """Every rank calls this with its own error (None: success). Returns on every rank when all
    succeeded; otherwise raises :class:`RankFailed` naming every failed rank on every rank (chained
    to this rank's own error). A single process re-raises its own error unchanged. A rank that
    does not arrive within ``ranks.timeout_s`` makes the others raise :class:`RankFailed` (not
    agreed: each rank reports it) instead of waiting for ever."""
    if not ranks.distributed:
        if failure is not None:
            raise failure
        return
    import torch.distributed as tdist

    mine = None if failure is None else ranks.describe(failure)
    statuses: list[Any] = [None] * ranks.world_size
    try:
        tdist.monitored_barrier(group=ranks.group, timeout=timedelta(seconds=ranks.timeout_s), wait_all_ranks=True)
        tdist.all_gather_object(statuses, mine, group=ranks.group)
    except RuntimeError as exc:  # a peer that hung or died: torch's own DistBackendError / RuntimeError
        lost = (f"the ranks did not all reach the agreement within {ranks.timeout_s:g} s "
                f"({TIMEOUT_ENV}): {first_line(exc)}")
        raise RankFailed([(None, lost, 2)], ranks.world_size, ranks.rank, agreed=False) from (failure or exc)
    failures = [(r, s[0], int(s[1])) for r, s in enumerate(statuses) if s is not None]
    if failures:
        raise RankFailed(failures, ranks.world_size, ranks.rank) from failure


def sum_counts(ranks: Ranks, counts: dict[str, int]) -> dict[str, int]:
    """The key-wise sum of every rank's ``counts`` (a collective: every rank calls it; a single
    process gets its own counts back), keys sorted."""
    if not ranks.distributed:
        return dict(sorted(counts.items()))
    import torch.distributed as tdist

    every: list[Any] = [None] * ranks.world_size
    tdist.all_gather_object(every, dict(counts), group=ranks.group)
    total: dict[str, int] = {}
    for c in every:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


@contextmanager
def agreed(ranks: Ranks) -> Iterator[None]:
    """Run the block on every rank, then :func:`agree` on its outcome: an error on any rank becomes
    the same :class:`RankFailed` on all of them. A :class:`RankFailed` from an inner agreement
    passes through (every rank already has it); ``KeyboardInterrupt`` is not caught."""
    failure: BaseException | None = None
    try:
        yield
    except RankFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - told to every rank, then raised again as RankFailed
        failure = exc
    agree(ranks, failure)
