"""Tensor collectives of a run on several processes: the gradient sum of a data-parallel update
and the merge of per-rank rows into whole-batch grids.

Both are sums over the ranks (``torch.distributed.all_reduce`` with ``SUM``):

- gradients: ∇ = Σ_r ∇_r, where rank r's gradient is that of (1/L) · Σ over its own tokens of the
  per-token loss and L is the token count of the whole batch, so ∇ is the single-process gradient
  (data-parallel semantics); they are summed on the default group (nccl on GPUs, gloo on the CPU)
  where they are, flattened into buckets of at most :data:`BUCKET_BYTES`;
- row grids: rank r fills rows ``rows_r`` of a zero ``[B, ...]`` grid and the grids are summed,
  which is exact (every entry is one rank's value plus zeros); on the CPU, over the gloo group of
  the agreements.

A collective must be reached by every rank: callers put the work that may fail on one rank inside
:func:`entropy_lens.dist.agreed` first, so no rank waits in a collective for a rank that failed.
With one process every function here returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from entropy_lens import dist

#: Largest flattened gradient bucket summed at once (bytes).
BUCKET_BYTES = 256 * 2**20


def sum_in_place(tensors: list[torch.Tensor], group=None, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Σ over the ranks of every tensor, in place. Tensors of one dtype and device are flattened
    into buckets of at most ``bucket_bytes`` (a larger tensor is summed alone), so the sum costs a
    few collectives, not one per tensor, and at most one bucket of extra memory."""
    import torch.distributed as tdist

    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        if len(bucket) == 1 and bucket[0].is_contiguous():
            tdist.all_reduce(bucket[0], op=tdist.ReduceOp.SUM, group=group)
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=group)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket.clear()

    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > bucket_bytes):
            flush()
            size = 0
        bucket.append(t)
        size += nbytes
    flush()


def sum_grads(grads: dict[str, torch.Tensor | None], loss: float, like: dict[str, torch.Tensor], ranks: dist.Ranks,
              bucket_bytes: int = BUCKET_BYTES) -> tuple[dict[str, torch.Tensor | None], float]:
    """The gradients and the loss summed over the ranks: ``(name -> Σ_r grad_r, Σ_r loss_r)``.

    ``grads``: name -> this rank's gradient, or None where it has none (an idle rank, or
    sequences that do not reach the parameter): that counts as zeros shaped, typed and placed like
    ``like[name]`` (the tensor the gradient belongs to); a gradient stays None only when no rank
    has one (as in one process, where the optimizer then skips the parameter). The gradients given
    are summed in place."""
    if not ranks.distributed:
        return grads, loss
    import torch.distributed as tdist

    names = list(grads)
    where = next(iter(like.values())).device if like else torch.device("cpu")
    head = torch.tensor([float(grads[n] is not None) for n in names] + [loss], dtype=torch.float64, device=where)
    tdist.all_reduce(head, op=tdist.ReduceOp.SUM)
    flags = head.cpu().tolist()
    out: dict[str, torch.Tensor | None] = {}
    for n, seen in zip(names, flags[:-1]):
        if seen == 0:
            out[n] = None
        else:
            out[n] = grads[n] if grads[n] is not None else torch.zeros_like(like[n], memory_format=torch.contiguous_format)
    sum_in_place([t for t in out.values() if t is not None], bucket_bytes=bucket_bytes)
    return out, float(flags[-1])


def grad_sum(ranks: dist.Ranks) -> Callable | None:
    """The ``reduce`` hook of :func:`entropy_lens.model.update.one_step_update` for ``ranks``
    (None for one process: nothing to sum): first an agreement (:func:`entropy_lens.dist.agree`:
    a rank that failed before its gradient was complete fails every rank here, before any rank
    enters the sum), then :func:`sum_grads`."""
    if not ranks.distributed:
        return None

    def reduce(grads: dict[str, torch.Tensor | None], loss: float, like: dict[str, torch.Tensor]):
        dist.agree(ranks, None)
        return sum_grads(grads, loss, like, ranks)

    return reduce


def gather_rows(grids: dict[str, torch.Tensor], rows: slice, n_rows: int, ranks: dist.Ranks) -> dict[str, torch.Tensor]:
    """Whole-batch grids ``[n_rows, ...]`` on the CPU from every rank's rows: this rank's
    ``grids[k]`` (``[len(rows), ...]``, any device) are rows ``rows`` of grid k; every other row
    comes from the rank that holds it. Every rank gets the whole grids (one process: its own grids
    on the CPU). The grids' trailing shapes and dtypes must agree across the ranks."""
    out = {}
    for k, g in grids.items():
        full = torch.zeros((n_rows, *g.shape[1:]), dtype=g.dtype)
        full[rows] = g.detach().cpu()
        out[k] = full
    if ranks.distributed:
        sum_in_place(list(out.values()), group=ranks.group)
    return out
