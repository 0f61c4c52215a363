"""Entropy-intervention methods: a registry of small pure functions and the one objective.

Contract (docs/science.md §4.2): a method is registered with

    @register_method("name", summary="one line", factors=("clip", ...), params=SomeParams)
    def name(batch: TokenBatch, params: SomeParams, ctx: MethodContext) -> MethodTerms: ...

``SomeParams`` is a frozen dataclass (subclass of :class:`ClipParams`) validated on construction;
``ctx`` carries the only random generator, η and the micro/mini-batch assignment of the sequences;
:class:`MethodTerms` holds per-token weights (no gradient), clip bounds, an optional advantage
override, an optional :class:`Penalty` and ``touched``/``stats``. :func:`method_loss` is the one
place that turns terms into a loss (via :mod:`entropy_lens.objective`).

Registered methods (docs/science.md §4.3), with their modules: ``grpo``, ``clip_higher``,
``entropy_bonus``, ``fork_tokens``, ``w_reinforce``, ``entropy_adv`` (baselines); ``clip_cov``,
``kl_cov`` (covariance); ``steer`` (steer); ``psr_only``, ``nsr_only`` (polarity); ``kl_ref``,
``adaptive_entropy`` (regularizers); ``gspo``, ``gppo`` (surrogates).

Every parameter default names its source (``SOURCES`` on the params classes, :func:`params_sources`);
a method declares the inputs it requires beyond the always-present batch fields (``needs``:
``reward``, ``ref_logp``; :meth:`MethodSpec.required_inputs`, :meth:`MethodSpec.missing_inputs`).
"""

from __future__ import annotations

from entropy_lens.methods import baselines as _baselines  # noqa: F401  (registers the methods)
from entropy_lens.methods import covariance as _covariance  # noqa: F401
from entropy_lens.methods import polarity as _polarity  # noqa: F401
from entropy_lens.methods import regularizers as _regularizers  # noqa: F401
from entropy_lens.methods import steer as _steer  # noqa: F401
from entropy_lens.methods import surrogates as _surrogates  # noqa: F401
from entropy_lens.methods.base import (
    FACTORS,
    GRPO_DUAL_CLIP,
    GRPO_EPS_HIGH,
    GRPO_EPS_LOW,
    INPUTS,
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    PENALTY_KINDS,
    SCOPES,
    ClipParams,
    MethodContext,
    MethodParams,
    MethodSpec,
    MethodTerms,
    Penalty,
    apply_method,
    get_method,
    kl_estimate,
    list_methods,
    make_context,
    param_sources,
    params_from_dict,
    params_sources,
    params_table,
    register_method,
    unregister_method,
)
from entropy_lens.methods.baselines import (
    ClipHigherParams,
    EntropyAdvParams,
    EntropyBonusParams,
    ForkTokensParams,
    GrpoParams,
    WReinforceParams,
    entropy_shaped_advantage,
)
from entropy_lens.methods.covariance import ClipCovParams, KLCovParams, scoped_cov_term
from entropy_lens.methods.loss import method_loss, method_per_token_loss
from entropy_lens.methods.polarity import NsrOnlyParams, PsrOnlyParams
from entropy_lens.methods.regularizers import (
    AdaptiveEntropyParams,
    KlRefParams,
    adaptive_coefficient,
)
from entropy_lens.methods.steer import (
    SteerParams,
    steer_entropy,
    steer_omega,
    steer_weights,
)
from entropy_lens.methods.surrogates import GppoParams, GspoParams

__all__ = [
    "FACTORS",
    "GRPO_DUAL_CLIP",
    "GRPO_EPS_HIGH",
    "GRPO_EPS_LOW",
    "INPUTS",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "PENALTY_KINDS",
    "SCOPES",
    "AdaptiveEntropyParams",
    "ClipCovParams",
    "ClipHigherParams",
    "ClipParams",
    "EntropyAdvParams",
    "EntropyBonusParams",
    "ForkTokensParams",
    "GppoParams",
    "GrpoParams",
    "GspoParams",
    "KLCovParams",
    "KlRefParams",
    "MethodContext",
    "MethodParams",
    "MethodSpec",
    "MethodTerms",
    "NsrOnlyParams",
    "Penalty",
    "PsrOnlyParams",
    "SteerParams",
    "WReinforceParams",
    "adaptive_coefficient",
    "apply_method",
    "entropy_shaped_advantage",
    "get_method",
    "kl_estimate",
    "list_methods",
    "make_context",
    "method_loss",
    "method_per_token_loss",
    "param_sources",
    "params_from_dict",
    "params_sources",
    "params_table",
    "register_method",
    "scoped_cov_term",
    "steer_entropy",
    "steer_omega",
    "steer_weights",
    "unregister_method",
]
