"""TRL adapter: :class:`EntropyLensGRPOTrainer`, a ``trl.GRPOTrainer`` that trains with any
entropy_lens registry method (``steer``, ``clip_cov``, ...) and logs entropy-lens metrics.

Tested with TRL 1.16.0 (transformers 5.24, torch 2.13 CPU); supported range :data:`TRL_RANGE`
(the private ``GRPOTrainer`` hooks it overrides — ``_compute_loss``,
``_get_per_token_logps_and_entropies`` returning ``(logps, entropies, aux_loss)``,
``_generate_and_score_completions``, ``_metrics`` — are those of TRL 1.16). See ``docs/trl.md``.

Per micro-batch (``[B, T]`` completion tokens; TRL computes log p and H in one forward):

    terms = apply_method(method, TokenBatch(log p, log p_old, H_sel, A), params)
    ℓ_t = method_per_token_loss(terms, log p, log p_old, A, mask, H)          (the one objective)
    ℓ_t ← ℓ_t · is_ratio_t (vLLM importance correction, when TRL uses it) + β·KL_t (when β ≠ 0)
    loss = aggregate(ℓ, mask, mode) / G      (TRL's ``loss_type`` picks the mode; G: accumulation)

``loss_type`` → aggregation: ``grpo`` seq-mean-token-mean; ``bnpo`` token-mean; ``dr_grpo``
seq-mean-token-sum-norm with ``max_completion_length``; ``dapo`` (TRL's default) token sum over
the generation batch's active tokens. The surrogate itself is the method's (``cispo``, ``sapo``,
``vespo``, ``luspo`` are other surrogates and are refused).

Parameters, lowest precedence first: the method's defaults; TRL's ``epsilon`` → ``eps_low`` and
``epsilon_high`` → ``eps_high`` for methods that keep GRPO's default bound; ``method_params``.
Note the methods' dual-clip c = 10 and log-ratio clamp ±20 (TRL's own loss has neither: pass
``{"dual_clip": None, "log_ratio_clamp": None}``). Methods that need per-response rewards
(``w_reinforce`` with raw rewards, ``psr_only``, ``nsr_only``) or reference log-probs (``kl_ref``;
TRL's own ``beta`` adds its k3 KL) are refused: TRL's loss sees advantages only.

Entropy. ``H_sel`` is H_old for STEER with ``entropy="old"`` (its default) and the current H
(detached) otherwise.
On-policy (TRL's default: one update per generation), H_old equals the current H exactly; when
TRL keeps old log-probs (several updates per generation), the trainer computes H_old in the same
no-grad pass setting and stores it as ``old_entropies`` next to ``old_per_token_logps``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import fields
from typing import Any

import torch

from entropy_lens.estimators import quadrant
from entropy_lens.integrations import wants_old_entropy
from entropy_lens.methods import (
    GRPO_EPS_HIGH,
    GRPO_EPS_LOW,
    MethodContext,
    get_method,
    method_per_token_loss,
    params_from_dict,
)
from entropy_lens.objective import aggregate, clip_active
from entropy_lens.tokens import TokenBatch

try:
    import trl
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "entropy_lens.integrations.trl needs TRL: pip install 'entropy-lens[trl]' "
        "(or: pip install torch==2.13.0 'trl>=1.16,<1.17')"
    ) from exc

__all__ = ["TRL_RANGE", "TRL_TESTED", "LOSS_TYPE_AGG", "EntropyLensGRPOTrainer", "trl_config_params"]

#: TRL versions this adapter supports (``pip`` specifier) and the one it was tested with.
TRL_RANGE = ">=1.16,<1.17"
TRL_TESTED = "1.16.0"
#: TRL ``loss_type`` → :func:`entropy_lens.objective.aggregate` mode (``dapo``: see module doc).
LOSS_TYPE_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-sum-global",
}
#: Optional per-sample model inputs TRL passes to its forward (multimodal models).
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def trl_config_params(method: str, epsilon: float | None, epsilon_high: float | None) -> dict[str, Any]:
    """``eps_low`` ← TRL ``epsilon``, ``eps_high`` ← ``epsilon_high`` (else ``epsilon``), for the
    bounds where ``method`` keeps GRPO's default (``clip_higher`` and ``steer`` keep ε_high 0.28,
    ``gspo`` its 3e-4/4e-4, ``kl_cov`` no clip)."""
    defaults = {f.name: f.default for f in fields(get_method(method).params)}
    hi = epsilon if epsilon_high is None else epsilon_high
    out = {}
    for name, value, grpo in (("eps_low", epsilon, GRPO_EPS_LOW), ("eps_high", hi, GRPO_EPS_HIGH)):
        if value is not None and defaults.get(name) == grpo:
            out[name] = float(value)
    return out


class EntropyLensGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is an entropy_lens registry method.

    Extra arguments (keyword-only): ``method`` (registry name, default ``"steer"``),
    ``method_params`` (dict of overrides; ``scope`` must be ``"micro"`` — TRL's loss sees one
    micro-batch), ``method_seed`` (seed of the generator behind random selections). Everything else
    is ``GRPOTrainer``'s. Refused combinations (each has an entropy_lens equivalent):
    ``top_entropy_quantile < 1`` (method ``fork_tokens``), an entropy coefficient (method
    ``entropy_bonus``), ``importance_sampling_level="sequence"``, ``delta``,
    ``off_policy_mask_threshold``, and the non-PPO ``loss_type`` values.

    Logged per step (averaged over the step's micro-batches, tokens pooled over processes):
    ``entropy`` (TRL's own name), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``entropy_lens/entropy_mean`` (the entropy the method read),
    ``entropy_lens/weight_mean|min|max``, ``entropy_lens/frac_touched``,
    ``entropy_lens/dual_clip_frac``, ``entropy_lens/q1_share`` … ``q4_share`` and the method's own
    stats as ``entropy_lens/<method>/<name>``.
    """

    def __init__(
        self,
        *args: Any,
        method: str = "steer",
        method_params: dict[str, Any] | None = None,
        method_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        version = getattr(trl, "__version__", "0")
        lo, hi = (1, 16), (1, 17)
        if not (lo <= _version_tuple(version)[:2] < hi):
            raise ImportError(f"EntropyLensGRPOTrainer supports TRL {TRL_RANGE}, found {version}")
        spec = get_method(method)  # unknown name -> ValueError listing the methods
        probe = params_from_dict(method, method_params)
        if getattr(probe, "scope", "micro") != "micro":
            raise ValueError(
                f"{method}: scope must be 'micro' with TRL (the loss sees one micro-batch), got {probe.scope!r}"
            )
        required = spec.required_inputs(probe)
        if required:
            raise ValueError(
                f"{method}: needs {', '.join(required)}, which TRL's loss does not receive "
                "(for a KL to the reference use TRL's beta)"
            )
        self.el_method = method
        self.el_method_params = dict(method_params or {})
        self._el_needs_entropy = "entropy" in spec.factors
        self._el_generator = torch.Generator().manual_seed(int(method_seed))
        super().__init__(*args, **kwargs)
        self._el_check_args()
        self.el_params = params_from_dict(
            method,
            {**trl_config_params(method, self.args.epsilon, self.args.epsilon_high), **self.el_method_params},
        )
        self._el_wants_old = wants_old_entropy(method, self.el_params)
        accepted = inspect.signature(self._get_per_token_logps_and_entropies).parameters
        self._el_forward_keys = tuple(k for k in _FORWARD_KEYS if k in accepted)

    # ------------------------------------------------------------------------------------ checks

    def _el_check_args(self) -> None:
        args = self.args
        problems = []
        if self.loss_type not in LOSS_TYPE_AGG:
            problems.append(
                f"loss_type={self.loss_type!r} is another surrogate; use one of {', '.join(LOSS_TYPE_AGG)} "
                "(it only picks the aggregation)"
            )
        if getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            problems.append("top_entropy_quantile < 1 is method 'fork_tokens' here")
        if getattr(self, "_entropy_bonus_enabled", False):
            problems.append("an entropy coefficient is method 'entropy_bonus' here")
        if getattr(self, "importance_sampling_level", "token") != "token":
            problems.append("importance_sampling_level must be 'token'")
        if getattr(args, "delta", None) is not None:
            problems.append("delta (two-sided clipping) is not supported")
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            problems.append("off_policy_mask_threshold is not supported")
        if problems:
            raise ValueError(f"EntropyLensGRPOTrainer({self.el_method}): " + "; ".join(problems))

    # ------------------------------------------------------------------------------- old entropy

    def _el_forward_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: inputs[k] for k in self._el_forward_keys if inputs.get(k) is not None}

    def _el_ids(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask, inputs["completion_ids"].size(1)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self._el_wants_old and output.get("old_per_token_logps") is not None:
            input_ids, attention_mask, keep = self._el_ids(output)
            with torch.no_grad():
                _, old_entropies, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, keep, compute_entropy=True,
                    **self._el_forward_kwargs(output),
                )
            output["old_entropies"] = old_entropies
        return output

    # --------------------------------------------------------------------------------------- loss

    def _el_aggregate(self, per_tok: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        agg = LOSS_TYPE_AGG[self.loss_type]
        if agg == "token-sum-global":  # TRL's dapo: Σℓ over the generation batch's active tokens
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return aggregate(per_tok, mask, "token-mean") * mask.sum() / normalizer
        norm = self.max_completion_length if agg == "seq-mean-token-sum-norm" else None
        return aggregate(per_tok, mask, agg, norm) / accum

    def _compute_loss(self, model, inputs):
        input_ids, attention_mask, keep = self._el_ids(inputs)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **self._el_forward_kwargs(inputs),
        )
        mask_t = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        mask = mask_t.bool()
        adv = inputs["advantages"]
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(logps).to(logps.dtype)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        old_ent = inputs.get("old_entropies")
        sel = (old_ent if (self._el_wants_old and old_ent is not None) else entropies).detach()
        zeros = torch.zeros_like(logps).detach()
        batch = TokenBatch(
            token_ids=inputs["completion_ids"], mask=mask, logp=logps.detach(), old_logp=old.detach(),
            entropy=sel.to(logps.dtype), sum_p2=zeros, sum_p2_logp=zeros, adv=adv.detach(),
            group_id=torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device),
            reward=torch.zeros(mask.shape[0], device=mask.device),
        )
        ctx = MethodContext(generator=self._el_generator, lr=float(self.args.learning_rate))
        terms = get_method(self.el_method)(batch, self.el_params, ctx)
        if terms.penalty is not None and terms.penalty.needs_entropy and logps.requires_grad and not entropies.requires_grad:
            raise RuntimeError(
                f"{self.el_method}: TRL returned entropies without a gradient, so the entropy term would do nothing"
            )
        per_tok = method_per_token_loss(terms, logps, old, adv, mask, entropies)
        if self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False) and "importance_sampling_ratio" in inputs:
            per_tok = per_tok * inputs["importance_sampling_ratio"]
        mode = "train" if self.model.training else "eval"
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if getattr(self.args, "use_bias_correction_kl", False):
                kl = kl * torch.exp(logps - old)
            per_tok = per_tok + self.beta * kl
            self._metrics[mode]["kl"].append(self._el_global_mean(kl.detach(), mask))
        loss = self._el_aggregate(per_tok, mask, inputs, mode)
        if self.aux_loss_enabled:
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
        self._el_log(mode, batch, terms, entropies.detach(), sel)
        return loss

    # ------------------------------------------------------------------------------------ metrics

    def _el_global_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        m = mask.to(torch.float32)
        totals = self.accelerator.reduce(torch.stack([(x.to(torch.float32) * m).sum(), m.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    @torch.no_grad()
    def _el_log(self, mode: str, batch: TokenBatch, terms: Any, entropies: torch.Tensor, sel: torch.Tensor) -> None:
        """Append this micro-batch's metrics to ``self._metrics[mode]`` (one reduce, one gather)."""
        mask = batch.mask
        m = mask.to(torch.float32)
        ratio = batch.ratio
        adv = terms.adv if terms.adv is not None else batch.adv
        low = (adv < 0) & (ratio < 1 - torch.as_tensor(terms.eps_low, dtype=ratio.dtype))
        high = (adv > 0) & (ratio > 1 + torch.as_tensor(terms.eps_high, dtype=ratio.dtype))
        region = ~clip_active(ratio, adv, terms.eps_low, terms.eps_high, None)
        dual = torch.zeros_like(mask) if terms.dual_clip is None else (adv < 0) & (ratio > terms.dual_clip)
        q = quadrant(batch.logp, sel.to(batch.logp.dtype), batch.adv)
        w = terms.weight.to(torch.float32)
        per_token = {
            "entropy": entropies,
            "clip_ratio/low_mean": low,
            "clip_ratio/high_mean": high,
            "clip_ratio/region_mean": region,
            "entropy_lens/entropy_mean": sel,
            "entropy_lens/weight_mean": w,
            "entropy_lens/frac_touched": terms.touched,
            "entropy_lens/dual_clip_frac": dual,
            **{f"entropy_lens/q{k}_share": q == k for k in range(1, 5)},
        }
        sums = torch.stack([(v.to(torch.float32) * m).sum() for v in per_token.values()] + [m.sum()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        count = sums[-1].clamp(min=1.0)
        for key, value in zip(per_token, (sums[:-1] / count).tolist()):
            self._metrics[mode][key].append(value)
        extremes = torch.stack([w.masked_fill(~mask, math.inf).min(), -w.masked_fill(~mask, -math.inf).max()])
        extremes = self.accelerator.gather(extremes[None]).reshape(-1, 2).min(dim=0).values
        extremes = torch.where(torch.isfinite(extremes), extremes, torch.tensor([1.0, -1.0], device=extremes.device))
        lo_w, neg_hi_w = extremes.tolist()  # no valid token anywhere: both 1
        self._metrics[mode]["entropy_lens/weight_min"].append(lo_w)
        self._metrics[mode]["entropy_lens/weight_max"].append(-neg_hi_w)
        for key, value in terms.stats.items():
            self._metrics[mode][f"entropy_lens/{self.el_method}/{key}"].append(float(torch.as_tensor(value).float().mean()))
