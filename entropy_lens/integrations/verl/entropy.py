"""Entropy supplied to the loss: a context variable the registered losses read."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class TokenEntropy:
    """Per-token entropies of one micro-batch, ``[B, T]`` nats, aligned with ``log_prob``.

    ``current``: H of the policy being trained (carries its gradient when verl computed it with
    one); ``old``: H_old of the policy that produced ``old_log_prob``. Either may be ``None``.
    """

    current: torch.Tensor | None = None
    old: torch.Tensor | None = None


_ENTROPY: contextvars.ContextVar[TokenEntropy | None] = contextvars.ContextVar("entropy_lens_verl_entropy", default=None)


@contextlib.contextmanager
def entropy_scope(current: torch.Tensor | None = None, old: torch.Tensor | None = None) -> Iterator[TokenEntropy]:
    """Publish a micro-batch's entropies to the registered losses for the duration of a block."""
    value = TokenEntropy(current=current, old=old)
    token = _ENTROPY.set(value)
    try:
        yield value
    finally:
        _ENTROPY.reset(token)


def current_entropy() -> TokenEntropy | None:
    """The entropies published by the innermost :func:`entropy_scope`, or ``None``."""
    return _ENTROPY.get()


def _fit_width(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a dense ``[B, T]`` tensor with ``like``'s width (right-padded with 0 or cut)."""
    if t is None:
        return None
    if t.is_nested:
        t = t.to_padded_tensor(0.0)
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"entropy has {t.shape[0]} rows, log_prob has {like.shape[0]}")
    T = like.shape[-1]
    if t.shape[-1] < T:
        t = torch.nn.functional.pad(t, (0, T - t.shape[-1]))
    return t[:, :T].to(device=like.device)
