"""Memory budget of a run on recorded rollouts: an estimate of the peak, checked before the work.

A long response is quadratic in memory where attention is eager (the JVP of ``validate`` runs
forward-mode AD through eager attention) and linear but large in the LM head of the update
(logits of every response row of a micro-batch at once). Without a check, a 12k-token response
on a 1-layer model grows to tens of GB and is killed by the OS, with no message.

:func:`estimate_peak_bytes` adds the dominant terms (bytes). Notation: ``b`` = min(micro_batch,
number of sequences) sequences per micro-batch; ``S`` = the longest packed length (prompt +
response; every micro-batch is padded to it); ``M`` = the sum of the ``b`` largest response
lengths (the response rows of one micro-batch); ``L`` layers, ``d`` hidden size, ``h`` attention
heads, ``I`` MLP width (default 4d), ``V`` vocabulary, ``e`` bytes per parameter element,
``P`` parameters::

    params          = 4·P·e                 e = 4: the weights, snapshot θ, gradient, update Δθ
                    = P·(e + 12)            e < 4 (bf16/fp16): the weights, plus at most three fp32
                                            copies alive at once (the master, its gradient and Δθ
                                            around the step; the measuring copy and Δθ after it)
    update          = b·S·L·(12d + 6I)·e    activations saved for backward
                    + 4·M·V·4               fp32 logits, log-softmax, softmax and a gradient of them
                                            (autograd through the LM head), or
                    + 3·min(M, R)·V·4       with the closed-form head (a plain linear head, the
                      [+ (4 + 2e)·V·d]      default): one chunk of R = 128 MiB / (8·V) rows (1 GiB
                                            on CUDA) in the forward, two in backward
                                            (``kernels/head_grad.py``);
                                            for e < 4 also its fp32 ∂L/∂W accumulator, one
                                            chunk's [V, d] product and the cast back
                    [+ 2·L·b·h·S²·e]        eager attention only: scores and probabilities per layer
    jvp             = 6·b·h·S²·4            eager attention under forward-mode AD (scores and fp32
                                            probabilities with their tangents, one layer at a time)
                    + 2·b·S·(12d + 6I)·e    one layer's activations and their tangents
                    + 8·M·V·4               the LM head's logits, softmax and their tangents
    forward         = b·S·(12d + 6I)·e + 40 MiB   one layer's activations, one LM-head chunk
    peak            = params + max(update, jvp if jvp else 0, forward)

The constants were fitted to measured peaks of Llama models (2–6 layers, up to SmolLM2-135M's
widths; live-tensor accounting and resident memory) and round up: the estimate came out between
1 and 1.5 times the measured peak, close enough to refuse a run that cannot fit instead of
letting the OS kill it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from entropy_lens.kernels.head_grad import (
    HEAD_CHUNK_BYTES,
    default_chunk_bytes,
    grad_chunk_rows,
)
from entropy_lens.model.forward import closed_form_head_applies
from entropy_lens.model.load import model_device

MiB = 2**20
GiB = 2**30

#: One LM-head chunk plus scratch of the no-grad statistics pass (``logits.DEFAULT_CHUNK_BYTES``
#: and the CPU scratch blocks), rounded up.
FORWARD_CHUNK_BYTES = 40 * MiB


def _act_per_token(hidden: int, intermediate: int, dtype_bytes: int) -> int:
    """Bytes of one layer's activations per token: (12d + 6I)·e."""
    return (12 * hidden + 6 * intermediate) * dtype_bytes


def estimate_terms(
    lengths: list[int],
    n_layers: int,
    hidden: int,
    n_heads: int,
    vocab: int,
    micro_batch: int,
    dtype_bytes: int,
    jvp: bool,
    *,
    response_lengths: list[int] | None = None,
    intermediate: int | None = None,
    n_params: int = 0,
    eager: bool = False,
    closed_form_head: bool = False,
    head_chunk_bytes: int | None = None,
) -> dict[str, int]:
    """The terms of the module docstring's formula, in bytes: ``params``, ``update``, ``jvp``
    (0 when ``jvp`` is False), ``forward`` and ``peak``.

    ``lengths``: packed tokens (prompt + response) per sequence; ``response_lengths``: response
    tokens per sequence (default: ``lengths``, an upper bound); ``eager``: the update runs with eager
    attention too (otherwise SDPA, linear in S); ``closed_form_head``: the update's LM head takes the
    closed-form path (``model.forward.response_logp_entropy``, ``head="auto"`` on a plain linear head),
    whose two ``[R, V]`` fp32 buffers take ``head_chunk_bytes`` (default ``HEAD_CHUNK_BYTES``, the CPU's).
    """
    if not lengths:
        return {"params": 0, "update": 0, "jvp": 0, "forward": 0, "peak": 0}
    resp = list(response_lengths) if response_lengths is not None else list(lengths)
    b = max(1, min(int(micro_batch), len(lengths)))
    S = max(lengths)
    M = sum(sorted(resp, reverse=True)[:b])
    act = _act_per_token(hidden, intermediate or 4 * hidden, dtype_bytes)
    params = 4 * n_params * dtype_bytes if dtype_bytes >= 4 else n_params * (dtype_bytes + 12)
    if closed_form_head:
        head = 3 * min(M, grad_chunk_rows(vocab, head_chunk_bytes or HEAD_CHUNK_BYTES)) * vocab * 4
        if dtype_bytes < 4:
            head += (4 + 2 * dtype_bytes) * vocab * hidden
    else:
        head = 4 * M * vocab * 4
    update = b * S * n_layers * act + head
    if eager:
        update += 2 * n_layers * b * n_heads * S * S * dtype_bytes
    jvp_bytes = (6 * b * n_heads * S * S * 4 + 2 * b * S * act + 8 * M * vocab * 4) if jvp else 0
    forward = b * S * act + FORWARD_CHUNK_BYTES
    return {"params": params, "update": update, "jvp": jvp_bytes, "forward": forward,
            "peak": params + max(update, jvp_bytes, forward)}


def estimate_peak_bytes(*args, **kwargs) -> int:
    """Estimated peak bytes of a validate-like run (forward, one update, optionally the JVP): the
    ``peak`` of :func:`estimate_terms`, which takes the same arguments (formula in the module
    docstring)."""
    return estimate_terms(*args, **kwargs)["peak"]


def parse_meminfo(text: str) -> int | None:
    """``MemAvailable`` of a ``/proc/meminfo`` text in bytes, or None when it is not there."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _cgroup_room(root: Path) -> int | None:
    """Bytes left under a cgroup v2 memory limit (``memory.max`` − ``memory.current``), or None
    when there is no limit or it cannot be read."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = (root / "memory.current").read_text().strip()
    except OSError:
        return None
    if not limit.isdigit() or not used.isdigit():
        return None  # "max": no limit
    return max(0, int(limit) - int(used))


def available_memory_bytes(
    device: Any = None, meminfo: str | Path = "/proc/meminfo", cgroup: str | Path = "/sys/fs/cgroup"
) -> int | None:
    """Memory a run can still use, in bytes, or None when unknown.

    On a CUDA device: the free device memory. Otherwise ``MemAvailable`` of ``/proc/meminfo``,
    lowered to the room left under the process's cgroup v2 memory limit when there is one
    (containers). None where neither can be read (e.g. not Linux).
    """
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        avail = parse_meminfo(Path(meminfo).read_text())
    except OSError:
        avail = None
    room = _cgroup_room(Path(cgroup))
    if avail is None or room is None:
        return avail if room is None else room
    return min(avail, room)


def model_dims(model) -> dict[str, int] | None:
    """``n_layers, hidden, n_heads, vocab, intermediate, n_params, dtype_bytes`` of a loaded causal
    LM, read defensively from ``model.config`` (common names of several families; the text config
    of a multimodal one) and the LM head; None when a needed size cannot be found."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def first(*names: str) -> int | None:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(head.weight.shape[0]) if head is not None else first("vocab_size")
    dims = {
        "n_layers": first("num_hidden_layers", "n_layer", "num_layers"),
        "hidden": first("hidden_size", "n_embd", "d_model"),
        "n_heads": first("num_attention_heads", "n_head", "num_heads"),
        "vocab": vocab,
    }
    if any(v is None for v in dims.values()):
        return None
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    dims["intermediate"] = first("intermediate_size", "n_inner", "ffn_dim") or 4 * dims["hidden"]
    dims["n_params"] = sum(p.numel() for p in params)
    dims["dtype_bytes"] = params[0].element_size() if params else 4
    return dims


def _size(n: float) -> str:
    """Bytes as ``"12.3 GiB"`` / ``"850 MiB"``."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def check_budget(
    lengths: list[int],
    model,
    micro_batch: int,
    jvp: bool,
    *,
    response_lengths: list[int] | None = None,
    available: int | None = None,
    what: str = "validate",
) -> int | None:
    """Raise a one-line ValueError when the estimated peak (:func:`estimate_terms` with the
    model's sizes, :func:`model_dims`) exceeds the available memory (``available``, default
    :func:`available_memory_bytes` of the model's device). Returns the estimate in bytes, or None
    when the model's sizes cannot be read (no check).

    The message names the longest sequence (its row, packed and response tokens), the estimate
    and its largest term, the available memory, and what to lower.
    """
    dims = model_dims(model)
    if dims is None or not lengths:
        return None
    eager = getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager"
    terms = estimate_terms(
        lengths, dims["n_layers"], dims["hidden"], dims["n_heads"], dims["vocab"], micro_batch, dims["dtype_bytes"],
        jvp, response_lengths=response_lengths, intermediate=dims["intermediate"], n_params=dims["n_params"], eager=eager,
        closed_form_head=closed_form_head_applies(model),
        head_chunk_bytes=default_chunk_bytes(model_device(model).type == "cuda"),
    )
    if available is None:
        params = list(model.parameters())
        available = available_memory_bytes(params[0].device if params else None)
    if available is None or terms["peak"] <= available:
        return terms["peak"]
    row = max(range(len(lengths)), key=lambda i: lengths[i])
    resp = (response_lengths or lengths)[row]
    top = max(("update", "jvp"), key=lambda k: terms[k])
    fixes = ("a smaller --micro-batch or " if micro_batch > 1 else "") + "a smaller --max-len" + (
        ", or --no-jvp" if jvp and top == "jvp" else "")
    raise ValueError(
        f"{what}: not enough memory: the longest sequence (row {row}: {lengths[row]} tokens, {resp} of them response) "
        f"needs about {_size(terms['peak'])} at micro-batch {micro_batch} (the {top} step is the largest part), "
        f"but {_size(available)} is available; use {fixes}"
    )
