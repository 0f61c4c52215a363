"""STEER: per-token weights from the predicted entropy change (arXiv 2510.10150; docs/science.md §3).

Each valid token gets a weight λ ∈ [λ_min, λ_max] (no gradient) that multiplies its clipped
surrogate; the loss stays a token-mean over valid tokens, weights not renormalised.

Score ω (``omega``):
- ``code`` (released reference code, default): ω = (A / p_old)·p(1−p)·(log p + H_old)
  (:func:`entropy_lens.estimators.omega_code`; H_old is the batch's recorded ``entropy``);
- ``paper`` (Theorem 1 of v4): ω = −r·A·p(1−p)·(log p + H), i.e. Ω of
  :func:`entropy_lens.estimators.omega_paper` *without* the constant η/L (with η/L every |Ω|
  would sit far below the 0.02 floor and the weights would all be ≈ 1) and without I_clip;
- ``lm_head`` (a package variant, docs/attribution.md §5): ω = the batch's ``omega_lm_head``, the
  first-order entropy change of the token when the LM head alone takes the SGD step of the whole
  batch (eq. 8 there, without η/L), with the true kernel h_k·h_j between tokens instead of the
  own-token tabular form. It counts the effect of every other token's update through the head, the
  best of the cheap estimators measured on the bundled model. Needs the input ``omega_lm_head``
  (the trainer computes it at θ_old once per step; ``compare`` reads it from the table when present);
- ``lm_head_source`` (package variant): ω = ``omega_lm_head_source``, the change of the whole
  batch's summed entropy caused by the token's own share of that head step (eq. 12 there): the
  token's effect on every other token, which is what its weight scales;
- ``use_iclip``: multiply ω by I_clip (computed with the method's own clip bounds) for either form.

Entropy (``entropy``): ``old`` (default, the reference code) reads H_old from
``batch.old_entropy``, falling back to ``batch.entropy`` when it is ``None`` (analyze and compare
hold the batch at θ_old, where the two are equal); ``current`` reads ``batch.entropy``.

Mapping, with M = max|ω| and m = min|ω| over the valid tokens of the scope:
- ``exp`` (default): k = ln(1/λ_min) / max(M, 0.02); λ = clamp(exp(−k·|ω|), λ_min, 1). The token
  with |ω| = M gets exactly λ_min unless M < 0.02, in which case none reaches λ_min.
- ``linear``: λ = λ_max − (|ω| − m)·(λ_max − λ_min)/(M − m), clamped to [λ_min, λ_max];
  (λ_min + λ_max)/2 where M = m.
- ``binary`` (the paper's mapping ablation): λ = λ_min where |ω| ≥ τ·max(M, 0.02), else 1, with
  τ = ``threshold`` ∈ (0, 1]. Decision: the paper describes a threshold on |ω|; a threshold
  relative to the scope's max (with the exp mapping's 0.02 floor) keeps it scale-free like the
  exp mapping, and τ = 0.5 (package choice) down-weights the tokens whose |ω| is at least half the
  largest. With τ = 1 only the largest |ω| of the scope is down-weighted.

Decision on λ_max: ``lambda_max=None`` resolves to 1.0 for ``exp`` and ``binary`` (any other
explicit value is an error) and to 1.2 for ``linear`` (the released script's range [0.8, 1.2]).
Defaults follow the released code and scripts (run_exp.sh, run_linear.sh): ``exp``, ``code``, no
I_clip, H_old, λ_min = 0.8 (the paper v4 uses 0.7), scope = micro-batch, ε 0.2/0.28, dual-clip
10, log-ratio clamp 20. λ_min = 1 with ε_high = 0.2 is exactly ``grpo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from entropy_lens.estimators import omega_code, omega_paper
from entropy_lens.methods.base import (
    SCOPES,
    ClipParams,
    MethodContext,
    MethodTerms,
    check_choice,
    check_range,
    register_method,
)
from entropy_lens.methods.baselines import clip_changed, plain_terms, valid_mean
from entropy_lens.methods.scopes import scope_max, scope_min
from entropy_lens.objective import clip_active
from entropy_lens.tokens import TokenBatch

#: Floor on max|ω| in the exp mapping's rate k (reference code).
OMEGA_FLOOR = 0.02
#: λ_max of the linear mapping when not given (released script range [0.8, 1.2]).
LINEAR_LAMBDA_MAX = 1.2
MAPPINGS = ("exp", "linear", "binary")
OMEGA_FORMS = ("code", "paper", "lm_head", "lm_head_source")
#: ω form -> the TokenBatch field (method input) it reads
OMEGA_INPUTS = {"lm_head": "omega_lm_head", "lm_head_source": "omega_lm_head_source"}
ENTROPY_SOURCES = ("old", "current")
_REF = "STEER reference code/scripts (arXiv 2510.10150)"


@dataclass(frozen=True)
class SteerParams(ClipParams):
    """STEER options (module docstring). λ_min ∈ (0, 1]; λ_max ≥ λ_min (linear only);
    ``threshold`` ∈ (0, 1] (binary only); ``entropy`` ∈ {old, current}."""

    SOURCES: ClassVar[dict[str, str]] = {
        "eps_high": "STEER reference run_exp.sh / run_linear.sh, clip_ratio_high = 0.28 (arXiv 2510.10150)",
        "mapping": f"{_REF}: exp",
        "omega": f"{_REF}: the code form of ω (lm_head, lm_head_source: package variants, docs/attribution.md)",
        "use_iclip": f"{_REF}: no I_clip in ω",
        "lambda_min": "STEER released run script: 0.8 (paper v4: 0.7)",
        "lambda_max": "STEER run_linear.sh range [0.8, 1.2] (linear); 1 for exp/binary",
        "scope": f"{_REF}: micro-batch",
        "entropy": f"{_REF}: H_old recorded with the old log-probs",
        "threshold": "package choice: the paper's binary ablation gives no threshold; 0.5·max|ω|",
    }

    eps_high: float = 0.28
    mapping: str = "exp"
    omega: str = "code"
    use_iclip: bool = False
    lambda_min: float = 0.8
    lambda_max: float | None = None
    scope: str = "micro"
    entropy: str = "old"
    threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_choice("mapping", self.mapping, MAPPINGS)
        check_choice("omega", self.omega, OMEGA_FORMS)
        check_choice("scope", self.scope, SCOPES)
        check_choice("entropy", self.entropy, ENTROPY_SOURCES)
        check_range("lambda_min", self.lambda_min, 0.0, 1.0, lo_open=True)
        check_range("threshold", self.threshold, 0.0, 1.0, lo_open=True)
        if self.lambda_max is not None:
            if self.mapping != "linear" and self.lambda_max != 1.0:
                raise ValueError(
                    f"lambda_max must be 1 (or unset) with mapping={self.mapping!r}, which maps into "
                    f"[lambda_min, 1]; got {self.lambda_max!r}"
                )
            check_range("lambda_max", self.lambda_max, self.lambda_min, math.inf, hi_open=True)
        elif self.mapping == "linear" and self.lambda_min > LINEAR_LAMBDA_MAX:
            raise ValueError(f"lambda_min must be <= lambda_max={LINEAR_LAMBDA_MAX}, got {self.lambda_min!r}")

    def required_inputs(self) -> tuple[str, ...]:
        return (OMEGA_INPUTS[self.omega],) if self.omega in OMEGA_INPUTS else ()

    @property
    def resolved_lambda_max(self) -> float:
        if self.lambda_max is not None:
            return self.lambda_max
        return LINEAR_LAMBDA_MAX if self.mapping == "linear" else 1.0


def steer_omega(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    entropy: torch.Tensor,
    adv: torch.Tensor,
    ratio: torch.Tensor,
    iclip: torch.Tensor,
    form: str = "code",
    use_iclip: bool = False,
    lm_head: torch.Tensor | None = None,
) -> torch.Tensor:
    """STEER score ω per token ``[B, T]`` (see module docstring); ``iclip`` is I_clip (bool or
    0/1); ``lm_head``: the LM-head kernel score ``[B, T]`` (nats per unit η/L) that the form
    ``lm_head`` or ``lm_head_source`` reads (the batch field :data:`OMEGA_INPUTS` names)."""
    check_choice("omega", form, OMEGA_FORMS)
    if form == "code":
        om = omega_code(logp, old_logp, entropy, adv)
    elif form == "paper":
        om = omega_paper(logp, entropy, adv, ratio, 1.0, lr=1.0, n_tokens=1)
    else:
        if lm_head is None:
            raise ValueError(f"omega={form!r} needs the LM-head kernel score (TokenBatch.{OMEGA_INPUTS[form]}), "
                             "which this batch lacks")
        om = lm_head.detach().to(logp.dtype)
    if use_iclip:
        om = om * iclip.to(om.dtype)
    return om


def steer_weights(
    omega_abs: torch.Tensor,
    mask: torch.Tensor,
    seq_scope: torch.Tensor,
    mapping: str = "exp",
    lambda_min: float = 0.8,
    lambda_max: float = 1.0,
    threshold: float = 0.5,
) -> torch.Tensor:
    """λ per token from |ω| ``[B, T]``, max/min over each scope's valid tokens; 1 on padding.

    ``seq_scope`` ``[B]``: contiguous scope id of each sequence; ``threshold``: τ of the binary
    mapping. See the module docstring.
    """
    check_choice("mapping", mapping, MAPPINGS)
    a = omega_abs.detach().to(torch.float64)  # mapping in fp64; result in the input dtype
    tok_scope = seq_scope.to(a.device)[:, None].expand(a.shape)
    M = scope_max(a, mask, seq_scope)[tok_scope]
    if mapping == "exp":
        k = math.log(1.0 / lambda_min) / torch.clamp(M, min=OMEGA_FLOOR)
        lam = torch.clamp(torch.exp(-k * a), lambda_min, 1.0)
    elif mapping == "binary":
        big = a >= threshold * torch.clamp(M, min=OMEGA_FLOOR)
        lam = torch.where(big, lambda_min, 1.0).to(a.dtype)
    else:
        m = scope_min(a, mask, seq_scope)[tok_scope]
        span = M - m
        equal = span <= 0
        lin = lambda_max - (a - m) * (lambda_max - lambda_min) / torch.where(equal, 1.0, span)
        lam = torch.where(equal, 0.5 * (lambda_min + lambda_max), torch.clamp(lin, lambda_min, lambda_max))
    lam = torch.where(mask, lam, torch.ones((), dtype=lam.dtype, device=lam.device))
    return lam.to(omega_abs.dtype)


def steer_entropy(batch: TokenBatch, source: str = "old") -> torch.Tensor:
    """The entropy STEER's ω reads, ``[B, T]`` nats, detached: H_old (``batch.old_entropy``, else
    ``batch.entropy``) for ``old``; the batch's ``entropy`` for ``current``."""
    check_choice("entropy", source, ENTROPY_SOURCES)
    if source == "old" and batch.old_entropy is not None:
        return batch.old_entropy.detach()
    return batch.entropy.detach()


@register_method(
    "steer",
    summary="weight each token by lambda in [lambda_min, 1] from its predicted entropy change (STEER, arXiv 2510.10150)",
    factors=("clip", "advantage", "probability", "entropy"),
    params=SteerParams,
    needs=tuple(OMEGA_INPUTS.values()),
)
def steer(batch: TokenBatch, params: SteerParams, ctx: MethodContext) -> MethodTerms:
    mask = batch.mask
    ratio = batch.ratio.detach()
    iclip = clip_active(ratio, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    om = steer_omega(
        batch.logp.detach(),
        batch.old_logp,
        steer_entropy(batch, params.entropy),
        batch.adv,
        ratio,
        iclip,
        params.omega,
        params.use_iclip,
        getattr(batch, OMEGA_INPUTS[params.omega]) if params.omega in OMEGA_INPUTS else None,
    )
    seq_scope = ctx.scope_ids(params.scope, mask.shape[0])
    lam = steer_weights(
        om.abs(), mask, seq_scope, params.mapping, params.lambda_min, params.resolved_lambda_max, params.threshold
    ).to(torch.float32)
    touched = (mask & (lam != 1.0)) | clip_changed(batch, batch.adv, params.eps_low, params.eps_high, params.dual_clip)
    big = om.abs().masked_fill(~mask, 0.0)
    return plain_terms(
        batch,
        params,
        weight=lam.detach(),
        touched=touched,
        stats={
            "weight_mean": valid_mean(lam, mask),
            "weight_min": lam.masked_fill(~mask, math.inf).min() if mask.any() else torch.tensor(1.0),
            "frac_at_lambda_min": valid_mean((lam <= params.lambda_min).float(), mask),
            "omega_abs_max": big.max() if big.numel() else torch.tensor(0.0),
        },
    )
