"""The method contract: parameters, context, terms, penalty and the registry.

A method is one small pure function ``fn(batch, params, ctx) -> MethodTerms`` registered under a
snake_case name with :func:`register_method`. It never builds a loss itself: it returns per-token
weights, clip bounds, an optional advantage override and an optional additive penalty, and
:func:`entropy_lens.methods.loss.method_loss` (the one objective) turns those into a loss.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import torch

from entropy_lens.objective import CLIP_MODES, RATIO_LEVELS
from entropy_lens.tokens import TokenBatch

#: The four factors of docs/science.md §2.9 a method can act on (for the factor matrix).
FACTORS = ("clip", "advantage", "probability", "entropy")

#: Normalisation scopes (docs/science.md §3.3): the micro-batch, the mini-batch, the whole batch.
SCOPES = ("micro", "mini", "batch")

#: The GRPO clip defaults (docs/science.md §4.1): ε_low = ε_high = 0.2 (DeepSeekMath GRPO, arXiv
#: 2402.03300), dual-clip c = 10 (the STEER reference run scripts' clip_ratio_c, arXiv 2510.10150).
GRPO_EPS_LOW = 0.2
GRPO_EPS_HIGH = 0.2
GRPO_DUAL_CLIP = 10.0
#: |log r| clamp before exp (verl 0.4.1, the STEER reference code's base), nats.
LOG_RATIO_CLAMP = 20.0

#: Inputs beyond the always-present TokenBatch fields a method may require (``MethodSpec.needs``):
#: real per-response rewards (``reward``; framework adapters have none), the reference
#: policy's log-probs (``ref_logp``) and the LM-head kernel scores (``omega_lm_head``,
#: ``omega_lm_head_source``, from the final hidden states; STEER's ``omega=lm_head`` / ``lm_head_source``).
INPUTS = ("reward", "ref_logp", "omega_lm_head", "omega_lm_head_source")

#: Sources of the shared clip parameters' defaults (``MethodParams.SOURCES``).
CLIP_SOURCES = {
    "eps_low": "DeepSeekMath GRPO, arXiv 2402.03300 (PPO ε = 0.2)",
    "eps_high": "DeepSeekMath GRPO, arXiv 2402.03300 (PPO ε = 0.2)",
    "dual_clip": "STEER reference run scripts, clip_ratio_c = 10 (arXiv 2510.10150)",
    "log_ratio_clamp": "verl 0.4.1 (STEER reference code), log-ratio clamped to ±20",
}


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    def fmt(x: float) -> str:
        return "inf" if x == math.inf else ("-inf" if x == -math.inf else f"{x:g}")

    return f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open or hi == math.inf else ']'}"


def check_range(
    name: str,
    value: float,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ``ValueError("name must be in [lo, hi], got v")`` unless lo ≤ value ≤ hi (open ends excluded)."""
    ok = not math.isnan(value)
    ok = ok and (value > lo if lo_open else value >= lo)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be in {_interval(lo, hi, lo_open, hi_open)}, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert a parameter value against its annotation (float, int, bool, str, X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameters: a frozen dataclass, type-checked and validated on
    construction (``validate`` raises ``ValueError`` naming the parameter and its valid range).

    ``SOURCES`` (class attribute): parameter → where its default comes from (a paper with its arXiv
    id, a reference script, or "package choice" with the reason). A subclass lists the parameters
    it adds or whose default it changes; :func:`param_sources` resolves the rest up the classes.
    """

    SOURCES: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Check value ranges; subclasses call ``super().validate()``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the parameter values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClipParams(MethodParams):
    """PPO-clip bounds shared by every method (docs/science.md §4.1: ε 0.2/0.2, dual-clip 10,
    log-ratio clamp 20).

    ``eps_low``/``eps_high`` ≥ 0 (``inf`` switches that side of the clip off); ``dual_clip`` is
    ``None`` (off) or > 1; ``log_ratio_clamp`` is ``None`` (no clamp) or > 0 (nats).
    """

    SOURCES: ClassVar[dict[str, str]] = CLIP_SOURCES

    eps_low: float = GRPO_EPS_LOW
    eps_high: float = GRPO_EPS_HIGH
    dual_clip: float | None = GRPO_DUAL_CLIP
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP

    def validate(self) -> None:
        check_range("eps_low", self.eps_low, 0.0, math.inf)
        check_range("eps_high", self.eps_high, 0.0, math.inf)
        if self.dual_clip is not None:
            check_range("dual_clip", self.dual_clip, 1.0, math.inf, lo_open=True)
        if self.log_ratio_clamp is not None:
            check_range("log_ratio_clamp", self.log_ratio_clamp, 0.0, math.inf, lo_open=True)


def param_sources(params: type) -> dict[str, str]:
    """Source of every parameter's default of the params class ``params``, in field order: the
    ``SOURCES`` entry of the most derived class that lists it ("" where none does)."""
    out = {}
    for f in fields(params):
        out[f.name] = next((c.__dict__["SOURCES"][f.name] for c in params.__mro__
                            if f.name in c.__dict__.get("SOURCES", {})), "")
    return out


# ---------------------------------------------------------------------------------------------
# Context, penalty, terms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MethodContext:
    """What a method may use besides the batch and its parameters.

    ``generator``: the only source of randomness. ``lr``: η. ``scope_index``: ``[B]`` ints, the
    micro-batch of each sequence (``None``: the whole batch is one micro-batch). ``mini_index``:
    ``[B]`` ints, the mini-batch of each sequence (``None``: the whole batch is one mini-batch).
    """

    generator: torch.Generator
    lr: float = 1e-6
    scope_index: torch.Tensor | None = None
    mini_index: torch.Tensor | None = None

    def scope_ids(self, scope: str, batch_size: int) -> torch.Tensor:
        """Contiguous scope id 0..S−1 of each of the ``batch_size`` sequences for ``scope``."""
        check_choice("scope", scope, SCOPES)
        index = {"micro": self.scope_index, "mini": self.mini_index, "batch": None}[scope]
        if index is None:
            return torch.zeros(batch_size, dtype=torch.long)
        if tuple(index.shape) != (batch_size,):
            raise ValueError(f"{scope} scope index has shape {tuple(index.shape)}, expected ({batch_size},)")
        return torch.unique(index, return_inverse=True)[1].to(torch.long)


def make_context(
    seed: int = 0,
    lr: float = 1e-6,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    mini_batch_size: int | None = None,
    device: str | torch.device = "cpu",
) -> MethodContext:
    """A context with a fresh generator seeded with ``seed``; consecutive sequences are split into
    micro-/mini-batches of the given sizes (``None``: one scope for the whole batch)."""

    def chunks(size: int | None) -> torch.Tensor | None:
        if size is None:
            return None
        if batch_size is None:
            raise ValueError("batch_size is needed to split the batch into micro-/mini-batches")
        if size < 1:
            raise ValueError(f"micro/mini batch size must be >= 1, got {size}")
        return torch.arange(batch_size) // size

    gen = torch.Generator(device=device).manual_seed(int(seed))
    return MethodContext(
        generator=gen, lr=lr, scope_index=chunks(micro_batch_size), mini_index=chunks(mini_batch_size)
    )


#: Kinds of additive penalty the objective knows how to evaluate.
PENALTY_KINDS = ("entropy_bonus", "abs_logratio", "kl_ref")
#: Per-token estimators of KL(π‖π_ref) for the ``kl_ref`` penalty (Schulman, "Approximating KL
#: Divergence", 2020, http://joschu.net/blog/kl-approx.html).
KL_ESTIMATORS = ("k1", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the sampled token, ``[B, T]`` nats.

    With x = log p_ref − log p: ``k1`` = −x = log p − log p_ref (unbiased, can be negative);
    ``k3`` = eˣ − x − 1 ≥ 0 (unbiased, low variance; verl's ``low_var_kl``, GRPO's KL term).
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    x = ref_logp - logp
    return -x if estimator == "k1" else torch.exp(x) - x - 1.0


@dataclass(frozen=True, kw_only=True)
class Penalty:
    """An additive per-token loss term, evaluated by the objective on the *current* tensors.

    - ``entropy_bonus``: −coef · H (loss −= β·H; gradient through the full softmax via ``entropy``);
    - ``abs_logratio``: coef · |log p − log p_old| (KL-Cov, Cui et al. arXiv 2505.22617);
    - ``kl_ref``: coef · :func:`kl_estimate` (log p, ``ref_logp``, ``estimator``) (β·KL(π‖π_ref)).
    ``select`` ``[B, T]`` bool restricts it to some tokens (``None``: every valid token). The term is
    added after the per-token weight (it is not weighted) and aggregated with the same mode.
    ``ref_logp`` ``[B, T]``: log π_ref of the sampled tokens (``kl_ref`` only, no gradient).
    """

    kind: str
    coef: float
    select: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    estimator: str = "k3"

    def __post_init__(self) -> None:
        check_choice("penalty kind", self.kind, PENALTY_KINDS)
        check_choice("estimator", self.estimator, KL_ESTIMATORS)
        if self.kind == "kl_ref" and self.ref_logp is None:
            raise ValueError("the kl_ref penalty needs reference log-probs (ref_logp)")

    @property
    def needs_entropy(self) -> bool:
        return self.kind == "entropy_bonus"

    def per_token(
        self, logp: torch.Tensor, old_logp: torch.Tensor, entropy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The penalty of every token, ``[B, T]``, differentiable w.r.t. ``logp``/``entropy``."""
        if self.kind == "entropy_bonus":
            if entropy is None:
                raise ValueError("the entropy_bonus penalty needs the current entropy tensor")
            val = -self.coef * entropy
        elif self.kind == "kl_ref":
            val = self.coef * kl_estimate(logp, self.ref_logp.detach().to(logp.dtype), self.estimator)
        else:
            val = self.coef * (logp - old_logp).abs()
        if self.select is not None:
            val = val * self.select.to(val.dtype)
        return val

    def dlogp(self, logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor | None:
        """∂(penalty)/∂ log p of the sampled token where the penalty depends on log p only:
        ``abs_logratio`` coef·sign(log p − log p_old); ``kl_ref`` coef (k1) or
        coef·(1 − exp(log p_ref − log p)) (k3); ``None`` for ``entropy_bonus``, whose gradient
        moves the whole distribution."""
        if self.kind == "entropy_bonus":
            return None
        if self.kind == "kl_ref":
            ref = self.ref_logp.to(logp.dtype)
            g = torch.full_like(logp, self.coef) if self.estimator == "k1" else self.coef * (1.0 - torch.exp(ref - logp))
        else:
            g = self.coef * torch.sign(logp - old_logp)
        if self.select is not None:
            g = g * self.select.to(g.dtype)
        return g

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return {
            "kind": self.kind,
            "coef": float(self.coef),
            "n_selected": None if self.select is None else int(self.select.sum()),
            **({"estimator": self.estimator} if self.kind == "kl_ref" else {}),
        }


@dataclass(frozen=True, kw_only=True)
class MethodTerms:
    """What a method returns; :func:`~entropy_lens.methods.loss.method_loss` turns it into a loss.

    ``weight`` ``[B, T]``: multiplies the per-token clipped surrogate, carries no gradient, 1 means
    untouched (also 1 on padding). ``eps_low``/``eps_high``: clip bounds (float or ``[B, T]``).
    ``dual_clip``: ``None`` or c > 1. ``adv``: ``[B, T]`` advantage override or ``None``.
    ``penalty``: additive :class:`Penalty` or ``None``. ``touched`` ``[B, T]`` bool: valid tokens
    whose loss term differs from plain GRPO's. ``stats``: 0-d tensors for logging.
    ``log_ratio_clamp``, ``ratio_level``, ``clip_mode``, ``beta_low``, ``beta_high``: passed to
    :func:`entropy_lens.objective.clipped_surrogate` (``None`` = no clamp; token ratio; PPO clip).
    """

    weight: torch.Tensor
    touched: torch.Tensor
    eps_low: float | torch.Tensor = GRPO_EPS_LOW
    eps_high: float | torch.Tensor = GRPO_EPS_HIGH
    dual_clip: float | None = GRPO_DUAL_CLIP
    adv: torch.Tensor | None = None
    penalty: Penalty | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    log_ratio_clamp: float | None = None
    ratio_level: str = "token"
    clip_mode: str = "standard"
    beta_low: float = 1.0
    beta_high: float = 1.0

    def __post_init__(self) -> None:
        shape = tuple(self.weight.shape)
        if self.weight.requires_grad:
            raise ValueError("MethodTerms.weight must carry no gradient (detach it)")
        if tuple(self.touched.shape) != shape or self.touched.dtype != torch.bool:
            raise ValueError("MethodTerms.touched must be a bool tensor shaped like weight")
        if self.adv is not None and tuple(self.adv.shape) != shape:
            raise ValueError(f"MethodTerms.adv has shape {tuple(self.adv.shape)}, weight has {shape}")
        for name in ("eps_low", "eps_high"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != shape:
                raise ValueError(f"MethodTerms.{name} has shape {tuple(v.shape)}, weight has {shape}")
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("clip_mode", self.clip_mode, CLIP_MODES)

    def rows(self, rows: slice, width: int | None = None) -> "MethodTerms":
        """The terms of sequences ``rows`` (and the first ``width`` positions), for micro-batches."""

        def cut(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                return t[rows, :width]
            return t

        pen = self.penalty
        if pen is not None:
            pen = replace(pen, select=cut(pen.select), ref_logp=cut(pen.ref_logp))
        return replace(
            self, weight=cut(self.weight), touched=cut(self.touched), eps_low=cut(self.eps_low),
            eps_high=cut(self.eps_high), adv=cut(self.adv), penalty=pen,
        )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

MethodFn = Callable[[TokenBatch, Any, MethodContext], MethodTerms]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, one-line summary, parameter class, factors and the
    inputs (:data:`INPUTS`) it may require beyond the always-present TokenBatch fields."""

    name: str
    fn: MethodFn
    summary: str
    factors: tuple[str, ...]
    params: type
    needs: tuple[str, ...] = ()

    def default_params(self) -> Any:
        return self.params()

    def required_inputs(self, params: Any = None) -> tuple[str, ...]:
        """The inputs of :data:`INPUTS` this method reads with ``params`` (defaults if ``None``):
        ``needs``, narrowed by the params' own ``required_inputs()`` where it defines one."""
        params = self.params() if params is None else params
        narrow = getattr(params, "required_inputs", None)
        return tuple(narrow()) if callable(narrow) else self.needs

    def missing_inputs(self, batch: TokenBatch, params: Any = None) -> tuple[str, ...]:
        """The required inputs ``batch`` lacks (its optional field is None); ``reward`` always counts as
        present in a TokenBatch (adapters that have no rewards check ``required_inputs``)."""
        return tuple(n for n in self.required_inputs(params) if n != "reward" and getattr(batch, n) is None)

    def __call__(self, batch: TokenBatch, params: Any, ctx: MethodContext) -> MethodTerms:
        if not isinstance(params, self.params):
            raise TypeError(f"{self.name} expects {self.params.__name__}, got {type(params).__name__}")
        return self.fn(batch, params, ctx)


_REGISTRY: dict[str, MethodSpec] = {}
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # whole name (fullmatch: "$" would let a final "\n" through)


def register_method(
    name: str,
    *,
    summary: str,
    factors: tuple[str, ...] = (),
    params: type,
    needs: tuple[str, ...] = (),
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn(batch, params, ctx) -> MethodTerms`` under ``name``.

    ``name`` is snake_case and unique (a duplicate is an error); ``factors`` ⊆ :data:`FACTORS`;
    ``params`` is a frozen dataclass whose defaults construct (all fields have defaults);
    ``needs`` ⊆ :data:`INPUTS`: inputs the method requires (the trainer, compare and the adapters
    check them before calling it).
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"method name must be snake_case, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    bad = [f for f in factors if f not in FACTORS]
    if bad:
        raise ValueError(f"unknown factor(s) {', '.join(map(repr, bad))}; valid: {', '.join(FACTORS)}")
    if not (dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen):
        raise ValueError(f"params of method {name!r} must be a frozen dataclass")
    if not summary or "\n" in summary:
        raise ValueError("summary must be one non-empty line")
    bad = [n for n in needs if n not in INPUTS]
    if bad:
        raise ValueError(f"unknown input(s) {', '.join(map(repr, bad))} in needs; valid: {', '.join(INPUTS)}")

    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[name] = MethodSpec(
            name=name, fn=fn, summary=summary, factors=tuple(factors), params=params, needs=tuple(needs)
        )
        return fn

    return deco


def unregister_method(name: str) -> None:
    """Remove a method (for tests and plugins that replace one deliberately)."""
    _REGISTRY.pop(name, None)


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``; unknown → ValueError listing the names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}") from None


def params_from_dict(name: str, values: dict[str, Any] | None = None) -> Any:
    """Build method ``name``'s parameters from a dict (defaults for missing keys).

    Unknown keys → ValueError listing the valid ones; out-of-range values → ValueError naming the
    parameter and the valid range (both prefixed with the method name).
    """
    spec = get_method(name)
    values = dict(values or {})
    valid = [f.name for f in fields(spec.params)]
    unknown = sorted(k for k in values if k not in valid)
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    try:
        return spec.params(**values)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def apply_method(
    name: str,
    batch: TokenBatch,
    params: Any = None,
    ctx: MethodContext | None = None,
) -> MethodTerms:
    """Run method ``name``; ``params`` may be its dataclass, a dict of overrides or ``None``
    (defaults); ``ctx`` defaults to :func:`make_context` (seed 0, whole-batch scopes)."""
    spec = get_method(name)
    if params is None or isinstance(params, dict):
        params = params_from_dict(name, params)
    if ctx is None:
        ctx = make_context(0)
    return spec(batch, params, ctx)


def params_table(name: str) -> list[tuple[str, Any]]:
    """(parameter, default) pairs of method ``name``, in declaration order."""
    spec = get_method(name)
    defaults = spec.params()
    return [(f.name, getattr(defaults, f.name)) for f in fields(spec.params)]


def params_sources(name: str) -> dict[str, str]:
    """Where each parameter default of method ``name`` comes from (:func:`param_sources`)."""
    return param_sources(get_method(name).params)

