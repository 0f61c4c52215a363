"""Prompts as text and as token ids: the instruction appended to problems and the chat template."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Appended to problems whose answer is a number (GSM8K; the shipped demo set).
DEFAULT_INSTRUCTION = "Solve the problem step by step. End with a final line of the form 'Answer: <number>'."
#: Appended to bare problems whose answer may be an expression (MATH-500).
MATH_INSTRUCTION = "Solve the problem step by step. End with a final line of the form 'Answer: <answer>'."

#: Instruction lines of the verl-schema math datasets (DAPO-Math-17k, AIME, AMC, GSM8K): a problem's
#: text is what remains of ``prompt[0].content`` once leading lines starting with a ``TEMPLATE_HEADS``
#: entry and trailing lines starting with a ``TEMPLATE_TAILS`` entry are removed.
TEMPLATE_HEADS = ("Solve the following math problem step by step. The last line of your response should be",)
TEMPLATE_TAILS = ("Remember to put your answer", "让我们一步一步地思考")
#: The complete (intact) head lines; a head line that starts like them but differs lost words.
INTACT_HEADS = (
    ("Solve the following math problem step by step. The last line of your response should be of the form "
     "\\boxed{Answer} where Answer is the answer to the problem."),
    ("Solve the following math problem step by step. The last line of your response should be of the form "
     "Answer: $Answer (without quotes) where $Answer is the answer to the problem."),
)


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
