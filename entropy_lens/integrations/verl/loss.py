"""The policy loss: a registry method as a verl loss, aggregated as verl's ``agg_loss``."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from entropy_lens.estimators import quadrant
from entropy_lens.integrations import wants_old_entropy
from entropy_lens.integrations.verl.config import (
    LOSS_PREFIX,
    VERL_LOSS_AGG_MODES,
    _cfg,
    verl_config_params,
)
from entropy_lens.integrations.verl.entropy import _ENTROPY, _fit_width
from entropy_lens.methods import (
    MethodContext,
    get_method,
    method_per_token_loss,
    params_from_dict,
)
from entropy_lens.objective import aggregate, clip_active
from entropy_lens.tokens import TokenBatch


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
        ref_log_prob: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """verl's policy-loss signature; ``[B, T]`` tensors, returns ``(loss, metrics)``.

        ``entropy`` (current H, with grad for ``entropy_bonus``) and ``old_entropy`` (H_old), in
        nats, default to what the enclosing :func:`entropy_scope` published. ``ref_log_prob``:
        log π_ref of the sampled tokens, for methods that need it (``kl_ref``); verl does not pass
        it to policy losses, so only direct callers can.
        """
        mask = response_mask.bool()
        params = self.resolve_params(config)
        self._check_inputs(params, ref_log_prob)
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
            ref_logp=None if ref_log_prob is None else _fit_width(ref_log_prob.detach(), log_prob),
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

    def _check_inputs(self, params: Any, ref_log_prob: torch.Tensor | None) -> None:
        """Refuse methods whose required inputs verl's loss call cannot supply (one line each)."""
        required = get_method(self.method).required_inputs(params)
        name = f"{LOSS_PREFIX}{self.method}"
        if "reward" in required:
            hint = f" or set {self.method}.advantage=grpo" if hasattr(params, "advantage") else ""
            raise RuntimeError(
                f"{name} needs per-response rewards, which verl does not pass to policy losses; "
                f"use another method{hint}"
            )
        if "ref_logp" in required and ref_log_prob is None:
            raise RuntimeError(
                f"{name} needs reference log-probs (ref_logp), which verl does not pass to policy losses; "
                "use verl's own KL loss instead (actor.use_kl_loss=True, actor.kl_loss_type=k1|low_var_kl, "
                "actor.kl_loss_coef)"
            )
        if {"omega_lm_head", "omega_lm_head_source"} & set(required):
            raise RuntimeError(
                f"{name} with omega={params.omega} needs the LM-head kernel score (final hidden states of the "
                "whole batch), which verl does not pass to policy losses; use omega=code or omega=paper"
            )

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
