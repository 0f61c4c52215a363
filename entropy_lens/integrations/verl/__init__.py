"""verl adapter: every entropy_lens method as a verl policy loss, per-token entropy for those
losses, and a token-level rollout dump that ``entropy-lens analyze`` reads without re-tokenising.

Tested with verl 0.9.1 (``pip install torch==2.13.0 verl``); the policy-loss API it relies on
(``register_policy_loss`` / ``get_policy_loss_fn``, losses called as
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (loss, metrics)``, ``config.global_batch_info``) exists from verl 0.7 on. See ``docs/verl.md``.

How it is loaded. verl runs the loss in Ray worker processes, so this module must be imported
there; importing it is the whole installation (:func:`install` runs at import unless
``ENTROPY_LENS_VERL_INSTALL=0``). verl imports it for you in every process with

    VERL_USE_EXTERNAL_MODULES=entropy_lens.integrations.verl

(forward it to Ray with ``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=...``)
and then ``actor_rollout_ref.actor.policy_loss.loss_mode=el_steer`` selects STEER.

The loss (one call per micro-batch, ``[B, T]`` tensors):

    ℓ_t = w_t · clipped_surrogate(log p_t, log p_old,t, A'_t; ε_low, ε_high, c) + penalty_t
    ℓ_t ← ℓ_t · rollout_is_weight_t        (when verl passes rollout-correction weights)
    loss = aggregate(ℓ, mask, mode) · s     (s turns the local normalisation into verl's global one)

with the terms of :func:`entropy_lens.methods.apply_method`, the one objective
:func:`entropy_lens.methods.loss.method_per_token_loss` and :func:`entropy_lens.objective.aggregate`;
``s`` follows ``config.global_batch_info`` exactly as ``verl.trainer.ppo.core_algos.agg_loss`` does
(:func:`verl_aggregate`).

Entropy. verl's loss functions receive no entropy. STEER's code-form ω needs H_old (the entropy of
the policy that produced ``old_log_prob``), its paper form, ``fork_tokens``, ``entropy_adv`` need the
current H, ``entropy_bonus`` needs the current H *with* its gradient. Route chosen (alternatives
and trade-offs in ``docs/verl.md``): a one-function actor patch wraps verl's
``verl.workers.utils.losses.ppo_loss`` — the function that runs the forward's output through the
policy loss — and publishes, for the duration of that one call, the micro-batch's

- current entropy ``model_output["entropy"]`` (present when ``actor.calculate_entropy=True`` or
  ``entropy_coeff != 0``), with its gradient, and
- old entropy: the micro-batch field ``old_entropy`` (legacy trainer: copied from verl's own
  ``entropys`` by the trainer hook below) or ``entropy`` (verl's v1 trainer stores H_old under that
  name when it recomputes the old log-probs),

in a :mod:`contextvars` variable (:func:`entropy_scope`) that the registered loss reads. Direct
callers pass ``entropy=`` / ``old_entropy=`` keywords instead. The wrapper does nothing for loss
modes that are not ours.

Rollout dump. With ``trainer.rollout_data_dir=DIR`` verl writes ``DIR/{step}.jsonl`` (text only);
the trainer hook also writes ``DIR/entropy_lens/{step}.parquet`` in entropy_lens' rollout format
(:func:`rollout_frame`): exact ``prompt_ids``/``response_ids``, ``old_logp``, ``entropy`` (H_old),
``adv``, ``reward``, ``group``, ``step`` and the decoded ``prompt``/``response`` text.

Layout (everything public is re-exported here): :mod:`.config` (loss-name prefix, environment
variables, parameters from verl's actor config), :mod:`.entropy` (:func:`entropy_scope`),
:mod:`.loss` (:class:`VerlPolicyLoss`, :func:`verl_aggregate`), :mod:`.registry` (registration in
verl), :mod:`.actor` (the ``ppo_loss`` wrapper), :mod:`.dump` (the token-level rollout dump),
:mod:`.trainer` (the trainer-class hooks); :func:`install` lives here and runs at import.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from verl.trainer.ppo import core_algos as _core_algos  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "entropy_lens.integrations.verl needs verl >= 0.7: pip install 'entropy-lens[verl]' "
        "(or: pip install torch==2.13.0 verl)"
    ) from exc

from entropy_lens.integrations.verl.actor import install_actor_hook, wrap_ppo_loss
from entropy_lens.integrations.verl.config import (
    ENV_INSTALL,
    ENV_PARAMS,  # noqa: F401  (public, not in __all__)
    ENV_SEED,
    LOSS_PREFIX,
    VERL_LOSS_AGG_MODES,
    params_from_env,
    verl_config_params,
)
from entropy_lens.integrations.verl.dump import rollout_frame
from entropy_lens.integrations.verl.entropy import (
    TokenEntropy,
    current_entropy,
    entropy_scope,
)
from entropy_lens.integrations.verl.loss import VerlPolicyLoss, verl_aggregate
from entropy_lens.integrations.verl.registry import (
    register_verl_loss,
    register_verl_losses,
)
from entropy_lens.integrations.verl.trainer import (
    TRAINER_TARGETS,  # noqa: F401  (public, not in __all__)
    install_trainer_hooks,
    patch_trainer_class,
)

__all__ = [
    "LOSS_PREFIX",
    "VERL_LOSS_AGG_MODES",
    "TokenEntropy",
    "VerlPolicyLoss",
    "entropy_scope",
    "current_entropy",
    "install",
    "install_actor_hook",
    "install_trainer_hooks",
    "patch_trainer_class",
    "params_from_env",
    "register_verl_loss",
    "register_verl_losses",
    "rollout_frame",
    "verl_aggregate",
    "verl_config_params",
    "wrap_ppo_loss",
]


def install(
    prefix: str = LOSS_PREFIX,
    params: dict[str, dict[str, Any]] | None = None,
    actor: bool = True,
    trainer: bool = True,
    seed: int | None = None,
) -> list[str]:
    """Register every method as a verl loss and install the actor and trainer hooks.

    ``params`` defaults to :func:`params_from_env`, ``seed`` to ``ENTROPY_LENS_VERL_SEED`` (0).
    Returns the registered loss names. Safe to call more than once.
    """
    if seed is None:
        raw = os.environ.get(ENV_SEED, "0").strip() or "0"
        try:
            seed = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_SEED}: expected an integer, got {raw!r}") from None
    names = register_verl_losses(prefix, params_from_env() if params is None else params, seed)
    if actor:
        install_actor_hook()
    if trainer:
        install_trainer_hooks()
    return names


if os.environ.get(ENV_INSTALL, "1").strip() != "0":
    install()
