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
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..estimators import quadrant
from ..io.writers import atomic_write_parquet
from ..methods import (
    GRPO_DUAL_CLIP,
    GRPO_EPS_HIGH,
    GRPO_EPS_LOW,
    MethodContext,
    get_method,
    list_methods,
    method_per_token_loss,
    params_from_dict,
)
from ..objective import aggregate, clip_active
from ..tokens import TokenBatch
from . import wants_old_entropy

try:
    from verl.trainer.ppo import core_algos as _core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "entropy_lens.integrations.verl needs verl >= 0.7: pip install 'entropy-lens[verl]' "
        "(or: pip install torch==2.13.0 verl)"
    ) from exc

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


# ---------------------------------------------------------------------------------------------
# Entropy supplied to the loss
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEntropy:
    """Per-token entropies of one micro-batch, ``[B, T]`` nats, aligned with ``log_prob``.

    ``current``: H of the policy being trained (carries its gradient when verl computed it with
    one); ``old``: H_old of the policy that produced ``old_log_prob``. Either may be ``None``.
    """

    current: torch.Tensor | None = None
    old: torch.Tensor | None = None


_ENTROPY: contextvars.ContextVar[TokenEntropy | None] = contextvars.ContextVar("entropy_lens_verl_entropy", default=None)


@contextlib.contextmanager
def entropy_scope(current: torch.Tensor | None = None, old: torch.Tensor | None = None) -> Iterator[TokenEntropy]:
    """Publish a micro-batch's entropies to the registered losses for the duration of a block."""
    value = TokenEntropy(current=current, old=old)
    token = _ENTROPY.set(value)
    try:
        yield value
    finally:
        _ENTROPY.reset(token)


def current_entropy() -> TokenEntropy | None:
    """The entropies published by the innermost :func:`entropy_scope`, or ``None``."""
    return _ENTROPY.get()


def _fit_width(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a dense ``[B, T]`` tensor with ``like``'s width (right-padded with 0 or cut)."""
    if t is None:
        return None
    if t.is_nested:
        t = t.to_padded_tensor(0.0)
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"entropy has {t.shape[0]} rows, log_prob has {like.shape[0]}")
    T = like.shape[-1]
    if t.shape[-1] < T:
        t = torch.nn.functional.pad(t, (0, T - t.shape[-1]))
    return t[:, :T].to(device=like.device)


# ---------------------------------------------------------------------------------------------
# Parameters from verl's config, aggregation as verl's agg_loss
# ---------------------------------------------------------------------------------------------


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
      default for that bound (``clip_higher`` keeps its ε_high = 0.28, ``kl_cov`` its "no clip");
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


def verl_aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    global_batch_info: dict[str, Any] | None = None,
) -> torch.Tensor:
    """verl's ``agg_loss`` convention on top of :func:`entropy_lens.objective.aggregate`.

    ``per_token``/``mask``: ``[B, T]`` (one micro-batch). ``global_batch_info`` (verl fills it per
    micro-batch): ``dp_size``, ``batch_num_tokens`` (valid tokens of the global mini-batch),
    ``global_batch_size`` (sequences of it), ``loss_scale_factor``. With L, N the micro-batch's
    valid tokens / non-empty sequences and B its rows:

    - token-mean: aggregate·L·dp / batch_num_tokens  (= Σℓ·dp/batch_num_tokens);
    - token-sum: aggregate(token-mean)·L·dp  (= Σℓ·dp);
    - seq-mean-token-mean, seq-mean-token-sum: aggregate·N·dp / global_batch_size;
    - seq-mean-token-sum-norm (norm = loss_scale_factor or T): aggregate·B·dp / global_batch_size.

    Missing ``batch_num_tokens``/``global_batch_size`` mean "this micro-batch" (dp must be 1).
    """
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; choose one of: {', '.join(VERL_LOSS_AGG_MODES)}")
    info = dict(global_batch_info or {})
    dp = int(info.get("dp_size") or 1)
    m = mask.to(per_token.dtype)
    n_tok = m.sum()
    n_seq = (m.sum(-1) > 0).sum().to(per_token.dtype)

    def need(key: str) -> Any:
        value = info.get(key)
        if value is None and dp > 1:
            raise ValueError(f"global_batch_info[{key!r}] is required when dp_size > 1")
        return value

    if loss_agg_mode in ("token-mean", "token-sum"):
        local = aggregate(per_token, mask, "token-mean")
        if loss_agg_mode == "token-sum":
            return local * n_tok * dp
        total = need("batch_num_tokens")
        return local if total is None else local * n_tok * dp / total
    if loss_agg_mode == "seq-mean-token-sum-norm":
        norm = info.get("loss_scale_factor") or mask.shape[-1]
        local = aggregate(per_token, mask, loss_agg_mode, norm_len=int(norm))
        gbs = need("global_batch_size")
        gbs = n_seq.clamp(min=1.0) if gbs is None else gbs
        return local * mask.shape[0] * dp / gbs
    local = aggregate(per_token, mask, loss_agg_mode)
    gbs = need("global_batch_size")
    return local if gbs is None else local * n_seq * dp / gbs


# ---------------------------------------------------------------------------------------------
# The policy loss
# ---------------------------------------------------------------------------------------------


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class VerlPolicyLoss:
    """A registry method as a verl policy loss (one instance per registered name).

    Parameters of the method, lowest precedence first: the method's defaults, the values verl's
    actor config names (:func:`verl_config_params`), then ``params`` given here. Every scope is
    the micro-batch verl passes (verl calls the loss once per micro-batch), so a method parameter
    ``scope`` must be ``"micro"``. Randomness (``clip_cov``'s draw) comes from one CPU generator
    per instance, seeded with ``seed`` + the distributed rank.
    """

    def __init__(self, method: str, params: dict[str, Any] | None = None, seed: int = 0) -> None:
        spec = get_method(method)
        self.method = method
        self.overrides = dict(params or {})
        probe = params_from_dict(method, self.overrides)  # unknown keys / bad values fail here
        if getattr(probe, "scope", "micro") != "micro":
            raise ValueError(
                f"{method}: scope must be 'micro' under verl (its loss sees one micro-batch at a time), "
                f"got {probe.scope!r}; make a micro-batch a whole mini-batch with "
                "ppo_micro_batch_size_per_gpu = ppo_mini_batch_size to widen it"
            )
        self.needs_entropy = "entropy" in spec.factors
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        functools.update_wrapper(self, spec.fn, assigned=("__doc__",), updated=())
        self.__name__ = f"{LOSS_PREFIX}{method}"

    def __repr__(self) -> str:
        return f"VerlPolicyLoss({self.method!r}, params={self.overrides!r})"

    def resolve_params(self, config: Any = None) -> Any:
        """The method's parameter dataclass for this call (see the class docstring)."""
        values = {**verl_config_params(self.method, config), **self.overrides}
        return params_from_dict(self.method, values)

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed + _rank())
        return self._generator

    def _token_entropy(self, params: Any, current: torch.Tensor | None, old: torch.Tensor | None):
        """(entropy the method reads, detached; source code 0 none / 1 current / 2 old)."""
        prefer_old = wants_old_entropy(self.method, params)
        order = ((old, 2.0), (current, 1.0)) if prefer_old else ((current, 1.0), (old, 2.0))
        for t, src in order:
            if t is not None:
                return t.detach(), src
        return None, 0.0

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
        *,
        entropy: torch.Tensor | None = None,
        old_entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """verl's policy-loss signature; ``[B, T]`` tensors, returns ``(loss, metrics)``.

        ``entropy`` (current H, with grad for ``entropy_bonus``) and ``old_entropy`` (H_old), in
        nats, default to what the enclosing :func:`entropy_scope` published.
        """
        mask = response_mask.bool()
        params = self.resolve_params(config)
        published = _ENTROPY.get()
        cur = entropy if entropy is not None else (published.current if published else None)
        old = old_entropy if old_entropy is not None else (published.old if published else None)
        cur, old = _fit_width(cur, log_prob), _fit_width(old, log_prob)
        sel, source = self._token_entropy(params, cur, old)
        if self.needs_entropy and sel is None:
            raise RuntimeError(
                f"{LOSS_PREFIX}{self.method} needs per-token entropy: set actor_rollout_ref.actor.calculate_entropy=True "
                "and import entropy_lens.integrations.verl in the workers (VERL_USE_EXTERNAL_MODULES)"
            )
        zeros = torch.zeros_like(log_prob, dtype=torch.float32).detach()
        B = mask.shape[0]
        batch = TokenBatch(
            token_ids=torch.zeros(mask.shape, dtype=torch.long, device=mask.device),
            mask=mask,
            logp=log_prob.detach(),
            old_logp=old_log_prob.detach(),
            entropy=sel.to(log_prob.dtype) if sel is not None else zeros.to(log_prob.dtype),
            sum_p2=zeros,
            sum_p2_logp=zeros,
            adv=advantages.detach(),
            group_id=torch.zeros(B, dtype=torch.long, device=mask.device),
            reward=torch.zeros(B, device=mask.device),
        )
        lr = float(_cfg(_cfg(config, "optim"), "lr", 1e-6))
        terms = get_method(self.method)(batch, params, MethodContext(generator=self._gen(), lr=lr))
        if terms.penalty is not None and terms.penalty.needs_entropy and cur is None:
            raise RuntimeError(
                f"{LOSS_PREFIX}{self.method} needs the current entropy with its gradient: "
                "set actor_rollout_ref.actor.calculate_entropy=True"
            )
        per_tok = method_per_token_loss(terms, log_prob, old_log_prob, advantages, mask, cur)
        if rollout_is_weights is not None:
            per_tok = per_tok * rollout_is_weights
        loss = verl_aggregate(per_tok, mask, loss_agg_mode, _cfg(config, "global_batch_info", {}))
        metrics = self._metrics(batch, terms, sel, source)
        return loss, metrics

    @torch.no_grad()
    def _metrics(self, batch: TokenBatch, terms: Any, sel: torch.Tensor | None, source: float) -> dict[str, float]:
        """Floats for verl's logger (one device sync): verl's own clip/KL names plus ours."""
        mask = batch.mask
        m = mask.to(torch.float32)
        n = m.sum().clamp(min=1.0)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x.to(torch.float32) * m).sum() / n

        ratio = batch.ratio
        adv = terms.adv if terms.adv is not None else batch.adv
        ppo_clipped = ~clip_active(ratio, adv, terms.eps_low, terms.eps_high, None)
        dual = torch.zeros_like(mask) if terms.dual_clip is None else (adv < 0) & (ratio > terms.dual_clip)
        w = terms.weight.to(torch.float32)
        names = [
            "actor/pg_clipfrac",
            "actor/pg_clipfrac_lower",
            "actor/ppo_kl",
            "entropy_lens/weight_mean",
            "entropy_lens/weight_min",
            "entropy_lens/weight_max",
            "entropy_lens/frac_touched",
            "entropy_lens/entropy_source",
        ]
        vals = [
            mean(ppo_clipped),
            mean(dual),
            mean(batch.old_logp - batch.logp),
            mean(w),
            _finite_or_one(w.masked_fill(~mask, math.inf).min()),
            _finite_or_one(w.masked_fill(~mask, -math.inf).max()),
            mean(terms.touched),
            torch.tensor(source),
        ]
        if sel is not None:
            q = quadrant(batch.logp, sel.to(batch.logp.dtype), batch.adv)
            names += ["entropy_lens/entropy_mean"] + [f"entropy_lens/q{k}_share" for k in range(1, 5)]
            vals += [mean(sel)] + [mean(q == k) for k in range(1, 5)]
        for key, value in terms.stats.items():
            names.append(f"entropy_lens/{self.method}/{key}")
            vals.append(value)
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(mask.device).reshape(()) for v in vals])
        return dict(zip(names, stacked.cpu().tolist()))


def _finite_or_one(x: torch.Tensor) -> torch.Tensor:
    """1 where a masked min/max found no valid token (±inf), without a device sync."""
    return torch.where(torch.isfinite(x), x, torch.ones_like(x))


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


# ---------------------------------------------------------------------------------------------
# Actor hook: entropy into the loss
# ---------------------------------------------------------------------------------------------


def _loss_mode(config: Any) -> str | None:
    return _cfg(_cfg(config, "policy_loss"), "loss_mode")


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


# ---------------------------------------------------------------------------------------------
# Rollout dump in entropy_lens' rollout format
# ---------------------------------------------------------------------------------------------


def _split_rows(values: torch.Tensor, valid: torch.Tensor) -> list[np.ndarray]:
    """Valid entries of each row of ``[B, T]`` ``values`` as B 1-D arrays (any padding side)."""
    valid = valid.bool()
    lengths = valid.sum(-1).cpu().numpy()
    flat = values[valid].detach().cpu().numpy()
    return np.split(flat, np.cumsum(lengths)[:-1])


def _per_sample(t: torch.Tensor, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """A nested ``(B, j)`` tensor, or a right-padded ``[B, T]`` one cut to ``lengths``, as B arrays."""
    if t.is_nested:
        return [x.detach().cpu().numpy() for x in t.unbind()]
    if lengths is None:
        raise ValueError(f"expected a nested (jagged) tensor, got a dense one of shape {tuple(t.shape)}")
    T = t.shape[-1]
    valid = torch.arange(T, device=t.device)[None, :] < torch.as_tensor(lengths, device=t.device)[:, None]
    return _split_rows(t, valid)


def rollout_frame(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    old_logp: Sequence[Sequence[float]],
    adv: Sequence[Sequence[float]],
    reward: Sequence[float],
    group: Sequence[Any],
    entropy: Sequence[Sequence[float]] | None = None,
    tokenizer: Any = None,
    step: int | None = None,
) -> pd.DataFrame:
    """One row per response in entropy_lens' rollout format (:mod:`entropy_lens.io.rollouts`).

    Per-token lists (one per response, each as long as its ``response_ids``): ``old_logp`` (log
    π_old of the sampled token, nats), ``adv``, optional ``entropy`` (H_old, nats). Per response:
    ``reward``, ``group``. ``prompt``/``response`` text is decoded with ``tokenizer`` when given
    (special tokens dropped; the ids stay exact), else empty. ``step``: the training step.
    """
    n = len(response_ids)
    columns = {"old_logp": old_logp, "adv": adv, "reward": reward, "group": group, "prompt_ids": prompt_ids}
    if entropy is not None:
        columns["entropy"] = entropy
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"rollout_frame: {name} has {len(col)} rows, response_ids has {n}")
    lengths = np.array([len(r) for r in response_ids])
    for name in ("old_logp", "adv") + (("entropy",) if entropy is not None else ()):
        bad = np.flatnonzero(np.array([len(x) for x in columns[name]]) != lengths)
        if len(bad):
            raise ValueError(f"rollout_frame: row {int(bad[0])}: {name} does not match the response length")
    frame = {
        "prompt": tokenizer.batch_decode([list(map(int, p)) for p in prompt_ids], skip_special_tokens=True)
        if tokenizer is not None
        else [""] * n,
        "response": tokenizer.batch_decode([list(map(int, r)) for r in response_ids], skip_special_tokens=True)
        if tokenizer is not None
        else [""] * n,
        "reward": np.asarray(reward, dtype=np.float64),
        "group": [str(g) for g in group],
        "prompt_ids": [np.asarray(p, dtype=np.int64) for p in prompt_ids],
        "response_ids": [np.asarray(r, dtype=np.int64) for r in response_ids],
        "old_logp": [np.asarray(x, dtype=np.float64) for x in old_logp],
        "adv": [np.asarray(x, dtype=np.float64) for x in adv],
    }
    if entropy is not None:
        frame["entropy"] = [np.asarray(x, dtype=np.float64) for x in entropy]
    if step is not None:
        frame["step"] = np.full(n, int(step), dtype=np.int64)
    return pd.DataFrame(frame)


def _frame_from_dataproto(batch: Any, tokenizer: Any, step: int | None) -> pd.DataFrame:
    """Rollout frame from the legacy trainer's batch (a ``DataProto`` after the actor update)."""
    b = batch.batch
    prompts, responses = b["prompts"], b["responses"]
    P = prompts.shape[1]
    attn = b["attention_mask"].bool()
    p_valid, r_valid = attn[:, :P], attn[:, P:]
    keys = set(b.keys())
    uid = batch.non_tensor_batch.get("uid") if getattr(batch, "non_tensor_batch", None) is not None else None
    return rollout_frame(
        prompt_ids=_split_rows(prompts, p_valid),
        response_ids=_split_rows(responses, r_valid),
        old_logp=_split_rows(b["old_log_probs"], r_valid),
        adv=_split_rows(b["advantages"], r_valid),
        reward=b["token_level_scores"].sum(-1).cpu().tolist(),
        group=list(uid) if uid is not None else list(range(prompts.shape[0])),
        entropy=_split_rows(b["old_entropy"], r_valid) if "old_entropy" in keys else None,
        tokenizer=tokenizer,
        step=step,
    )


#: Fields the v1 trainer keeps in its TransferQueue that the dump reads.
_V1_FIELDS = ["uid", "prompts", "responses", "rm_scores", "old_log_probs", "advantages", "entropy"]


def _frame_from_v1(batch: Any, tokenizer: Any, step: int | None) -> pd.DataFrame:
    """Rollout frame from the v1 trainer's ``KVBatchMeta`` (fields fetched from TransferQueue)."""
    import transfer_queue as tq

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=_V1_FIELDS[:-1])
    try:  # H_old is absent when verl skipped recomputing the old log-probs (bypass mode)
        entropy = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy"])["entropy"]
    except Exception:  # the store's error type for a missing field is not part of its API
        entropy = None
    prompts = _per_sample(data["prompts"])
    responses = _per_sample(data["responses"])
    lengths = np.array([len(r) for r in responses])
    scores = data["rm_scores"]
    reward = [float(x.sum()) for x in scores.unbind()] if scores.is_nested else scores.sum(-1).cpu().tolist()
    uid = data["uid"]
    return rollout_frame(
        prompt_ids=prompts,
        response_ids=responses,
        old_logp=_per_sample(data["old_log_probs"], lengths),
        adv=_per_sample(data["advantages"], lengths),
        reward=reward,
        group=list(uid.tolist() if hasattr(uid, "tolist") else uid),
        entropy=None if entropy is None else _per_sample(entropy, lengths),
        tokenizer=tokenizer,
        step=step,
    )


def _write_dump(trainer: Any, frame: pd.DataFrame, rollout_data_dir: str) -> str:
    """Write ``rollout_data_dir/entropy_lens/{step}.parquet`` (atomic), on verl's dump thread when
    the trainer has one."""
    path = os.path.join(rollout_data_dir, "entropy_lens", f"{int(getattr(trainer, 'global_steps', 0))}.parquet")
    executor = getattr(trainer, "_dump_executor", None)
    if executor is not None and not getattr(executor, "_shutdown", False):
        future = executor.submit(atomic_write_parquet, path, frame)
        futures = getattr(trainer, "_dump_futures", None)
        if isinstance(futures, list):
            futures.append(future)
    else:
        atomic_write_parquet(path, frame)
    return path


# ---------------------------------------------------------------------------------------------
# Trainer hooks (driver process)
# ---------------------------------------------------------------------------------------------


def _keep_old_entropy(trainer: Any) -> bool:
    cfg = getattr(trainer, "config", None)
    actor = _cfg(_cfg(cfg, "actor_rollout_ref"), "actor")
    ours = isinstance(_registered(_loss_mode(actor) or ""), VerlPolicyLoss)
    return ours or bool(_cfg(_cfg(cfg, "trainer"), "rollout_data_dir"))


def patch_trainer_class(cls: type) -> type:
    """Add the entropy_lens hooks to a verl trainer class (idempotent).

    Legacy ``RayPPOTrainer`` (``_log_rollout_data(batch, reward_extra_infos_dict, timing_raw,
    rollout_data_dir)``): ``_compute_old_log_prob`` also returns verl's ``entropys`` as
    ``old_entropy`` (verl drops ``entropys`` from the batch), so H_old reaches the actor's loss and
    the dump. v1 ``PPOTrainer`` (``_log_rollout_data(batch, timing_raw, rollout_data_dir)``) keeps
    H_old itself. Both: ``_log_rollout_data`` also writes the token-level parquet.
    """
    if cls.__dict__.get("_entropy_lens_patched", False):
        return cls
    log_fn = getattr(cls, "_log_rollout_data", None)
    legacy = log_fn is not None and "reward_extra_infos_dict" in inspect.signature(log_fn).parameters
    old_fn = getattr(cls, "_compute_old_log_prob", None)
    if legacy and old_fn is not None:

        @functools.wraps(old_fn)
        def _compute_old_log_prob(self, batch, *args, **kwargs):
            result = old_fn(self, batch, *args, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            store = getattr(out, "batch", None)
            if store is not None and "entropys" in store.keys() and _keep_old_entropy(self):
                store["old_entropy"] = store["entropys"].clone()
            return result

        cls._compute_old_log_prob = _compute_old_log_prob
    if log_fn is not None:
        to_frame = _frame_from_dataproto if legacy else _frame_from_v1

        @functools.wraps(log_fn)
        def _log_rollout_data(self, batch, *args, **kwargs):
            result = log_fn(self, batch, *args, **kwargs)
            bound = inspect.signature(log_fn).bind(self, batch, *args, **kwargs)
            frame = to_frame(batch, getattr(self, "tokenizer", None), getattr(self, "global_steps", None))
            _write_dump(self, frame, bound.arguments["rollout_data_dir"])
            return result

        cls._log_rollout_data = _log_rollout_data
    cls._entropy_lens_patched = True
    return cls


#: Trainer classes patched when their module is imported: module -> class name.
TRAINER_TARGETS = {
    "verl.trainer.ppo.ray_trainer": "RayPPOTrainer",
    "verl.trainer.ppo.v1.trainer_base": "PPOTrainer",
}


class _PatchedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then patches the trainer class of the executed module."""

    def __init__(self, loader: Any, class_name: str) -> None:
        self._loader = loader
        self._class_name = class_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        cls = getattr(module, self._class_name, None)
        if isinstance(cls, type):
            patch_trainer_class(cls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Patches a trainer module when it is first imported (the driver imports it after us)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TRAINER_TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchedLoader(spec.loader, TRAINER_TARGETS[fullname])
                return spec
        return None


def install_trainer_hooks() -> None:
    """Patch the trainer classes now if imported, else as soon as they are imported."""
    for module_name, class_name in TRAINER_TARGETS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, class_name, None), type):
            patch_trainer_class(getattr(module, class_name))
    if not any(isinstance(f, _TrainerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportHook())


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
