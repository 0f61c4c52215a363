"""Names, environment variables and parameters taken from verl's actor config."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any

from entropy_lens.methods import GRPO_DUAL_CLIP, GRPO_EPS_HIGH, GRPO_EPS_LOW, get_method

#: Registered verl loss names are ``LOSS_PREFIX + method`` (verl has its own ``clip_cov``/``kl_cov``).
LOSS_PREFIX = "el_"
#: Aggregation modes of verl's ``agg_loss`` (``token-sum`` is verl-only).
VERL_LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: Environment variables read by :func:`install`.
ENV_INSTALL = "ENTROPY_LENS_VERL_INSTALL"
ENV_PARAMS = "ENTROPY_LENS_VERL_PARAMS"
ENV_SEED = "ENTROPY_LENS_VERL_SEED"

_GRPO_CLIP = {"eps_low": GRPO_EPS_LOW, "eps_high": GRPO_EPS_HIGH, "dual_clip": GRPO_DUAL_CLIP}
#: verl ``policy_loss`` keys naming the same quantity as a method parameter: method -> (ours, verl's).
_POLICY_LOSS_KEYS = {
    "clip_cov": (("clip_ratio", "clip_cov_ratio"), ("lb", "clip_cov_lb"), ("ub", "clip_cov_ub")),
    "kl_cov": (("k", "kl_cov_ratio"), ("beta", "ppo_kl_coef")),
}


def _cfg(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict) or hasattr(obj, "get"):
        try:
            value = obj.get(key, default)
        except Exception:  # a structured config without the key
            value = default
        return default if value is None else value
    value = getattr(obj, key, default)
    return default if value is None else value


def verl_config_params(method: str, config: Any) -> dict[str, Any]:
    """Values of ``method``'s parameters that verl's actor ``config`` names.

    - ``eps_low`` ← ``clip_ratio_low`` (else ``clip_ratio``), ``eps_high`` ← ``clip_ratio_high``
      (else ``clip_ratio``), ``dual_clip`` ← ``clip_ratio_c`` — only for methods that keep GRPO's
      default for that bound (``clip_higher`` and ``steer`` keep their ε_high = 0.28, ``gspo`` its
      ε 3e-4/4e-4 and no dual clip, ``kl_cov`` its "no clip"); ``log_ratio_clamp`` has no verl key
      (verl clamps at 20 itself);
    - ``clip_cov``: ``clip_ratio``/``lb``/``ub`` ← ``policy_loss.clip_cov_ratio``/``clip_cov_lb``/
      ``clip_cov_ub`` (a fraction in both);
    - ``kl_cov``: ``k`` ← ``policy_loss.kl_cov_ratio`` (a fraction), ``beta`` ← ``policy_loss.ppo_kl_coef``.
    """
    if config is None:
        return {}
    spec = get_method(method)
    defaults = {f.name: f.default for f in fields(spec.params)}
    clip = _cfg(config, "clip_ratio")
    verl_clip = {
        "eps_low": _cfg(config, "clip_ratio_low", clip),
        "eps_high": _cfg(config, "clip_ratio_high", clip),
        "dual_clip": _cfg(config, "clip_ratio_c"),
    }
    out: dict[str, Any] = {}
    for name, value in verl_clip.items():
        if value is not None and name in defaults and defaults[name] == _GRPO_CLIP[name]:
            out[name] = float(value)
    policy_loss = _cfg(config, "policy_loss")
    for ours, theirs in _POLICY_LOSS_KEYS.get(method, ()):
        value = _cfg(policy_loss, theirs)
        if value is not None:
            out[ours] = float(value)
    return out


def params_from_env(environ: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Method parameter overrides from ``ENTROPY_LENS_VERL_PARAMS`` (JSON ``{method: {param: value}}``)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PARAMS, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_PARAMS}: malformed JSON ({exc.msg})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f'{ENV_PARAMS}: expected a JSON object {{"method": {{"param": value}}}}')
    return value


def _loss_mode(config: Any) -> str | None:
    return _cfg(_cfg(config, "policy_loss"), "loss_mode")
