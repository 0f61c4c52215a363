"""The LM head's own view of a batch: final hidden states, head weights and the LM-head kernel
score (docs/attribution.md §2, eq. 6–8).

The score of token j is the first-order entropy change when the LM head alone takes the SGD step of
the token-mean objective over the whole batch, per unit η/L:

    ω_j = −(1/τ²) · a_j · (G h̃_j),   a_j = π_j ⊙ (log π_j + H_j),   G = Σ_k c_k (e_{y_k} − π_k) h̃_kᵀ

so that ``dh_lm_head = (η/L) · ω`` (:func:`entropy_lens.attribution.dh_lm_head`). Nats per unit
η/L; no gradient.
"""

from __future__ import annotations

import torch

from entropy_lens.attribution import dh_lm_head
from entropy_lens.model.forward import PackedBatch, response_hidden, scatter_rows


def head_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight ``[V, D]`` and bias ``[V]`` (None without one), detached."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.detach(), (bias.detach() if bias is not None else None)


def check_linear_head(model, what: str) -> None:
    """Raise ``ValueError`` when the head soft-caps its logits (the kernel forms assume z = W h + b)."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{what} needs a linear LM head; this model soft-caps its logits (final_logit_softcapping)")


@torch.no_grad()
def final_hidden(model, packed: PackedBatch, micro_batch: int) -> torch.Tensor:
    """Final hidden states of the valid response states, ``[M, D]`` in row-major order of
    ``packed.mask`` (one decoder forward, ``micro_batch`` sequences at a time), in the head's dtype."""
    B = packed.mask.shape[0]
    parts = [response_hidden(model, packed.select(slice(i, i + micro_batch))) for i in range(0, B, micro_batch)]
    return torch.cat(parts).to(model.get_output_embeddings().weight.dtype)


@torch.no_grad()
def lm_head_score(
    model,
    packed: PackedBatch,
    coef: torch.Tensor,
    temperature: float,
    micro_batch: int,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """ω of the module docstring for every response token, ``[B, T]`` float64 (0 on padding).

    ``coef`` ``[B, T]``: c_k, the coefficient of ∂ log p_k in the objective's gradient (A_k at
    θ_old, where r = 1 and no clip is active; I_k·A_k·r_k in general). One decoder forward plus
    two passes of the head over chunks of ``chunk_rows`` tokens (memory ``[V, D] + [r, V]``)."""
    check_linear_head(model, "the LM-head kernel score")
    hidden = final_hidden(model, packed, micro_batch)
    weight, bias = head_weights(model)
    m = packed.mask
    score = dh_lm_head(hidden, weight, bias, packed.response_ids[m], coef[m], 1.0, 1, temperature, chunk_rows)
    return scatter_rows(score.double(), m)
