"""The one generation loop (``sample``, the trainer's rollouts and its evaluations): exact token ids
and, when asked, the behaviour log-probs of every sampled token.

Sampling is from the full softmax at temperature τ (top-k and top-p off), so the recorded
``old_logp`` is log π_θ(a|s) at τ of the policy that generated the token.
"""

from __future__ import annotations

from typing import Callable

import torch

from entropy_lens.logits import logit_stats


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
) -> list[dict]:
    """``n`` responses per prompt, prompt-major; the one generation loop of the toolkit.

    ``temperature=None``: greedy; else sampling from the full softmax at τ (top-k and top-p off)
    after ``torch.manual_seed(seed)``. Returns one dict per response: ``prompt_index, prompt_ids,
    response_ids`` (up to and including the first EOS), ``finished`` (an EOS was emitted) and, with
    ``record_logp``, ``old_logp``: log π(a|s) at τ of every response token (nats), from the logits
    ``generate`` produced. The tokens do not depend on ``record_logp``. ``progress(k)`` after each
    batch of k responses.
    """
    if temperature is not None and not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature is not None:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature is not None else dict(do_sample=False)
    jobs = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(n)]
    out: list[dict] = []
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        ids, attn = _left_padded([p for _, p in chunk], pad)
        gen = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
            output_logits=record_logp, return_dict_in_generate=True, **sampling,
        )
        seq = gen.sequences[:, ids.shape[1]:]
        logits = torch.stack(gen.logits, dim=1) if record_logp else None  # [b, steps, V]
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
) -> list[dict]:
    """``n`` sampled responses per prompt with their behaviour log-probs: :func:`generate` at τ with
    ``record_logp``. One dict per response, prompt-major order: ``prompt_index, prompt_ids,
    response_ids, old_logp, finished`` (ids include the final EOS when the model emitted one;
    ``old_logp`` in nats at τ)."""
    if temperature is None:
        raise ValueError("temperature must be > 0, got None")
    return generate(model, tokenizer, prompt_ids, n, max_new_tokens, batch_size, temperature, seed,
                    record_logp=True, progress=progress)
