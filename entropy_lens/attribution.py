"""Where a token's first-order entropy change comes from: exact splits of ``dh_jvp`` and the
LM-head kernel estimators (docs/attribution.md).

``dh_jvp`` = ∇_θ H_j · Δθ is linear in Δθ, so any split Δθ = Σ_p Δθ_p gives parts that sum to it
exactly (eq. 1): by parameter group (a partition of the coordinates, eq. 2), by the source of the
update (eq. 3–4) and by the quadrant of the source tokens (eq. 5). The LM-head estimators are
closed forms of the change caused by the LM head's own update (eq. 6–8). Pure math: tensors,
floats and ints in; no model, no I/O. Entropies in nats.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch

#: The splits ``--by`` accepts: parameter group per block (``layer``) or summed over blocks
#: (``kind``), source sequence, source quadrant.
SPLITS = ("layer", "kind", "source", "quadrant")

#: Parts of the ``source`` split (eq. 4), in display order.
SOURCE_PARTS = ("own", "group", "other")

#: Parts of the ``quadrant`` split: the quadrant of the source tokens (A = 0 tokens give no update).
QUADRANT_PARTS = ("Q1", "Q2", "Q3", "Q4")

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_ROLE_WORDS = (
    ("attn", ("attn", "attention")),
    ("mlp", ("mlp", "feed_forward", "ffn")),
    ("norm", ("norm", "ln_")),
)


def param_group(name: str) -> str:
    """The group of a parameter name (Hugging Face naming): ``embed``, ``block{i}.attn``,
    ``block{i}.mlp``, ``block{i}.norm`` (``block{i}.other`` for anything else in block i),
    ``final_norm``, ``lm_head`` or ``other``."""
    m = _BLOCK.search(name)
    if m:
        rest = name[m.end():]
        match_order = sorted(_ROLE_WORDS, key=lambda rw: rw[0] != "norm")  # "post_attention_layernorm" is a norm
        role = next((r for r, words in match_order if any(w in rest for w in words)), "other")
        return f"block{int(m.group(1))}.{role}"
    if any(w in name for w in ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in")):
        return "embed"
    if "lm_head" in name or name.startswith("embed_out"):
        return "lm_head"
    if "norm" in name or "ln_f" in name:
        return "final_norm"
    return "other"


def group_kind(group: str) -> str:
    """A group summed over blocks: ``block3.attn`` → ``attn``; other groups unchanged."""
    return group.split(".", 1)[1] if re.fullmatch(r"block\d+\.\w+", group) else group


def group_order(group: str) -> tuple[int, int, str]:
    """Sort key: embed, block 0 (attn, mlp, norm, other), block 1, …, final_norm, lm_head, other."""
    m = re.fullmatch(r"block(\d+)\.(\w+)", group)
    if m:
        roles = [r for r, _ in _ROLE_WORDS] + ["other"]
        return (1, int(m.group(1)), str(roles.index(m.group(2)) if m.group(2) in roles else 9))
    kinds = {"attn": 1, "mlp": 2, "norm": 3}
    if group in kinds:
        return (1, -1, str(kinds[group]))
    return ({"embed": 0, "final_norm": 2, "lm_head": 3}.get(group, 4), 0, group)


def split_by_group(names: list[str], groups: dict[str, str]) -> dict[str, list[str]]:
    """Parameter names per group (``groups``: name → group), groups in :func:`group_order`."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(groups[n], []).append(n)
    return {g: out[g] for g in sorted(out, key=group_order)}


def step_scale(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-coordinate scale D = Δθ / g of the real step (eq. 3), 0 where g = 0.

    SGD: D = −η (up to the rounding of θ' − θ); AdamW's first step: D = −η/(|g| + ε). The source
    parts D ⊙ g_s then sum to the real Δθ (Σ_s g_s = g), for either optimizer.
    """
    nz = grad != 0
    return torch.where(nz, delta / torch.where(nz, grad, torch.ones_like(grad)), torch.zeros_like(delta))


def parts_residual(parts: dict[str, torch.Tensor], total: torch.Tensor) -> float:
    """max_j |Σ_p d_{j,p} − d_j| / max_j |d_j|: how far the parts are from summing to the total
    (0 when the total is 0 everywhere and so are the parts)."""
    s = torch.stack(list(parts.values())).sum(0).double() if parts else torch.zeros_like(total, dtype=torch.float64)
    den = float(total.double().abs().max()) if total.numel() else 0.0
    err = float((s - total.double()).abs().max()) if total.numel() else 0.0
    return err / den if den > 0 else err


# ---------------------------------------------------------------------------------------------
# The LM-head kernel (eq. 6–8)
# ---------------------------------------------------------------------------------------------


def _with_bias(hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h̃ = [h, 1] when the head has a bias (its update adds 1 to the kernel), else h."""
    if bias is None:
        return hidden
    return torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)


def _chunk_softmax(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """(π, log π, H) of the rows ``h`` ``[r, D]``: u = (W h + b)/τ, in the dtype of ``h``."""
    z = h @ weight.to(h.dtype).T
    if bias is not None:
        z = z + bias.to(h.dtype)
    logq = torch.log_softmax(z / temperature, dim=-1)
    q = torch.exp(logq)
    return q, logq, -(q * logq).sum(-1)


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
            chunk_rows: int):
    """``(rows, h̃, π, log π, H)`` for consecutive chunks of ``chunk_rows`` tokens: the one loop of
    the LM-head forms, so that only one ``[r, V]`` block is alive at a time."""
    hb = _with_bias(hidden, bias)
    for i in range(0, hidden.shape[0], chunk_rows):
        sl = slice(i, i + chunk_rows)
        yield (sl, hb[sl], *_chunk_softmax(hidden[sl], weight, bias, temperature))


def _entropy_logit_grad(q: torch.Tensor, logq: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
    """a = π ⊙ (log π + H), ``[r, V]``: minus the gradient of H with respect to the logits u."""
    return q * (logq + ent[:, None])


def _head_scale(lr: float, n_tokens: int, temperature: float) -> float:
    """η/(Lτ²), the constant of eq. 6, 8 and 12."""
    return lr / (max(int(n_tokens), 1) * temperature**2)


def head_update_direction(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    coef: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """G = Σ_k c_k (e_{y_k} − π_k) h̃_kᵀ, ``[V, D(+1)]`` (eq. 7): the LM head's SGD direction up to
    η/(Lτ), accumulated over chunks of ``chunk_rows`` tokens so that only one ``[r, V]`` block is
    alive. ``hidden`` ``[N, D]`` final hidden states, ``weight`` ``[V, D]``, ``bias`` ``[V]`` or
    None, ``ids`` ``[N]`` sampled tokens y_k, ``coef`` ``[N]`` c_k = I_k·A_k·r_k."""
    g = torch.zeros(weight.shape[0], _with_bias(hidden[:1], bias).shape[1], dtype=hidden.dtype)
    for sl, h, q, _, _ in _chunks(hidden, weight, bias, temperature, chunk_rows):
        ch = coef[sl, None].to(hidden.dtype) * h
        g -= q.T @ ch
        g.index_add_(0, ids[sl], ch)
    return g


def dh_lm_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    coef: torch.Tensor,
    lr: float,
    n_tokens: int,
    temperature: float = 1.0,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """LM-head exact estimator ``[N]`` (nats, eq. 8): the first-order ΔH_j of every token when
    only the LM head takes the SGD step of the token-mean objective,

        ΔH_j = −(η/(Lτ²)) · a_j · (G h̃_j),   a_j = π_j ⊙ (log π_j + H_j),
        G = Σ_k c_k (e_{y_k} − π_k) h̃_kᵀ  ⇔  −(η/(Lτ²)) Σ_k c_k (h̃_k·h̃_j)[a_j(y_k) − a_j·π_k]

    (the Gram form of docs/science.md §7). Two passes over chunks of ``chunk_rows`` tokens; memory
    ``[V, D] + [r, V]``, never ``[N, V]`` or ``[N, N]``; the chunk size does not change the result.
    Arguments as in :func:`head_update_direction`; ``lr`` η, ``n_tokens`` L.
    """
    g = head_update_direction(hidden, weight, bias, ids, coef, temperature, chunk_rows)
    out = torch.empty(hidden.shape[0], dtype=hidden.dtype)
    scale = _head_scale(lr, n_tokens, temperature)
    for sl, h, q, logq, ent in _chunks(hidden, weight, bias, temperature, chunk_rows):
        out[sl] = -scale * (_entropy_logit_grad(q, logq, ent) * (h @ g.T)).sum(-1)
    return out


def dh_lm_head_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    coef: torch.Tensor,
    lr: float,
    n_tokens: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The plain Gram form of :func:`dh_lm_head` (eq. 6), ``[N]``: K = h̃ h̃ᵀ ``[N, N]`` and full
    ``[N, V]`` distributions; for tests and small batches."""
    hb = _with_bias(hidden, bias)
    q, logq, ent = _chunk_softmax(hidden, weight, bias, temperature)
    a = _entropy_logit_grad(q, logq, ent)
    bracket = a[:, ids] - a @ q.T  # [j, k] = a_j(y_k) − a_j·π_k
    kernel = hb @ hb.T
    return -_head_scale(lr, n_tokens, temperature) * (kernel * bracket * coef[None, :].to(hidden.dtype)).sum(-1)


def head_receiver_direction(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float = 1.0,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """R = Σ_j a_j h̃_jᵀ, ``[V, D(+1)]`` (eq. 11), a_j = π_j ⊙ (log π_j + H_j): every receiving
    token's entropy gradient with respect to its logits, weighted by its hidden state; accumulated
    over chunks of ``chunk_rows`` tokens (one ``[r, V]`` block alive). Arguments as in
    :func:`head_update_direction`."""
    r = torch.zeros(weight.shape[0], _with_bias(hidden[:1], bias).shape[1], dtype=hidden.dtype)
    for _, h, q, logq, ent in _chunks(hidden, weight, bias, temperature, chunk_rows):
        r += _entropy_logit_grad(q, logq, ent).T @ h
    return r


def dh_lm_head_source(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    coef: torch.Tensor,
    lr: float,
    n_tokens: int,
    temperature: float = 1.0,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """Source form of eq. 6, ``[N]`` (nats): the first-order change of the batch's summed entropy
    caused by token k's own share of the LM head's SGD step — the k-th column of eq. 6 summed over
    the receivers j,

        S_k = −(η/(Lτ²)) Σ_j c_k (h̃_k·h̃_j)[a_j(y_k) − a_j·π_k]
            = −(η/(Lτ²)) · c_k · [h̃_k·R[y_k] − π_k·(R h̃_k)]            (eq. 12)

    with R of :func:`head_receiver_direction`. Σ_k S_k = Σ_j dh_lm_head_j. Two passes over chunks
    of ``chunk_rows`` tokens, memory ``[V, D] + [r, V]``. Arguments as in :func:`dh_lm_head`."""
    r = head_receiver_direction(hidden, weight, bias, temperature, chunk_rows)
    out = torch.empty(hidden.shape[0], dtype=hidden.dtype)
    scale = _head_scale(lr, n_tokens, temperature)
    for sl, h, q, _, _ in _chunks(hidden, weight, bias, temperature, chunk_rows):
        bracket = (h * r[ids[sl]]).sum(-1) - (q * (h @ r.T)).sum(-1)
        out[sl] = -scale * coef[sl].to(hidden.dtype) * bracket
    return out


def dh_self_kernel(dh_all_logit: torch.Tensor, sq_norm: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Self term with the true LM-head kernel (eq. 9), any shape (nats): the k = j term of eq. 6,

        ΔH_j^self = (‖h̃_j‖² / τ²) · dh_all_logit_j

    ``sq_norm`` ‖h̃_j‖² (‖h_j‖² + 1 with a head bias); ``dh_all_logit`` at the same η, L, A, r, I.
    """
    return dh_all_logit * sq_norm / temperature**2


# ---------------------------------------------------------------------------------------------
# Tables of a split
# ---------------------------------------------------------------------------------------------


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def part_table(parts: pd.DataFrame, total: np.ndarray, receiver_quadrant: np.ndarray) -> dict[str, dict]:
    """Per part of one split: ``share_abs`` = Σ_j|d_{j,p}| / Σ_p Σ_j|d_{j,p}| (share of Σ|ΔH|),
    ``sum`` Σ_j d_{j,p} (nats), ``share_total`` = sum / Σ_j d_j, ``pcc_total`` (Pearson of d_{·,p}
    with the total d over tokens) and ``by_receiver`` (Σ d_{j,p} over the receivers of each
    quadrant Q0–Q4). ``parts``: wide ``[N, P]`` frame (a column per part), ``total`` ``[N]``,
    ``receiver_quadrant`` ``[N]`` ints 0..4."""
    absum = float(np.abs(parts.to_numpy(np.float64)).sum())
    tot = float(np.sum(total))
    out = {}
    for p in parts.columns:  # a few dozen parts at most
        d = parts[p].to_numpy(np.float64)
        out[str(p)] = {
            "share_abs": float(np.abs(d).sum()) / absum if absum > 0 else float("nan"),
            "sum": float(d.sum()),
            "share_total": float(d.sum()) / tot if tot != 0 else float("nan"),
            "pcc_total": _pcc(d, np.asarray(total, np.float64)),
            "by_receiver": {f"Q{q}": float(d[receiver_quadrant == q].sum()) for q in range(5)},
        }
    return out
