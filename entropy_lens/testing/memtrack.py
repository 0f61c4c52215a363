"""Deterministic peak-memory accounting of tensors created during a call (for tests and benchmarks).

:class:`LiveTensorBytes` is a ``TorchDispatchMode`` that counts the bytes of every new tensor
storage an ATen op creates while the mode is active, until the last tensor object viewing it dies,
and records the peak. It does not depend on the allocator or the machine, so a test can state a
memory bound exactly (e.g. "no more than one chunk of vocabulary-width rows is alive at once").
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ATen ops while the mode is active.

    Every op output whose storage is new is counted until the last tensor object viewing it dies;
    storages that existed before (inputs, in-place targets) are not counted. ``select(t)`` (default:
    all) picks which new outputs count, e.g. ``lambda t: t.shape[-1:] == (V,)`` for tensors of
    vocabulary width. Allocations inside a single kernel (workspaces) and inside compiled graphs
    are not seen.
    """

    def __init__(self, select: Callable[[torch.Tensor], bool] | None = None):
        super().__init__()
        self.select = select
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor, fresh: bool) -> None:
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0:
            return
        if key in self.live:
            self.live[key][1] += 1
        elif fresh and (self.select is None or self.select(t)):
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            return
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        in_keys = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, fresh=t.untyped_storage().data_ptr() not in in_keys)
        return out


def live_peak_bytes(fn: Callable[[], object], select: Callable[[torch.Tensor], bool] | None = None) -> int:
    """Peak live tensor bytes (see :class:`LiveTensorBytes`) created while running ``fn``."""
    with LiveTensorBytes(select) as mode:
        res = fn()
        peak = mode.peak
    del res
    return peak
