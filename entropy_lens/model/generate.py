"""The one generation loop (``sample``, the trainer's rollouts and its evaluations): exact token ids
and, when asked, the behaviour log-probs of every sampled token.

Sampling is from the softmax at temperature τ, optionally truncated to its nucleus (top-p,
Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751); top-k is
off. The recorded ``old_logp`` is always log π_θ(a|s) of the *full* tempered softmax, the
probability the trainer's loss uses, not the probability of the truncated sampler: with
``top_p < 1`` the two differ by log Z_p, Z_p = the nucleus' probability mass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from entropy_lens.logits import logit_stats
from entropy_lens.model.load import model_device


def check_top_p(top_p: float) -> None:
    """``top_p`` is a number in (0, 1] (1: the full softmax)."""
    try:
        ok = 0.0 < float(top_p) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


#: Key-value caches of the generation loop: ``dynamic`` (grows with the sequence; the default) or
#: ``static`` (pre-allocated to prompt width + ``max_new_tokens``; on CUDA transformers then compiles
#: the decoding step, which pays off on long generations after a one-time compile per shape).
KV_CACHES = ("dynamic", "static")


def check_kv_cache(kv_cache: str) -> None:
    """``kv_cache`` is one of :data:`KV_CACHES`."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be dynamic or static, got {kv_cache!r}")


def cache_options(kv_cache: str) -> dict:
    """The ``model.generate`` keywords of a :data:`KV_CACHES` name (none for ``dynamic``, the default)."""
    check_kv_cache(kv_cache)
    return {"cache_implementation": "static"} if kv_cache == "static" else {}


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, width]`` ids and attention mask of prompts left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # per prompt: packing only
        ids[r, width - len(p):] = torch.as_tensor(p)
        attn[r, width - len(p):] = 1
    return ids, attn


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    n: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float | None = None,
    seed: int = 0,
    record_logp: bool = False,
    progress: Callable[[int], None] | None = None,
    top_p: float = 1.0,
    kv_cache: str = "dynamic",
) -> list[dict]:
    """``n`` responses per prompt, prompt-major; the one generation loop of the toolkit.

    ``temperature=None``: greedy; else sampling at τ after ``torch.manual_seed(seed)``, from the
    full softmax (``top_p=1``, the default) or from its nucleus: the smallest set of most probable
    tokens whose tempered probability mass reaches ``top_p`` ∈ (0, 1], renormalised (a token is
    kept iff the mass of the tokens ranked above it is < ``top_p``). Returns one dict per response:
    ``prompt_index, prompt_ids, response_ids`` (up to and including the first EOS), ``finished``
    (an EOS was emitted) and, with ``record_logp``, ``old_logp``: log π(a|s) at τ of every
    response token (nats) under the full tempered softmax (also when ``top_p < 1``), from the
    logits ``generate`` produced. The tokens do not depend on ``record_logp``. ``progress(k)``
    after each batch of k responses. ``kv_cache``: :data:`KV_CACHES` (the tokens agree across the
    two up to floating-point rounding of the logits). Inputs go to the model's device; results come
    back on the CPU.
    """
    if temperature is not None and not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_top_p(top_p)
    if temperature is not None:
        torch.manual_seed(seed)
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": float(top_p)}
                if temperature is not None else {"do_sample": False})
    sampling.update(cache_options(kv_cache))
    jobs = response_jobs(prompt_ids, n)
    out: list[dict] = []
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        out.extend(_generate_chunk(model, tokenizer, chunk, max_new_tokens, sampling, temperature, record_logp))
        if progress:
            progress(len(chunk))
    return out


def _generate_chunk(model, tokenizer, chunk: list[tuple[int, list[int]]], max_new_tokens: int, sampling: dict,
                    temperature: float | None, record_logp: bool) -> list[dict]:
    """One ``model.generate`` call over ``chunk`` (``(prompt_index, prompt ids)`` per response,
    left-padded together) with the current random state. The ids and mask go to the model's device
    once; the behaviour log-probs of the ``[b, steps]`` block are computed there step by step from
    generate's ``[b, V]`` logits (fp32 reductions, :func:`entropy_lens.logits.logit_stats`; no
    stacked ``[b, steps, V]`` copy) and come back to the CPU with the ids in one copy each. Returns one dict per response (see :func:`generate`)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = model_device(model)  # the input embedding's device (also under a device map)
    ids, attn = _left_padded([p for _, p in chunk], pad)
    ids, attn = ids.to(device), attn.to(device)
    gen = model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        output_logits=record_logp, return_dict_in_generate=True, **sampling,
    )
    seq_dev = gen.sequences[:, ids.shape[1]:]  # [b, steps]
    logp = None
    if record_logp:  # step by step over generate's [b, V] logits: no stacked [b, steps, V] copy
        tau = temperature or 1.0
        logp = torch.stack([logit_stats(x, seq_dev[:, t], tau).logp for t, x in enumerate(gen.logits)], dim=1).cpu()
    del gen  # the per-step logits go with it
    seq = seq_dev.cpu()
    items = []
    for r, (pi, p) in enumerate(chunk):  # per response: slicing the CPU copies only
        toks = seq[r].tolist()
        end = toks.index(eos) + 1 if eos in toks else len(toks)
        item = {"prompt_index": pi, "prompt_ids": list(p), "response_ids": toks[:end], "finished": eos in toks}
        if logp is not None:
            item["old_logp"] = logp[r, :end].tolist()
        items.append(item)
    return items


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch ``k`` of a run seeded with ``seed``: the first 63 bits of
    SHA-256(``"seed:k"``). Every batch has its own stream, so a batch's responses do not depend on
    which batches ran before it in the same process (the property that lets ranks split the
    batches and still produce the single-process result)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def response_jobs(prompt_ids: list[list[int]], n: int) -> list[tuple[int, list[int]]]:
    """``(prompt_index, prompt ids)`` of every response, prompt-major: prompt i's ``n`` copies."""
    return [(i, p) for i, p in enumerate(prompt_ids) for _ in range(n)]


@torch.no_grad()
def generate_batches(
    model,
    tokenizer,
    jobs: list[tuple[int, list[int]]],
    batches: list[int],
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    top_p: float = 1.0,
    kv_cache: str = "dynamic",
) -> dict[int, list[dict]]:
    """Sampled responses with behaviour log-probs for the batches numbered ``batches`` of ``jobs``
    (:func:`response_jobs`) cut into consecutive batches of ``batch_size`` responses. Batch k is
    generated right after ``torch.manual_seed(batch_seed(seed, k))``, so its responses depend only
    on (seed, k, its jobs, the model and the device's arithmetic), not on the other batches: any
    split of the batches across processes gives the same responses as one process running them
    all. Returns ``{k: [dict per response, as sample_responses]}``; ``progress(responses,
    tokens)`` after each batch (response tokens generated, EOS included). ``kv_cache``: as
    :func:`generate`."""
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_top_p(top_p)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": float(top_p),
                **cache_options(kv_cache)}
    out: dict[int, list[dict]] = {}
    for k in batches:
        chunk = jobs[k * batch_size : (k + 1) * batch_size]
        torch.manual_seed(batch_seed(seed, k))
        out[k] = _generate_chunk(model, tokenizer, chunk, max_new_tokens, sampling, temperature, True)
        if progress:
            progress(len(chunk), sum(len(o["response_ids"]) for o in out[k]))
    return out


def sample_responses(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    n: int,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    top_p: float = 1.0,
    kv_cache: str = "dynamic",
) -> list[dict]:
    """``n`` sampled responses per prompt with their behaviour log-probs: :func:`generate` at τ
    (nucleus ``top_p``) with ``record_logp``. One dict per response, prompt-major order:
    ``prompt_index, prompt_ids, response_ids, old_logp, finished`` (ids include the final EOS when
    the model emitted one; ``old_logp`` in nats under the full softmax at τ, also when
    ``top_p < 1``)."""
    if temperature is None:
        raise ValueError("temperature must be > 0, got None")
    return generate(model, tokenizer, prompt_ids, n, max_new_tokens, batch_size, temperature, seed,
                    record_logp=True, progress=progress, top_p=top_p, kv_cache=kv_cache)
