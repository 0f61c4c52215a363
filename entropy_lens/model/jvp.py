"""The exact first-order entropy change along a real update, through the whole network.

``dh_jvp`` = ∇_θ H_t · Δθ for every response token, by forward-mode AD
(:func:`entropy_lens.estimators.dh_jvp`) over micro-batches of a packed batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from entropy_lens import estimators as est
from entropy_lens.model.forward import PackedBatch, response_entropy_fn, scatter_rows
from entropy_lens.model.load import model_device, set_attention


def jvp_prediction(
    model,
    packed: PackedBatch,
    theta: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    temperature: float,
    micro_batch: int,
    progress: Callable[[str, int], None] | None = None,
    attention: str = "eager",
) -> torch.Tensor:
    """``dh_jvp`` ``[B, T]`` (nats, fp32): ΔH_t ≈ ∇_θ H_t · Δθ at θ for every response token,
    ``micro_batch`` sequences at a time, entropies at ``temperature``. ``theta``: parameters
    before the update; ``delta``: the real update θ' − θ (same names).

    Everything stays on the model's device: ``packed`` is moved there once (a no-op when it is
    already there), ``theta``/``delta`` must be there, and the result is returned there (0 on
    padding); the caller copies it to the host when it writes it.

    Attention runs where forward-mode AD passes (:func:`forward_ad_attention` with ``attention``):
    eager attention by default (measured faster than SDPA's math backend on the CPU,
    benchmarks/RESULTS.md), or ``sdpa-math`` for an SDPA model.
    """
    device = model_device(model)
    packed = packed.to(device)
    out = torch.zeros(packed.mask.shape, dtype=torch.float32, device=device)
    moved = moved_parameters(delta)
    with forward_ad_attention(model, attention):
        B = packed.mask.shape[0]
        for i in range(0, B, micro_batch):
            rows = slice(i, min(i + micro_batch, B))
            sub = packed.select(rows)
            if moved:
                fn = response_entropy_fn(model, sub, temperature)
                with torch.no_grad():
                    out[rows] = scatter_rows(est.dh_jvp(fn, theta, moved).float(), sub.mask)
            if progress:
                progress("jvp", rows.stop - rows.start)
    return out


#: Attention paths forward-mode AD passes through (:func:`forward_ad_attention`).
AD_ATTENTION = ("eager", "sdpa-math")


@contextmanager
def forward_ad_attention(model, prefer: str = "eager") -> Iterator[str]:
    """Attention that forward-mode AD can pass through, for the block; yields which one.

    The fused SDPA kernels (flash, memory-efficient, the CPU flash kernel) have no forward-AD
    formula; SDPA's math backend and eager attention have. ``prefer="sdpa-math"``: a model on
    ``sdpa`` keeps its implementation and runs with only the math backend enabled (one set of
    attention weights per layer, as eager attention, without leaving the SDPA code path). Otherwise,
    and for any other implementation (e.g. ``flash_attention_2``), the model is switched to
    ``eager`` and back afterwards."""
    if prefer not in AD_ATTENTION:
        raise ValueError(f"attention for the JVP must be one of {', '.join(AD_ATTENTION)}, got {prefer!r}")
    prev = getattr(model.config, "_attn_implementation", "sdpa")
    if prev == "sdpa" and prefer == "sdpa-math":
        with sdpa_kernel(SDPBackend.MATH):
            yield "sdpa-math"
        return
    set_attention(model, "eager")
    try:
        yield "eager"
    finally:
        set_attention(model, prev)


def moved_parameters(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``delta`` that are not all zero (one device-to-host transfer for all)."""
    names = list(delta)
    if not names:
        return {}
    where = delta[names[0]].device
    nonzero = torch.stack([delta[n].ne(0).any().to(where) for n in names]).cpu().tolist()
    return {n: delta[n] for n, keep in zip(names, nonzero) if keep}
