"""One writer per run folder: an exclusive, non-blocking lock on ``FOLDER/.entropy-lens.lock``.

A command that writes a run folder holds :func:`folder_lock` for as long as it runs; a second
command on the same folder is refused at once (:class:`FolderBusy`, naming the holder's pid)
instead of mixing its files with the first one's. The lock is ``fcntl.flock`` on an open file, so
the kernel releases it when the holder exits, however it exits; the file itself is removed on
release, so a finished run leaves nothing behind. Only the standard library (``io`` rule).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: The lock file's name inside the run folder.
LOCK_NAME = ".entropy-lens.lock"


class FolderBusy(ValueError):
    """Another process holds the folder's lock; the message names the folder and the holder's pid."""


def _holder_pid(fd: int) -> str:
    """The pid written into the lock file by its holder (``?`` if not written yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder may have removed it)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(path: Path, folder: Path) -> int:
    """Open and lock ``path`` (exclusive, non-blocking); returns the descriptor or raises FolderBusy.

    Retries when the file it locked was removed by a holder that released it in the meantime, so
    two processes never both hold a lock on the same folder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise FolderBusy(f"{folder}: another entropy-lens command is writing here (pid {pid})") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (which must exist) for the duration of the block.

    Raises :class:`FolderBusy` when another process holds it. Yields the lock file's path; the
    file records this process's pid and is removed when the block ends (exception included)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = _acquire(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # still locked: a process that opened it now retries on a fresh file
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
