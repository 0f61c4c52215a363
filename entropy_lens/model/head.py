"""The LM head's own view of a batch: final hidden states, head weights and the LM-head kernel
scores (docs/attribution.md §2, eq. 6–12).

Two scores per token, both the first-order entropy change of an SGD step of the LM head alone on
the token-mean objective over the whole batch, per unit η/L (nats), no gradient:

- ``receiver`` (field ``omega_lm_head``): the change of token j's own entropy from everyone's update,
      ω_j = −(1/τ²) · a_j · (G h̃_j),   a_j = π_j ⊙ (log π_j + H_j),   G = Σ_k c_k (e_{y_k} − π_k) h̃_kᵀ
  so that ``dh_lm_head = (η/L) · ω`` (:func:`entropy_lens.attribution.dh_lm_head`);
- ``source`` (field ``omega_lm_head_source``): the change of the whole batch's summed entropy from
  token k's own update, S_k = −(c_k/τ²) · [h̃_k·R[y_k] − π_k·(R h̃_k)], R = Σ_j a_j h̃_jᵀ
  (:func:`entropy_lens.attribution.dh_lm_head_source`). Both sum to the same batch total.
"""

from __future__ import annotations

import torch

from entropy_lens.attribution import dh_lm_head, dh_lm_head_source
from entropy_lens.model.forward import PackedBatch, response_hidden, scatter_rows

#: TokenBatch field of each score -> its role (module docstring).
SCORE_FIELDS = {"omega_lm_head": "receiver", "omega_lm_head_source": "source"}
ROLES = {"receiver": dh_lm_head, "source": dh_lm_head_source}


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
    role: str = "receiver",
) -> torch.Tensor:
    """The ``role`` score of the module docstring for every response token, ``[B, T]`` float64 (0 on padding).

    ``coef`` ``[B, T]``: c_k, the coefficient of ∂ log p_k in the objective's gradient (A_k at
    θ_old, where r = 1 and no clip is active; I_k·A_k·r_k in general). One decoder forward plus
    two passes of the head over chunks of ``chunk_rows`` tokens (memory ``[V, D] + [r, V]``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_linear_head(model, "the LM-head kernel score")
    hidden = final_hidden(model, packed, micro_batch)
    weight, bias = head_weights(model)
    m = packed.mask
    score = ROLES[role](hidden, weight, bias, packed.response_ids[m], coef[m], 1.0, 1, temperature, chunk_rows)
    return scatter_rows(score.double(), m)
