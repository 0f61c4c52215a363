"""TensorBoard event files beside a run's own logs (the ``tensorboard`` extra): the trainer's
``metrics.jsonl`` records (``--logger tensorboard`` / ``log.tensorboard``) and ``eval``'s summary.

Every numeric value of a record becomes one scalar, nested keys joined with ``/``
(``dh_pred/dh_jvp``, ``quadrant/Q1/dh_measured``, ``gsm8k_test/pass_at_k/4``), at the record's step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: Record keys that are labels, not measurements.
_SKIP = ("step", "method", "seed")


def scalar_items(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a metrics record into ``{"a/b": value}`` for every finite number (bools and None
    skipped, as are the labels ``step``, ``method`` and ``seed``)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in _SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_items(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class TensorBoardLog:
    """Writes records to ``<folder>``; ``purge_step`` drops events from a previous attempt at
    that step and later (a resumed run rewrites the steps after its checkpoint)."""

    def __init__(self, folder: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError(
                "--logger tensorboard needs the tensorboard package: pip install 'entropy-lens[tensorboard]'"
            ) from None
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalar_items(record).items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
