"""Actor hook: the micro-batch's entropies into the loss (a wrapper around verl's ``ppo_loss``)."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch

from entropy_lens.integrations.verl.config import _loss_mode
from entropy_lens.integrations.verl.entropy import entropy_scope
from entropy_lens.integrations.verl.loss import VerlPolicyLoss
from entropy_lens.integrations.verl.registry import _registered


def _micro_batch_old_entropy(data: Any) -> torch.Tensor | None:
    """H_old carried by a micro-batch TensorDict (``old_entropy``, else verl v1's ``entropy``)."""
    try:
        keys = set(data.keys())
    except Exception:
        return None
    for key in ("old_entropy", "entropy"):
        if key in keys:
            t = data[key]
            if isinstance(t, torch.Tensor):
                return t.to_padded_tensor(0.0) if t.is_nested else t
    return None


def wrap_ppo_loss(fn: Callable) -> Callable:
    """Wrap verl's ``ppo_loss(config, model_output, data, dp_group=None)`` so that an entropy_lens
    policy loss sees the micro-batch's entropies (:func:`entropy_scope`). Idempotent; other loss
    modes pass straight through."""
    if getattr(fn, "_entropy_lens_wrapped", False):
        return fn
    from verl.workers.utils.padding import no_padding_2_padding

    @functools.wraps(fn)
    def ppo_loss_with_entropy(config, model_output, data, dp_group=None):
        if not isinstance(_registered(_loss_mode(config) or ""), VerlPolicyLoss):
            return fn(config, model_output, data, dp_group)
        cur = model_output.get("entropy", None)
        if cur is not None:
            cur = no_padding_2_padding(cur, data)
        with entropy_scope(current=cur, old=_micro_batch_old_entropy(data)):
            return fn(config, model_output, data, dp_group)

    ppo_loss_with_entropy._entropy_lens_wrapped = True  # type: ignore[attr-defined]
    ppo_loss_with_entropy._entropy_lens_original = fn  # type: ignore[attr-defined]
    return ppo_loss_with_entropy


def install_actor_hook() -> bool:
    """Wrap verl's ``ppo_loss`` where it is defined and wherever it was already imported by name.
    Returns False when this verl has no ``verl.workers.utils.losses.ppo_loss``."""
    try:
        from verl.workers.utils import losses as _losses
    except ImportError:
        return False
    original = getattr(_losses, "ppo_loss", None)
    if original is None:
        return False
    base = getattr(original, "_entropy_lens_original", original)
    wrapped = wrap_ppo_loss(original)
    for name, module in list(sys.modules.items()):
        if name.startswith("verl.") and getattr(module, "ppo_loss", None) in (base, original):
            module.ppo_loss = wrapped
    return True
