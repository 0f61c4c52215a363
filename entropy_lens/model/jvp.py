"""The exact first-order entropy change along a real update, through the whole network.

``dh_jvp`` = ∇_θ H_t · Δθ for every response token, by forward-mode AD
(:func:`entropy_lens.estimators.dh_jvp`) over micro-batches of a packed batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from entropy_lens import estimators as est
from entropy_lens.model.forward import PackedBatch, response_entropy_fn, scatter_rows
from entropy_lens.model.load import set_attention


def jvp_prediction(
    model,
    packed: PackedBatch,
    theta: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    temperature: float,
    micro_batch: int,
    progress: Callable[[str, int], None] | None = None,
) -> torch.Tensor:
    """``dh_jvp`` ``[B, T]`` (nats): ∇_θ H_t · Δθ at θ for every response token, ``micro_batch``
    sequences at a time, entropies at ``temperature``. ``theta``: parameters before the update;
    ``delta``: the real update θ' − θ (same names).

    Switches the model to eager attention for the duration (forward-mode AD does not pass
    through fused SDPA kernels) and back afterwards.
    """
    prev = getattr(model.config, "_attn_implementation", "sdpa")
    set_attention(model, "eager")
    out = torch.zeros(packed.mask.shape, dtype=torch.float32)
    moved = {n: d for n, d in delta.items() if bool(d.abs().max() > 0)}
    try:
        B = packed.mask.shape[0]
        for i in range(0, B, micro_batch):
            rows = slice(i, min(i + micro_batch, B))
            sub = packed.select(rows)
            fn = response_entropy_fn(model, sub, temperature)
            with torch.no_grad():
                tangent = est.dh_jvp(fn, theta, moved) if moved else torch.zeros(int(sub.mask.sum()))
            out[rows] = scatter_rows(tangent.float(), sub.mask)
            if progress:
                progress("jvp", rows.stop - rows.start)
    finally:
        set_attention(model, prev)
    return out
