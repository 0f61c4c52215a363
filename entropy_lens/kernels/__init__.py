"""GPU paths for the per-token logit statistics (logp of the sampled token, entropy, Σp², Σp² log p).

- :func:`logit_stats_auto`: the one-pass Triton kernel (:mod:`.triton_logits`) for CUDA logits when
  ``triton`` is importable, else the chunked torch path :func:`entropy_lens.logits.logit_stats`.
- :func:`fused_logit_stats`: the same statistics from hidden states × LM-head weight without
  materialising the logits (:mod:`.fused`).

Triton is imported lazily, only when a CUDA tensor asks for it, so CPU use never pays for it.
"""

from __future__ import annotations

import functools

import torch

from entropy_lens.logits import LogitStats, logit_stats

__all__ = ["logit_stats_auto", "fused_logit_stats", "triton_available"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works in this environment (cached)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()


def logit_stats_auto(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    *,
    consume: bool = False,
) -> LogitStats:
    """:class:`LogitStats` (each ``[N]`` fp32, nats) of ``logits`` [N, V] at temperature τ.

    CUDA logits with Triton importable: the one-pass kernel
    :func:`entropy_lens.kernels.triton_logits.logit_stats_triton` (``chunk_rows`` is ignored there:
    the kernel keeps no [chunk, V] buffer). Otherwise :func:`entropy_lens.logits.logit_stats` with
    ``chunk_rows`` and ``consume`` (the logits may be overwritten; the kernel never writes them).
    Same contract on both paths: same outputs up to fp32 rounding, and the same
    ``ValueError`` for bad input (the kernel re-runs the torch path when its output is non-finite).
    The kernel launches on the logits' GPU, whichever is current (a device map may put the LM head
    on another GPU than the inputs).
    """
    if _use_triton(logits):
        from entropy_lens.kernels.triton_logits import logit_stats_triton

        if not logits.is_cuda:  # Triton's CPU interpreter (TRITON_INTERPRET=1)
            return logit_stats_triton(logits, token_ids, temperature)
        with torch.cuda.device(logits.device):
            return logit_stats_triton(logits, token_ids, temperature)
    return logit_stats(logits, token_ids, temperature, chunk_rows=chunk_rows, consume=consume)


def fused_logit_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> LogitStats:
    """:class:`LogitStats` of the logits ``hidden`` [N, D] · ``weight`` [V, D]ᵀ at τ without keeping
    them; see :func:`entropy_lens.kernels.fused.fused_logit_stats`."""
    from entropy_lens.kernels.fused import fused_logit_stats as _fused

    return _fused(hidden, weight, token_ids, temperature, chunk_rows)
