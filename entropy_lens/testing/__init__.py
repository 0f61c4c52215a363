"""Helpers for tests and benchmarks: exact live-tensor memory accounting
(:mod:`~entropy_lens.testing.memtrack`) and a word-level tokenizer built in memory
(:mod:`~entropy_lens.testing.tokenizers`)."""
