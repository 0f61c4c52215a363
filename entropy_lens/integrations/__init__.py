"""Adapters for the RL frameworks users already train with. Optional: nothing here is imported by
``import entropy_lens``, and each submodule imports its framework only when imported itself.

- :mod:`entropy_lens.integrations.verl` (``pip install 'entropy-lens[verl]'``): every registry
  method as a verl policy loss (``el_<method>``), per-token entropy supplied to those losses, and a
  token-level rollout dump that ``entropy-lens analyze`` reads without re-tokenising.
- :mod:`entropy_lens.integrations.trl` (``pip install 'entropy-lens[trl]'``): a ``GRPOTrainer``
  subclass that trains with any registry method and logs entropy-lens metrics.

Docs: ``docs/verl.md``, ``docs/trl.md``.
"""

from typing import Any


def wants_old_entropy(method: str, params: Any) -> bool:
    """Whether ``method`` with ``params`` reads H_old (entropy of the behaviour policy, nats) rather
    than the current H: STEER with ``entropy="old"`` (its default, the reference code's choice,
    docs/science.md §3.4) does, whichever ω form. The adapters then put H_old in the batch's
    ``entropy`` (and ``old_entropy``) when they have it."""
    return method == "steer" and getattr(params, "entropy", "old") == "old"
