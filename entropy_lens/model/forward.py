"""Batched causal-LM forward restricted to response positions.

Sequences are packed as ``prompt + response`` (right-padded). The state that predicts response
token t of sequence b is position ``P_b + t − 1`` (P_b = prompt length). Hidden states are taken
from the decoder and only the response rows go through the LM head, chunk by chunk, so full
``[B, S, V]`` logits are never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropy_lens.kernels import logit_stats_auto
from entropy_lens.logits import DEFAULT_CHUNK_BYTES, SCRATCH_BYTES, default_chunk_rows


@dataclass(frozen=True)
class PackedBatch:
    """``input_ids``/``attention_mask``: ``[B, S]``; ``response_ids``/``mask``: ``[B, T]``;
    ``state_pos``: ``[B, T]`` index into S of the state predicting each response token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    state_pos: torch.Tensor

    def select(self, rows: slice | torch.Tensor) -> "PackedBatch":
        """Sub-batch of sequences (trailing all-padding columns kept)."""
        return PackedBatch(*(getattr(self, f)[rows] for f in ("input_ids", "attention_mask", "response_ids", "mask", "state_pos")))

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch on ``device`` (itself when already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return PackedBatch(*(getattr(self, f).to(device) for f in ("input_ids", "attention_mask", "response_ids", "mask", "state_pos")))


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PackedBatch:
    """Pack token-id lists into a right-padded :class:`PackedBatch` (prompts must be non-empty)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("pack: prompt and response lists differ in length")
    B = len(prompt_ids)
    S = max((len(p) + len(r) for p, r in zip(prompt_ids, response_ids)), default=0)
    T = max((len(r) for r in response_ids), default=0)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    resp = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    state_pos = torch.zeros((B, T), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):  # loop over samples: packing only
        if not p:
            raise ValueError(f"sample {b}: empty prompt (a response token needs a preceding state)")
        n = len(p) + len(r)
        input_ids[b, :n] = torch.as_tensor(list(p) + list(r))
        attn[b, :n] = 1
        resp[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[b, : len(r)] = True
        state_pos[b, : len(r)] = torch.arange(len(p) - 1, n - 1)
    return PackedBatch(input_ids, attn, resp, mask, state_pos)


def decoder_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, S, D]`` of a causal LM's decoder (before the LM head)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def response_hidden(model, packed: PackedBatch) -> torch.Tensor:
    """Hidden states of the valid response states, ``[M, D]`` in row-major order of ``mask``, on
    the device of the decoder's last layer (the inputs' device unless a device map spread the
    model: then the indices follow the hidden states there)."""
    h = decoder_hidden(model, packed.input_ids, packed.attention_mask)
    b_idx, t_idx = torch.nonzero(packed.mask, as_tuple=True)
    pos = packed.state_pos[b_idx, t_idx]
    if h.device != b_idx.device:
        b_idx, pos = b_idx.to(h.device), pos.to(h.device)
    return h[b_idx, pos]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits for hidden rows ``[M, D] -> [M, V]`` (applies logit soft-capping if the
    config defines ``final_logit_softcapping``; in place when autograd is off)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        if torch.is_grad_enabled():
            logits = torch.tanh(logits / cap) * cap
        else:
            logits.div_(cap).tanh_().mul_(cap)
    return logits


def head_chunk_rows(vocab: int, head_itemsize: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows r of LM-head logits per chunk so that the chunk (``head_itemsize`` bytes per logit)
    plus the scratch blocks of :func:`entropy_lens.logits.logit_stats` fit in ``chunk_bytes``:
    one fp32 block of min(r, s) rows when the head is fp32 and the chunk is consumed in place,
    else two (s = rows of a ~4 MiB block, the CPU block size; on CUDA the Triton kernel needs no
    scratch)."""
    v = max(vocab, 1)
    k = 1 if head_itemsize == 4 else 2
    s = default_chunk_rows(v, SCRATCH_BYTES)
    r = (chunk_bytes - k * s * 4 * v) // (head_itemsize * v)
    if r < s:  # small budget: the scratch shrinks to the chunk
        r = chunk_bytes // ((head_itemsize + 4 * k) * v)
    return max(1, r)


def scatter_rows(values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Place ``[M, ...]`` row values back onto the ``[B, T, ...]`` grid of ``mask`` (row-major)."""
    out = torch.full(tuple(mask.shape) + tuple(values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


@torch.no_grad()
def response_stats(
    model,
    packed: PackedBatch,
    temperature: float = 1.0,
    micro_batch: int = 8,
    chunk_rows: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """No-grad per-token ``logp, entropy, sum_p2, sum_p2_logp`` as ``[B, T]`` fp32 (0 on padding).

    Sequences go through the decoder ``micro_batch`` at a time; LM-head logits are formed only
    for one chunk of response rows at a time and consumed in place by the statistics pass, so all
    tensors of vocabulary width alive at once (logits chunk + scratch) take at most
    ``chunk_bytes`` (default 32 MiB; :func:`head_chunk_rows`) unless ``chunk_rows`` fixes the
    rows per chunk.
    """
    B, T = packed.mask.shape
    out = {k: torch.zeros(B, T, dtype=torch.float32) for k in ("logp", "entropy", "sum_p2", "sum_p2_logp")}
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    rows = chunk_rows or head_chunk_rows(vocab, weight.element_size(), chunk_bytes)
    for i in range(0, B, micro_batch):
        sub = packed.select(slice(i, i + micro_batch))
        h = response_hidden(model, sub)
        ids = sub.response_ids[sub.mask]
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in out}
        for j in range(0, h.shape[0], rows):
            st = logit_stats_auto(head_logits(model, h[j : j + rows]), ids[j : j + rows], temperature, consume=True)
            for k in out:
                parts[k].append(getattr(st, k))
        for k in out:
            vals = torch.cat(parts[k]) if parts[k] else torch.zeros(0)
            out[k][i : i + micro_batch] = scatter_rows(vals.float().cpu(), sub.mask)
    return out


#: Above this many bytes of fp32 ``[M, V]`` logits the differentiable pass goes chunk by chunk
#: (:func:`response_logp_entropy`); below it one plain pass is cheaper (no recomputation).
GRAD_CHUNK_BYTES = 256 * 2**20


def _logp_entropy_rows(
    model, hidden: torch.Tensor, ids: torch.Tensor, temperature: float, promote: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p of ids, H)`` ``[r]`` each (nats) for hidden rows ``[r, D]``, differentiable:
    z = head(h)/τ, log q = log_softmax(z), log p = log q[id], H = −Σ_v q_v log q_v, in fp32 (with
    ``promote``: in the logits' dtype when it is wider, i.e. float64 for a float64 model)."""
    z = head_logits(model, hidden)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) if promote else z.float()
    logq = torch.log_softmax(z / temperature, dim=-1)
    logp = logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp, -(torch.exp(logq) * logq).sum(-1)


#: Differentiable head paths of :func:`response_logp_entropy`.
HEAD_PATHS = ("auto", "closed-form", "autograd")


def closed_form_head_applies(model) -> bool:
    """Whether the LM head is a plain linear map z = h·Wᵀ (no bias, no logit soft-capping), the case
    :func:`entropy_lens.kernels.head_grad.head_logp_entropy` covers."""
    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
    )


def response_logp_entropy(
    model,
    packed: PackedBatch,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    chunk_bytes: int = GRAD_CHUNK_BYTES,
    head: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(logp, entropy)`` ``[B, T]`` fp32 of the response tokens (0 on padding).

    The loss path (trainer, ``validate``, ``compare --measure``). Two ways through the LM head, equal
    in value and gradient up to rounding (tests/test_forward.py, tests/test_head_grad.py):

    - ``closed-form``: :func:`entropy_lens.kernels.head_grad.head_logp_entropy`: the statistics pass
      reads each chunk of logits once, and backward recomputes the chunk and applies the closed-form
      gradient; no ``[M, V]`` tensor is kept for backward and the vocabulary-width memory is one
      chunk (``chunk_rows`` rows; default two fp32 ``[rows, V]`` buffers in 128 MiB). Needs a plain
      linear head (:func:`closed_form_head_applies`).
    - ``autograd``: the LM head, ``log_softmax`` and autograd; when the batch's fp32 logits ``[M, V]``
      would exceed ``chunk_bytes`` (or ``chunk_rows`` is given) it runs on ``chunk_rows`` rows at a
      time under activation checkpointing (each chunk recomputed in backward), so its
      vocabulary-width memory is also bounded by one chunk (a few ``[r, V]`` temporaries).
    - ``auto`` (default): ``closed-form`` when autograd is on and the head applies, else ``autograd``
      (benchmarks/RESULTS.md, "Differentiable loss path").
    """
    if head not in HEAD_PATHS:
        raise ValueError(f"head must be one of {', '.join(HEAD_PATHS)}, got {head!r}")
    h = response_hidden(model, packed)
    ids = packed.response_ids[packed.mask]
    M = h.shape[0]
    applies = closed_form_head_applies(model)
    if head == "closed-form" and not applies:
        raise ValueError("head='closed-form' needs a linear LM head without bias or logit soft-capping")
    if head == "closed-form" or (head == "auto" and applies and torch.is_grad_enabled()):
        from entropy_lens.kernels.head_grad import head_logp_entropy

        weight = model.get_output_embeddings().weight
        logp, ent = head_logp_entropy(h, weight, ids, temperature, chunk_rows)  # float64 for a float64 model
        return scatter_rows(logp.float(), packed.mask), scatter_rows(ent.float(), packed.mask)
    vocab = model.get_output_embeddings().weight.shape[0]
    if chunk_rows is None:
        chunk_rows = M if M * vocab * 4 <= chunk_bytes else max(1, chunk_bytes // (4 * 4 * vocab))
    if chunk_rows >= M or not torch.is_grad_enabled():
        logp, ent = _logp_entropy_rows(model, h, ids, temperature)
    else:
        from torch.utils.checkpoint import checkpoint

        parts = [
            checkpoint(_logp_entropy_rows, model, h[j : j + chunk_rows], ids[j : j + chunk_rows], temperature,
                       use_reentrant=False)
            for j in range(0, M, chunk_rows)  # loop over row chunks
        ]
        logp = torch.cat([p[0] for p in parts])
        ent = torch.cat([p[1] for p in parts])
    return scatter_rows(logp, packed.mask), scatter_rows(ent, packed.mask)


class ResponseEntropy(torch.nn.Module):
    """Module view ``() -> H [M]`` (nats) of a causal LM on one packed batch, for
    ``torch.func.functional_call`` (the JVP, the attribution). The softmax runs in fp32, or with
    ``promote`` in the logits' dtype when that is wider (float64 models keep float64)."""

    def __init__(self, model, packed: PackedBatch, temperature: float, promote: bool = False):
        super().__init__()
        self.model = model
        self.packed = packed
        self.temperature = temperature
        self.promote = promote

    def forward(self) -> torch.Tensor:
        h = response_hidden(self.model, self.packed)
        ids = self.packed.response_ids[self.packed.mask]
        return _logp_entropy_rows(self.model, h, ids, self.temperature, self.promote)[1]


def response_entropy_fn(model, packed: PackedBatch, temperature: float = 1.0):
    """``params -> H [M]`` (nats) over the valid response states of ``packed``, with the model's
    parameters replaced by ``params`` (names as in ``model.named_parameters()``); for
    :func:`estimators.dh_jvp`. Tied weights (embedding = LM head) stay tied."""
    view = ResponseEntropy(model, packed, temperature)

    def fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(view, {f"model.{k}": v for k, v in params.items()}, (), tie_weights=True, strict=False)

    return fn
