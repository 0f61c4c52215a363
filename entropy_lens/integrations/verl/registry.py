"""Registration of the losses in verl's policy-loss registry."""

from __future__ import annotations

from typing import Any

from verl.trainer.ppo import core_algos as _core_algos

from entropy_lens.integrations.verl.config import LOSS_PREFIX
from entropy_lens.integrations.verl.loss import VerlPolicyLoss
from entropy_lens.methods import list_methods


def _registered(name: str) -> Any:
    return _core_algos.POLICY_LOSS_REGISTRY.get(name)


def register_verl_loss(name: str, method: str, params: dict[str, Any] | None = None, seed: int = 0) -> VerlPolicyLoss:
    """Register registry method ``method`` (with ``params`` overrides) as verl loss ``name``.

    Re-registering one of ours replaces it; a name verl already uses for its own loss is an error.
    """
    existing = _registered(name)
    if existing is not None and not isinstance(existing, VerlPolicyLoss):
        raise ValueError(f"verl already has a policy loss named {name!r}; pick another name")
    loss = VerlPolicyLoss(method, params, seed)
    _core_algos.register_policy_loss(name)(loss)
    return loss


def register_verl_losses(
    prefix: str = LOSS_PREFIX, params: dict[str, dict[str, Any]] | None = None, seed: int = 0
) -> list[str]:
    """Register every method of the registry as ``prefix + name``; ``params[name]`` overrides
    that method's parameters. Returns the registered verl names."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(list_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(list_methods())}")
    names = []
    for name in list_methods():
        register_verl_loss(prefix + name, name, params.get(name), seed)
        names.append(prefix + name)
    return names
