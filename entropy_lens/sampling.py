"""Sampling real rollouts from a causal LM, recording exact token ids and behaviour log-probs.

Sampling is from the full softmax at temperature τ (top-k and top-p off), so the recorded
``old_logp`` is log π_θ(a|s) at τ of the policy that generated the token.
"""

from __future__ import annotations

from typing import Callable

import torch

from .logits import logit_stats

DEFAULT_INSTRUCTION = "Solve the problem step by step. End with a final line of the form 'Answer: <number>'."


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    else:
        ids = tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return [int(x) for x in ids]


@torch.no_grad()
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
    """``n`` responses per prompt. Returns one dict per response, prompt-major order:
    ``prompt_index, prompt_ids, response_ids, old_logp, finished`` (ids include the final EOS when
    the model emitted one; ``old_logp`` in nats at τ)."""
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    jobs = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(n)]
    out: list[dict] = []
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        width = max(len(p) for _, p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (_, p) in enumerate(chunk):  # left padding for generation
            ids[r, width - len(p):] = torch.as_tensor(p)
            attn[r, width - len(p):] = 1
        gen = model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
            output_logits=True, return_dict_in_generate=True,
        )
        seq = gen.sequences[:, width:]
        logits = torch.stack(gen.logits, dim=1)  # [b, steps, V]
        for r, (pi, p) in enumerate(chunk):
            toks = seq[r].tolist()
            end = toks.index(eos) + 1 if eos in toks else len(toks)
            resp = toks[:end]
            st = logit_stats(logits[r, :end], torch.as_tensor(resp), temperature)
            out.append({
                "prompt_index": pi, "prompt_ids": list(p), "response_ids": resp,
                "old_logp": st.logp.tolist(), "finished": eos in toks,
            })
        if progress:
            progress(len(chunk))
    return out
