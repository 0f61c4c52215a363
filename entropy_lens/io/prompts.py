"""Prompts as text and as token ids: the instruction appended to problems and the chat template."""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_INSTRUCTION = "Solve the problem step by step. End with a final line of the form 'Answer: <number>'."


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    else:
        ids = tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return [int(x) for x in ids]


def as_messages(prompt: Any) -> list[dict[str, str]] | None:
    """Chat messages if ``prompt`` is a list of {role, content}; None for plain text."""
    if isinstance(prompt, np.ndarray):
        prompt = list(prompt)
    if isinstance(prompt, (list, tuple)):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    return None
