"""The one generation loop (``sample``, the trainer's rollouts and its evaluations): exact token ids
and, when asked, the behaviour log-probs of every sampled token.

Sampling is from the softmax at temperature τ, optionally truncated to its nucleus (top-p,
Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751); top-k is
off. The recorded ``old_logp`` is always log π_θ(a|s) of the *full* tempered softmax, the
probability the trainer's loss uses, not the probability of the truncated sampler: with
``top_p < 1`` the two differ by log Z_p, Z_p = the nucleus' probability mass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from entropy_lens.logits import logit_stats


def check_top_p(top_p: float) -> None:
    """``top_p`` is a number in (0, 1] (1: the full softmax)."""
    try:
        ok = 0.0 < float(top_p) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _device_of(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


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
    after each batch of k responses. Inputs go to the model's device; results come back on the CPU.
    """
    if temperature is not None and not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_top_p(top_p)
    if temperature is not None:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": float(top_p)}
                if temperature is not None else {"do_sample": False})
    device = _device_of(model)
    jobs = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(n)]
    out: list[dict] = []
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        ids, attn = _left_padded([p for _, p in chunk], pad)
        ids, attn = ids.to(device), attn.to(device)
        gen = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
            output_logits=record_logp, return_dict_in_generate=True, **sampling,
        )
        seq = gen.sequences[:, ids.shape[1]:].cpu()
        logits = torch.stack(gen.logits, dim=1).cpu() if record_logp else None  # [b, steps, V]
        for r, (pi, p) in enumerate(chunk):
            toks = seq[r].tolist()
            end = toks.index(eos) + 1 if eos in toks else len(toks)
            item = {"prompt_index": pi, "prompt_ids": list(p), "response_ids": toks[:end], "finished": eos in toks}
            if logits is not None:
                item["old_logp"] = logit_stats(logits[r, :end], torch.as_tensor(toks[:end]), temperature or 1.0).logp.tolist()
            out.append(item)
        if progress:
            progress(len(chunk))
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
) -> list[dict]:
    """``n`` sampled responses per prompt with their behaviour log-probs: :func:`generate` at τ
    (nucleus ``top_p``) with ``record_logp``. One dict per response, prompt-major order:
    ``prompt_index, prompt_ids, response_ids, old_logp, finished`` (ids include the final EOS when
    the model emitted one; ``old_logp`` in nats under the full softmax at τ, also when
    ``top_p < 1``)."""
    if temperature is None:
        raise ValueError("temperature must be > 0, got None")
    return generate(model, tokenizer, prompt_ids, n, max_new_tokens, batch_size, temperature, seed,
                    record_logp=True, progress=progress, top_p=top_p)
