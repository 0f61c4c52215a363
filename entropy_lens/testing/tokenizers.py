"""A word-level tokenizer built in memory (nothing downloaded), for tests and benchmarks on models
built from a config."""

from __future__ import annotations

from collections.abc import Sequence

#: The special tokens every word-level tokenizer here starts with (ids 0, 1, 2, ...).
SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant")

#: A ChatML-like chat template over those specials.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def word_level_tokenizer(words: Sequence[str]):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is :data:`SPECIALS` followed by ``words``
    (token id = position; whitespace-split words, unknown ones to ``<unk>``), pad ``<pad>``, EOS
    ``<|im_end|>`` and :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok
