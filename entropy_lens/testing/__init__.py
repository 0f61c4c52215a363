"""Helpers for tests and benchmarks: exact live-tensor memory accounting (:mod:`~entropy_lens.testing.memtrack`)."""
