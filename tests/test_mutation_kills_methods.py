"""What the first mutation run of ``entropy_lens/methods/`` showed untested (docs/testing.md):
the parameter classes' range checks (accepted at the bound, refused just outside, each one-line
message exact), value coercion, the shape checks of ``MethodTerms``, ``Penalty``, ``make_context``
and scopes, the registry's checks, and the exact weights, advantages, ``touched`` masks and stats
of the methods against float64 references written here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from entropy_lens.methods import (
    ClipParams,
    MethodContext,
    MethodTerms,
    Penalty,
    apply_method,
    get_method,
    kl_estimate,
    list_methods,
    make_context,
    method_loss,
    method_per_token_loss,
    params_from_dict,
    params_table,
    register_method,
    unregister_method,
)
from entropy_lens.methods.base import (
    INPUTS,
    _coerce,
    _interval,
    check_choice,
    check_range,
)
from entropy_lens.tokens import TokenBatch


def exact(msg: str) -> str:
    """A ``pytest.raises(match=...)`` pattern matching the whole message ``msg`` and nothing else."""
    return "^" + re.escape(msg) + "$"


# ------------------------------------------------------------------ parameter ranges and messages

# (method, parameter, refused value, the exact message); the method name prefixes every message
REFUSED = [
    ("grpo", "eps_low", -0.1, "eps_low must be in [0, inf), got -0.1"),
    ("grpo", "eps_low", math.nan, "eps_low must be in [0, inf), got nan"),
    ("grpo", "eps_high", -1e-3, "eps_high must be in [0, inf), got -0.001"),
    ("grpo", "dual_clip", 1.0, "dual_clip must be in (1, inf), got 1.0"),
    ("grpo", "dual_clip", 0.5, "dual_clip must be in (1, inf), got 0.5"),
    ("grpo", "log_ratio_clamp", 0.0, "log_ratio_clamp must be in (0, inf), got 0.0"),
    ("entropy_bonus", "beta", -0.1, "beta must be in [0, inf), got -0.1"),
    ("fork_tokens", "rho", 0.0, "rho must be in (0, 1], got 0.0"),
    ("fork_tokens", "rho", 1.0000001, "rho must be in (0, 1], got 1.0000001"),
    ("fork_tokens", "scope", "node", "scope must be one of micro, mini, batch, got 'node'"),
    ("w_reinforce", "lam", -0.1, "lam must be in [0, inf), got -0.1"),
    ("w_reinforce", "advantage", "rloo", "advantage must be one of raw, grpo, got 'rloo'"),
    ("w_reinforce", "threshold", math.inf, "threshold must be in (-inf, inf), got inf"),
    ("w_reinforce", "threshold", -math.inf, "threshold must be in (-inf, inf), got -inf"),
    ("w_reinforce", "threshold", math.nan, "threshold must be in (-inf, inf), got nan"),
    ("entropy_adv", "alpha", -0.5, "alpha must be in [0, inf), got -0.5"),
    ("entropy_adv", "kappa", 0.0, "kappa must be in (0, inf), got 0.0"),
    ("clip_cov", "clip_ratio", 0.0, "clip_ratio must be in (0, 1], got 0.0"),
    ("clip_cov", "clip_ratio", 1.5, "clip_ratio must be in (0, 1], got 1.5"),
    ("clip_cov", "lb", math.inf, "lb must be in (-inf, inf), got inf"),
    ("clip_cov", "lb", -math.inf, "lb must be in (-inf, inf), got -inf"),
    ("clip_cov", "ub", 1.0, "ub must be in (1, inf), got 1.0"),
    ("clip_cov", "ub", 0.5, "ub must be in (1, inf), got 0.5"),
    ("clip_cov", "min_select", -1, "min_select must be in [0, inf), got -1"),
    ("clip_cov", "scope", "all", "scope must be one of micro, mini, batch, got 'all'"),
    ("kl_cov", "k", 0.0, "k must be in (0, 1], got 0.0"),
    ("kl_cov", "k", 2.0, "k must be in (0, 1], got 2.0"),
    ("kl_cov", "beta", -1.0, "beta must be in [0, inf), got -1.0"),
    ("kl_cov", "min_select", -2, "min_select must be in [0, inf), got -2"),
    ("kl_cov", "scope", "node", "scope must be one of micro, mini, batch, got 'node'"),
    ("psr_only", "threshold", math.inf, "threshold must be in (-inf, inf), got inf"),
    ("nsr_only", "threshold", -math.inf, "threshold must be in (-inf, inf), got -inf"),
    ("kl_ref", "beta", -1.0, "beta must be in [0, inf), got -1.0"),
    ("kl_ref", "estimator", "k2", "estimator must be one of k1, k3, got 'k2'"),
    ("adaptive_entropy", "target", -0.1, "target must be in [0, inf), got -0.1"),
    ("adaptive_entropy", "target", math.inf, "target must be in [0, inf), got inf"),
    ("adaptive_entropy", "gain", -1.0, "gain must be in [0, inf), got -1.0"),
    ("adaptive_entropy", "gain", math.inf, "gain must be in [0, inf), got inf"),
    ("adaptive_entropy", "beta_max", -0.01, "beta_max must be in [0, inf), got -0.01"),
    ("adaptive_entropy", "beta_max", math.inf, "beta_max must be in [0, inf), got inf"),
    ("adaptive_entropy", "beta0", 0.5, "beta0 must be in [0, 0.01], got 0.5"),
    ("adaptive_entropy", "beta0", -0.001, "beta0 must be in [0, 0.01], got -0.001"),
    ("gppo", "beta_low", -0.5, "beta_low must be in [0, inf), got -0.5"),
    ("gppo", "beta_low", math.inf, "beta_low must be in [0, inf), got inf"),
    ("gppo", "beta_high", -0.5, "beta_high must be in [0, inf), got -0.5"),
    ("gppo", "beta_high", math.inf, "beta_high must be in [0, inf), got inf"),
    ("gspo", "eps_low", -1.0, "eps_low must be in [0, inf), got -1.0"),
]


@pytest.mark.parametrize("name,key,value,msg", REFUSED, ids=[f"{n}-{k}-{v}" for n, k, v, _ in REFUSED])
def test_out_of_range_parameter_gives_its_one_line_message(name, key, value, msg):
    with pytest.raises(ValueError, match=exact(f"{name}: {msg}")):
        params_from_dict(name, {key: value})


# (method, overrides) on or next to a bound, each of which must be accepted and kept as given
ACCEPTED = [
    ("grpo", {"eps_low": 0.0, "eps_high": 0.0}),
    ("grpo", {"eps_low": math.inf, "eps_high": math.inf}),
    ("grpo", {"dual_clip": 1.0000001, "log_ratio_clamp": 1e-9}),
    ("grpo", {"dual_clip": None, "log_ratio_clamp": None}),
    ("grpo", {"dual_clip": math.inf, "log_ratio_clamp": math.inf}),
    ("entropy_bonus", {"beta": 0.0}),
    ("fork_tokens", {"rho": 1.0, "scope": "batch"}),
    ("fork_tokens", {"rho": 1e-12, "scope": "mini"}),
    ("w_reinforce", {"lam": 0.0, "threshold": -1e300, "advantage": "grpo"}),
    ("w_reinforce", {"threshold": 1e300}),
    ("entropy_adv", {"alpha": 0.0, "kappa": 1e-12}),
    ("clip_cov", {"clip_ratio": 1.0, "min_select": 0, "scope": "batch"}),
    ("clip_cov", {"clip_ratio": 1e-12, "lb": -1e300, "ub": -1e299}),
    ("clip_cov", {"lb": 2.5, "ub": 2.5000001}),
    ("kl_cov", {"k": 1.0, "beta": 0.0, "min_select": 0, "scope": "mini"}),
    ("kl_cov", {"k": 1e-12}),
    ("psr_only", {"threshold": -1e300}),
    ("kl_ref", {"beta": 0.0, "estimator": "k1"}),
    ("adaptive_entropy", {"target": 0.0, "gain": 0.0, "beta_max": 0.0, "beta0": 0.0}),
    ("adaptive_entropy", {"beta0": 0.01, "beta_max": 0.01}),
    ("adaptive_entropy", {"target": 1e300, "gain": 1e300, "beta_max": 1e300, "beta0": 1e300}),
    ("gppo", {"beta_low": 0.0, "beta_high": 0.0}),
    ("gppo", {"beta_low": 1e300, "beta_high": 1e300}),
]


@pytest.mark.parametrize("name,values", ACCEPTED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ACCEPTED)])
def test_parameter_on_its_bound_is_accepted(name, values):
    p = params_from_dict(name, values)
    for k, v in values.items():
        assert getattr(p, k) == v, k


@pytest.mark.parametrize(
    "lb,ub,msg",
    [(2.5, 2.5, "ub must be in (2.5, inf), got 2.5"), (-3.0, -4.0, "ub must be in (-3, inf), got -4.0"),
     (0.25, 0.0, "ub must be in (0.25, inf), got 0.0")],
)
def test_clip_cov_upper_bound_is_relative_to_lb(lb, ub, msg):
    with pytest.raises(ValueError, match=exact(f"clip_cov: {msg}")):
        params_from_dict("clip_cov", {"lb": lb, "ub": ub})


def test_adaptive_entropy_beta0_bound_follows_beta_max():
    assert params_from_dict("adaptive_entropy", {"beta_max": 0.3, "beta0": 0.3}).beta0 == 0.3
    with pytest.raises(ValueError, match=exact("adaptive_entropy: beta0 must be in [0, 0.3], got 0.30001")):
        params_from_dict("adaptive_entropy", {"beta_max": 0.3, "beta0": 0.30001})


@pytest.mark.parametrize(
    "lo,hi,lo_open,hi_open,text",
    [
        (0.0, 1.0, False, False, "[0, 1]"),
        (0.0, 1.0, True, False, "(0, 1]"),
        (0.0, 1.0, False, True, "[0, 1)"),
        (0.0, 1.0, True, True, "(0, 1)"),
        (-math.inf, math.inf, False, False, "[-inf, inf)"),  # an infinite end always prints open
        (-math.inf, 2e-4, True, False, "(-inf, 0.0002]"),
        (1.5, math.inf, True, False, "(1.5, inf)"),
        (-2.0, -1e-7, False, False, "[-2, -1e-07]"),
    ],
)
def test_interval_text(lo, hi, lo_open, hi_open, text):
    assert _interval(lo, hi, lo_open, hi_open) == text


@pytest.mark.parametrize(
    "value,kw,ok",
    [
        (0.0, {}, True),  # default bounds: (−inf, inf) closed
        (-1e308, {}, True),
        (-math.inf, {}, True),
        (math.inf, {}, True),
        (math.nan, {}, False),
        (1.0, {"lo": 1.0}, True),
        (1.0, {"lo": 1.0, "lo_open": True}, False),
        (2.0, {"hi": 2.0}, True),
        (2.0, {"hi": 2.0, "hi_open": True}, False),
        (2.0000001, {"hi": 2.0}, False),
        (0.9999999, {"lo": 1.0}, False),
    ],
)
def test_check_range_bounds(value, kw, ok):
    if ok:
        check_range("x", value, **kw)
    else:
        with pytest.raises(ValueError, match=r"^x must be in "):
            check_range("x", value, **kw)


def test_check_range_and_choice_messages():
    with pytest.raises(ValueError, match=exact("x must be in [-inf, inf), got nan")):
        check_range("x", math.nan)
    with pytest.raises(ValueError, match=exact("x must be in (1, 2), got 2")):
        check_range("x", 2, 1.0, 2.0, lo_open=True, hi_open=True)
    with pytest.raises(ValueError, match=exact("mode must be one of a, b, got 'c'")):
        check_choice("mode", "c", ("a", "b"))
    check_choice("mode", "b", ("a", "b"))


# ------------------------------------------------------------------------------- value coercion


@pytest.mark.parametrize(
    "name,key,value,msg",
    [
        ("grpo", "eps_low", True, "eps_low must be a number, got True"),
        ("grpo", "eps_low", "0.2", "eps_low must be a number, got '0.2'"),
        ("grpo", "dual_clip", False, "dual_clip must be a number, got False"),
        ("grpo", "dual_clip", "3", "dual_clip must be a number, got '3'"),
        ("clip_cov", "min_select", 2.5, "min_select must be an integer, got 2.5"),
        ("clip_cov", "min_select", True, "min_select must be an integer, got True"),
        ("clip_cov", "min_select", "1", "min_select must be an integer, got '1'"),
        ("steer", "use_iclip", 1, "use_iclip must be true or false, got 1"),
        ("steer", "use_iclip", "yes", "use_iclip must be true or false, got 'yes'"),
        ("fork_tokens", "scope", 3, "scope must be a string, got 3"),
        ("kl_ref", "estimator", None, "estimator must be a string, got None"),
        ("fork_tokens", "rho", None, "rho must be a number, got None"),
    ],
)
def test_wrong_type_gives_its_one_line_message(name, key, value, msg):
    with pytest.raises(ValueError, match=exact(f"{name}: {msg}")):
        params_from_dict(name, {key: value})


def test_values_are_converted_to_the_annotated_type():
    p = params_from_dict("clip_cov", {"eps_low": 1, "dual_clip": 3, "min_select": 2.0, "lb": -1})
    assert type(p.eps_low) is float and p.eps_low == 1.0
    assert type(p.dual_clip) is float and p.dual_clip == 3.0
    assert type(p.min_select) is int and p.min_select == 2
    assert type(p.lb) is float and p.lb == -1.0
    assert params_from_dict("grpo", {"dual_clip": None}).dual_clip is None
    assert params_from_dict("steer", {"lambda_max": None}).lambda_max is None
    q = params_from_dict("steer", {"mapping": "linear", "lambda_max": 1})
    assert type(q.lambda_max) is float and q.lambda_max == 1.0
    assert params_from_dict("steer", {"use_iclip": True}).use_iclip is True
    assert params_from_dict("kl_ref", {"estimator": "k1"}).estimator == "k1"


def test_coerce_keeps_values_of_other_annotations():
    # a union of several types, a list: the value is returned unchanged
    assert _coerce("x", "a", int | str) == "a"
    assert _coerce("x", 3, int | str) == 3
    assert _coerce("x", [1], list) == [1]
    assert _coerce("x", None, int | str | None) is None
    assert _coerce("x", "a", int | str | None) == "a"  # two types besides None: unchanged
    assert _coerce("x", 2.0, float | str | None) == 2.0 and type(_coerce("x", 2, float | str | None)) is int
    assert _coerce("x", 7, int | None) == 7
    assert _coerce("x", 7.0, int | None) == 7 and type(_coerce("x", 7.0, int | None)) is int
    with pytest.raises(ValueError, match=exact("x must be an integer, got 'a'")):
        _coerce("x", "a", int | None)


# ------------------------------------------------------------------------------------ MethodTerms


def _bool(shape):
    return torch.zeros(shape, dtype=torch.bool)


@pytest.mark.parametrize(
    "changes,msg",
    [
        ({"weight": torch.ones(2, 3, requires_grad=True)}, "MethodTerms.weight must carry no gradient (detach it)"),
        ({"touched": _bool((3, 2))}, "MethodTerms.touched must be a bool tensor shaped like weight"),
        ({"touched": torch.zeros(2, 3)}, "MethodTerms.touched must be a bool tensor shaped like weight"),
        ({"adv": torch.zeros(2, 2)}, "MethodTerms.adv has shape (2, 2), weight has (2, 3)"),
        ({"adv": torch.zeros(3)}, "MethodTerms.adv has shape (3,), weight has (2, 3)"),
        ({"eps_low": torch.full((3,), 0.2)}, "MethodTerms.eps_low has shape (3,), weight has (2, 3)"),
        ({"eps_high": torch.full((2, 1), 0.2)}, "MethodTerms.eps_high has shape (2, 1), weight has (2, 3)"),
        ({"ratio_level": "seq"}, "ratio_level must be one of token, sequence, got 'seq'"),
        ({"clip_mode": "gppo"}, "clip_mode must be one of standard, gradient_preserving, got 'gppo'"),
    ],
)
def test_method_terms_checks_give_their_message(changes, msg):
    kw = {"weight": torch.ones(2, 3), "touched": _bool((2, 3)), **changes}
    with pytest.raises(ValueError, match=exact(msg)):
        MethodTerms(**kw)


def test_method_terms_accepts_scalar_and_full_shape_bounds():
    w, t = torch.ones(2, 3), _bool((2, 3))
    for eps in (0.1, torch.tensor(0.1), torch.full((2, 3), 0.1)):
        terms = MethodTerms(weight=w, touched=t, eps_low=eps, eps_high=eps, adv=torch.zeros(2, 3))
        assert terms.eps_low is eps and terms.eps_high is eps
    plain = MethodTerms(weight=w, touched=t)
    assert (plain.eps_low, plain.eps_high, plain.dual_clip, plain.log_ratio_clamp) == (0.2, 0.2, 10.0, None)
    assert (plain.ratio_level, plain.clip_mode, plain.beta_low, plain.beta_high) == ("token", "standard", 1.0, 1.0)
    assert plain.adv is None and plain.penalty is None and plain.stats == {}
    seq = MethodTerms(weight=w, touched=t, ratio_level="sequence", clip_mode="gradient_preserving")
    assert (seq.ratio_level, seq.clip_mode) == ("sequence", "gradient_preserving")


def test_method_terms_rows_cut_every_per_token_tensor():
    B, T = 4, 5
    grid = torch.arange(B * T, dtype=torch.float32).reshape(B, T)
    touched = grid.long() % 3 == 0
    pen = Penalty(kind="kl_ref", coef=0.5, select=touched.clone(), ref_logp=-grid)
    terms = MethodTerms(weight=grid + 1, touched=touched, eps_low=grid / 100, eps_high=torch.tensor(0.3),
                        adv=-grid, penalty=pen, dual_clip=4.0, log_ratio_clamp=7.0, ratio_level="sequence",
                        clip_mode="gradient_preserving", beta_low=0.5, beta_high=0.25,
                        stats={"s": torch.tensor(2.0)})
    sub = terms.rows(slice(1, 3), 4)
    assert torch.equal(sub.weight, grid[1:3, :4] + 1)
    assert torch.equal(sub.touched, touched[1:3, :4])
    assert torch.equal(sub.eps_low, grid[1:3, :4] / 100)
    assert sub.eps_high.dim() == 0 and float(sub.eps_high) == pytest.approx(0.3)
    assert torch.equal(sub.adv, -grid[1:3, :4])
    assert torch.equal(sub.penalty.select, touched[1:3, :4])
    assert torch.equal(sub.penalty.ref_logp, -grid[1:3, :4])
    assert (sub.penalty.kind, sub.penalty.coef, sub.penalty.estimator) == ("kl_ref", 0.5, "k3")
    assert (sub.dual_clip, sub.log_ratio_clamp, sub.ratio_level, sub.clip_mode) == (
        4.0, 7.0, "sequence", "gradient_preserving")
    assert (sub.beta_low, sub.beta_high) == (0.5, 0.25) and sub.stats is terms.stats
    whole = terms.rows(slice(2, 4))  # width None: every position
    assert torch.equal(whole.weight, grid[2:4] + 1) and torch.equal(whole.penalty.ref_logp, -grid[2:4])
    bare = MethodTerms(weight=grid, touched=touched, eps_low=0.1).rows(slice(0, 1), 2)
    assert bare.penalty is None and bare.adv is None and bare.eps_low == 0.1
    assert torch.equal(bare.weight, grid[:1, :2])
    both = MethodTerms(weight=grid, touched=touched, eps_low=grid / 10, eps_high=grid / 20).rows(slice(1, 4), 2)
    assert torch.equal(both.eps_low, grid[1:4, :2] / 10) and torch.equal(both.eps_high, grid[1:4, :2] / 20)
    no_sel = MethodTerms(weight=grid, touched=touched, penalty=Penalty(kind="entropy_bonus", coef=0.1))
    assert no_sel.rows(slice(0, 2), 3).penalty.select is None


# ---------------------------------------------------------------------------------------- Penalty


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"kind": "l2", "coef": 1.0}, "penalty kind must be one of entropy_bonus, abs_logratio, kl_ref, got 'l2'"),
        ({"kind": "abs_logratio", "coef": 1.0, "estimator": "k2"}, "estimator must be one of k1, k3, got 'k2'"),
        ({"kind": "kl_ref", "coef": 1.0}, "the kl_ref penalty needs reference log-probs (ref_logp)"),
    ],
)
def test_penalty_checks_give_their_message(kw, msg):
    with pytest.raises(ValueError, match=exact(msg)):
        Penalty(**kw)


def _penalty_inputs():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    old = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    ent = torch.rand(2, 4, generator=g, dtype=torch.float64) * 2
    old[0, 1] = logp[0, 1]  # |log r| = 0 on one token: sign 0
    select = torch.tensor([[True, False, True, True], [False, True, True, False]])
    return logp, old, ref, ent, select


def _penalty_reference(kind, estimator, coef, logp, old, ref, ent, select):
    """Per-token penalty and ∂/∂log p, float64 Python loops."""
    val = torch.zeros(2, 4, dtype=torch.float64)
    grad = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(2):
        for t in range(4):
            lp, lo, lr, h = float(logp[b, t]), float(old[b, t]), float(ref[b, t]), float(ent[b, t])
            if kind == "entropy_bonus":
                v, d = -coef * h, 0.0
            elif kind == "abs_logratio":
                v, d = coef * abs(lp - lo), coef * ((lp > lo) - (lp < lo))
            elif estimator == "k1":
                v, d = coef * (lp - lr), coef
            else:
                x = lr - lp
                v, d = coef * (math.exp(x) - x - 1.0), coef * (1.0 - math.exp(x))
            s = 1.0 if select is None else float(select[b, t])
            val[b, t], grad[b, t] = v * s, d * s
    return val, grad


@pytest.mark.parametrize("use_select", [False, True])
@pytest.mark.parametrize("kind,estimator", [("entropy_bonus", "k3"), ("abs_logratio", "k3"), ("kl_ref", "k1"),
                                            ("kl_ref", "k3")])
def test_penalty_values_and_gradient_match_a_loop(kind, estimator, use_select):
    logp, old, ref, ent, select = _penalty_inputs()
    sel = select if use_select else None
    pen = Penalty(kind=kind, coef=0.7, select=sel, ref_logp=ref if kind == "kl_ref" else None, estimator=estimator)
    want_v, want_g = _penalty_reference(kind, estimator, 0.7, logp, old, ref, ent, sel)
    got = pen.per_token(logp, old, ent)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want_v, rtol=1e-12, atol=1e-14)
    assert pen.needs_entropy == (kind == "entropy_bonus")
    d = pen.dlogp(logp, old)
    if kind == "entropy_bonus":
        assert d is None
    else:
        torch.testing.assert_close(d, want_g, rtol=1e-12, atol=1e-14)
        x = logp.clone().requires_grad_(True)  # autograd agrees with the closed form (|x|' at 0 is 0)
        pen.per_token(x, old, ent).sum().backward()
        torch.testing.assert_close(x.grad, want_g, rtol=1e-12, atol=1e-14)


def test_penalty_keeps_the_log_prob_dtype_and_needs_entropy_for_the_bonus():
    logp, old, ref, _, select = _penalty_inputs()
    pen = Penalty(kind="kl_ref", coef=1.0, ref_logp=ref, select=select)  # float64 reference, default k3
    assert pen.estimator == "k3"
    out = pen.per_token(logp.float(), old.float())
    assert out.dtype == torch.float32
    assert pen.dlogp(logp.float(), old.float()).dtype == torch.float32
    k1 = Penalty(kind="kl_ref", coef=2.0, ref_logp=ref, estimator="k1")
    assert k1.dlogp(logp.float(), old.float()).dtype == torch.float32
    assert torch.equal(k1.dlogp(logp.float(), old.float()), torch.full((2, 4), 2.0))
    ab = Penalty(kind="abs_logratio", coef=1.5, select=select)
    assert ab.per_token(logp.float(), old.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=exact("the entropy_bonus penalty needs the current entropy tensor")):
        Penalty(kind="entropy_bonus", coef=0.1).per_token(logp, old)


def test_penalty_describe():
    sel = torch.tensor([[True, False, True], [True, True, False]])
    ref = torch.zeros(2, 3)
    d = Penalty(kind="kl_ref", coef=1, ref_logp=ref, estimator="k1").describe()
    assert d == {"kind": "kl_ref", "coef": 1.0, "n_selected": None, "estimator": "k1"}
    assert type(d["coef"]) is float
    d = Penalty(kind="kl_ref", coef=0.5, ref_logp=ref, select=sel).describe()
    assert d == {"kind": "kl_ref", "coef": 0.5, "n_selected": 4, "estimator": "k3"}
    assert type(d["n_selected"]) is int
    d = Penalty(kind="abs_logratio", coef=2, select=sel).describe()
    assert d == {"kind": "abs_logratio", "coef": 2.0, "n_selected": 4} and type(d["coef"]) is float
    assert Penalty(kind="entropy_bonus", coef=0.25).describe() == {
        "kind": "entropy_bonus", "coef": 0.25, "n_selected": None}


def test_kl_estimate_default_is_k3_and_checks_the_estimator():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    x = [float(r - p) for p, r in zip(logp, ref)]
    torch.testing.assert_close(kl_estimate(logp, ref), torch.tensor([math.exp(v) - v - 1 for v in x]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([-v for v in x]))
    with pytest.raises(ValueError, match=exact("estimator must be one of k1, k3, got 'k2'")):
        kl_estimate(logp, ref, "k2")


# --------------------------------------------------------------------------------- context, scopes


def test_make_context_defaults_and_seeded_generator():
    ctx = make_context()
    assert ctx.lr == 1e-6 and ctx.scope_index is None and ctx.mini_index is None
    assert ctx.generator.device == torch.device("cpu")
    assert torch.equal(torch.rand(5, generator=ctx.generator), torch.rand(5, generator=torch.Generator().manual_seed(0)))
    ctx = make_context(seed=7, lr=0.25)
    assert ctx.lr == 0.25
    assert torch.equal(torch.rand(5, generator=ctx.generator), torch.rand(5, generator=torch.Generator().manual_seed(7)))
    assert ctx.generator.initial_seed() == 7
    ctx = make_context(seed=3.0, device="cpu")  # a float seed is taken as the integer
    assert ctx.generator.initial_seed() == 3


def test_make_context_splits_consecutive_sequences():
    ctx = make_context(1, batch_size=7, micro_batch_size=2, mini_batch_size=3)
    assert ctx.scope_index.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert ctx.mini_index.tolist() == [0, 0, 0, 1, 1, 1, 2]
    one = make_context(1, batch_size=3, micro_batch_size=1)
    assert one.scope_index.tolist() == [0, 1, 2] and one.mini_index is None
    mini = make_context(1, batch_size=4, mini_batch_size=4)
    assert mini.scope_index is None and mini.mini_index.tolist() == [0, 0, 0, 0]
    assert make_context(1, batch_size=4).scope_index is None


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"micro_batch_size": 2}, "batch_size is needed to split the batch into micro-/mini-batches"),
        ({"mini_batch_size": 2}, "batch_size is needed to split the batch into micro-/mini-batches"),
        ({"batch_size": 4, "micro_batch_size": 0}, "micro/mini batch size must be >= 1, got 0"),
        ({"batch_size": 4, "mini_batch_size": -1}, "micro/mini batch size must be >= 1, got -1"),
    ],
)
def test_make_context_errors(kw, msg):
    with pytest.raises(ValueError, match=exact(msg)):
        make_context(0, **kw)


def test_scope_ids():
    gen = torch.Generator()
    ctx = MethodContext(generator=gen, scope_index=torch.tensor([5, 5, 2, 9]), mini_index=torch.tensor([1, 1, 1, 0]))
    ids = ctx.scope_ids("micro", 4)
    assert ids.dtype == torch.long and ids.tolist() == [1, 1, 0, 2]
    assert ctx.scope_ids("mini", 4).tolist() == [1, 1, 1, 0]
    b = ctx.scope_ids("batch", 4)
    assert b.dtype == torch.long and b.tolist() == [0, 0, 0, 0]
    bare = MethodContext(generator=gen)
    assert bare.lr == 1e-6
    assert bare.scope_ids("micro", 3).tolist() == [0, 0, 0] and bare.scope_ids("mini", 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match=exact("micro scope index has shape (4,), expected (3,)")):
        ctx.scope_ids("micro", 3)
    with pytest.raises(ValueError, match=exact("mini scope index has shape (4,), expected (5,)")):
        ctx.scope_ids("mini", 5)
    with pytest.raises(ValueError, match=exact("scope must be one of micro, mini, batch, got 'node'")):
        ctx.scope_ids("node", 4)


# --------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _P(ClipParams):
    pass


@dataclass
class _Mutable:
    x: float = 1.0


@pytest.mark.parametrize(
    "name,kw,msg",
    [
        ("Bad", {}, "method name must be snake_case, got 'Bad'"),
        ("1abc", {}, "method name must be snake_case, got '1abc'"),
        ("_abc", {}, "method name must be snake_case, got '_abc'"),
        ("a-b", {}, "method name must be snake_case, got 'a-b'"),
        ("", {}, "method name must be snake_case, got ''"),
        ("ab\n", {}, "method name must be snake_case, got 'ab\\n'"),
        ("grpo", {}, "method 'grpo' is already registered"),
        ("tmp_k_x", {"factors": ("clip", "temperature", "x")},
         "unknown factor(s) 'temperature', 'x'; valid: clip, advantage, probability, entropy"),
        ("tmp_k_x", {"params": _Mutable}, "params of method 'tmp_k_x' must be a frozen dataclass"),
        ("tmp_k_x", {"params": dict}, "params of method 'tmp_k_x' must be a frozen dataclass"),
        ("tmp_k_x", {"summary": ""}, "summary must be one non-empty line"),
        ("tmp_k_x", {"summary": "two\nlines"}, "summary must be one non-empty line"),
        ("tmp_k_x", {"needs": ("reward", "value_head", "x")},
         f"unknown input(s) 'value_head', 'x' in needs; valid: {', '.join(INPUTS)}"),
    ],
)
def test_register_method_checks_give_their_message(name, kw, msg):
    args = {"summary": "s", "params": _P, **kw}
    with pytest.raises(ValueError, match=exact(msg)):
        register_method(name, **args)
    assert "tmp_k_x" not in list_methods()


def test_register_method_records_the_spec():
    def fn(batch, params, ctx):
        return "called"

    try:
        assert register_method("tmp_k_a1_", summary="one line", factors=["clip", "entropy"], params=_P,
                               needs=["reward", "ref_logp"])(fn) is fn
        spec = get_method("tmp_k_a1_")
        assert (spec.name, spec.fn, spec.summary, spec.params) == ("tmp_k_a1_", fn, "one line", _P)
        assert spec.factors == ("clip", "entropy") and spec.needs == ("reward", "ref_logp")
        assert list_methods()[-1] == "tmp_k_a1_"
        assert spec(None, _P(), None) == "called"
        with pytest.raises(TypeError, match=exact("tmp_k_a1_ expects _P, got ClipParams")):
            spec(None, ClipParams(), None)
        register_method("tmp_k_b", summary="b", params=_P)(fn)
        b = get_method("tmp_k_b")
        assert b.factors == () and b.needs == () and b.required_inputs() == ()
    finally:
        unregister_method("tmp_k_a1_")
        unregister_method("tmp_k_b")
    unregister_method("tmp_k_never_registered")  # not an error
    assert "tmp_k_a1_" not in list_methods() and "tmp_k_b" not in list_methods()


def test_registry_lookups_and_their_messages():
    names = list_methods()
    assert names[:3] == ["grpo", "clip_higher", "entropy_bonus"]
    with pytest.raises(ValueError, match=exact(f"unknown method 'ppo_magic'; available: {', '.join(names)}")):
        get_method("ppo_magic")
    valid = [k for k, _ in params_table("fork_tokens")]
    assert valid == ["eps_low", "eps_high", "dual_clip", "log_ratio_clamp", "rho", "scope"]
    with pytest.raises(ValueError, match=exact(
            f"fork_tokens: unknown parameter(s) a, zz; valid keys: {', '.join(valid)}")):
        params_from_dict("fork_tokens", {"zz": 1, "rho": 0.5, "a": 2})
    with pytest.raises(TypeError, match=exact("steer expects SteerParams, got GrpoParams")):
        get_method("steer")(None, params_from_dict("grpo"), make_context())
    assert params_table("fork_tokens") == [("eps_low", 0.2), ("eps_high", 0.2), ("dual_clip", 10.0),
                                           ("log_ratio_clamp", 20.0), ("rho", 0.2), ("scope", "micro")]
    assert get_method("kl_cov").default_params() == params_from_dict("kl_cov")
    assert params_from_dict("kl_cov", None) == params_from_dict("kl_cov", {})


def test_required_and_missing_inputs():
    kl, wr = get_method("kl_ref"), get_method("w_reinforce")
    assert kl.required_inputs() == ("ref_logp",) and kl.required_inputs(kl.default_params()) == ("ref_logp",)
    assert wr.required_inputs(params_from_dict("w_reinforce", {"advantage": "grpo"})) == ()
    assert wr.required_inputs(None) == ("reward",)
    b = _small_batch()
    assert kl.missing_inputs(b) == () and kl.missing_inputs(b.replace(ref_logp=None)) == ("ref_logp",)
    assert wr.missing_inputs(b.replace(ref_logp=None)) == ()  # a reward is always present
    assert get_method("grpo").missing_inputs(b.replace(ref_logp=None)) == ()


# ---------------------------------------------------------------------------------- test batch


def _small_batch(seed=0, B=4, T=5, lengths=(5, 3, 4, 2), off_policy=0.5, reward=(1.0, 0.0, 0.8, 0.2),
                 adv=(0.7, -0.7, 0.3, -0.3)):
    """A float32 batch whose padding holds values that would change every result if they leaked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    logp = -torch.rand(B, T, generator=g) * 3.0
    old = logp + off_policy * torch.randn(B, T, generator=g)
    ent = torch.rand(B, T, generator=g) * 2.0 + 0.05
    a = torch.tensor(adv)[:, None].expand(B, T).clone()
    pad = ~mask
    return TokenBatch(
        token_ids=torch.randint(0, 9, (B, T), generator=g),
        mask=mask,
        logp=torch.where(pad, -30.0, logp),
        old_logp=torch.where(pad, 4.0, old),
        entropy=torch.where(pad, 9.0, ent),
        sum_p2=torch.full((B, T), 0.5),
        sum_p2_logp=torch.full((B, T), -0.5),
        adv=torch.where(pad, 50.0, a),
        group_id=torch.arange(B) // 2,
        reward=torch.tensor(reward),
        ref_logp=torch.where(pad, 7.0, logp + 0.3 * torch.randn(B, T, generator=g)),
    )


def _f(t) -> list:
    """A tensor as nested Python floats (the references below compute in Python float64)."""
    return t.double().tolist()


def _iclip(r: float, a: float, el: float, eh: float, c: float | None) -> bool:
    """I_clip of one token (docs/science.md §1.1), Python floats."""
    dead = (a > 0 and r > 1 + eh) or (a < 0 and r < 1 - el) or (c is not None and a < 0 and r > c)
    return not dead


def _ratio(batch, b, t) -> float:
    return math.exp(float(batch.logp[b, t]) - float(batch.old_logp[b, t]))


def _clip_changed(batch, adv, el, eh, c) -> torch.Tensor:
    """Valid tokens whose I_clip under (adv, bounds) differs from GRPO's (0.2, 0.2, 10)."""
    B, T = batch.mask.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            if batch.mask[b, t]:
                r = _ratio(batch, b, t)
                out[b, t] = _iclip(r, float(adv[b, t]), el, eh, c) != _iclip(r, float(batch.adv[b, t]), 0.2, 0.2, 10.0)
    return out


def _valid_mean(values, mask) -> float:
    vals = [float(values[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    return sum(vals) / max(len(vals), 1)


def _clip_batch(seed=1):
    """A batch with tokens in every clip zone (ratios 0.5 ... 2, both advantage signs, A = 0)."""
    B, T = 4, 6
    mask = torch.arange(T)[None, :] < torch.tensor([6, 4, 5, 3])[:, None]
    # no ratio within 1 % of a clip bound any test uses (0.65, 0.7, 0.75, 0.8, 1.1, 1.2, 1.25, 1.3, 1.5, 1.6, 10)
    log_r = torch.log(torch.tensor([[0.5, 0.77, 0.86, 1.0, 1.27, 2.03],
                                    [0.68, 1.12, 1.22, 1.33, 9.0, 9.0],
                                    [0.73, 0.82, 1.18, 1.28, 12.5, 9.0],
                                    [1.55, 0.61, 11.3, 9.0, 9.0, 9.0]]))
    adv = torch.tensor([0.8, -0.6, -0.4, 0.0])[:, None].expand(B, T).clone()
    base = _small_batch(seed, B=B, T=T, lengths=(6, 4, 5, 3), reward=(1.0, 0.0, 0.6, 0.4),
                        adv=(0.8, -0.6, -0.4, 0.0))
    return base.replace(old_logp=torch.where(mask, base.logp - log_r, base.old_logp), adv=torch.where(mask, adv, 50.0))


# ---------------------------------------------------------------------------------- one objective


def _surrogate(lp, lo, a, el, eh, c, kappa, mode, bl, bh, seq_lr=None) -> float:
    """Per-token loss of clipped_surrogate, Python floats; ``seq_lr``: the sequence's mean log r."""
    lr = lp - lo if seq_lr is None else seq_lr
    if kappa is not None:
        lr = min(max(lr, -kappa), kappa)
    r = math.exp(lr)
    lo_b, hi_b = 1 - el, 1 + eh
    if mode == "standard":
        v = max(-a * r, -a * min(max(r, lo_b), hi_b))
    elif a > 0 and r > hi_b:
        v = -a * bh * hi_b
    elif a < 0 and r < lo_b:
        v = -a * bl * lo_b
    else:
        v = -a * r
    if c is not None and a < 0:
        v = min(v, -a * c)
    return v


def _per_token_reference(terms, batch, entropy, level="token"):
    B, T = batch.mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    adv = terms.adv if terms.adv is not None else batch.adv
    for b in range(B):
        valid = [t for t in range(T) if batch.mask[b, t]]
        seq = (sum(float(batch.logp[b, t] - batch.old_logp[b, t]) for t in valid) / max(len(valid), 1)
               if level == "sequence" else None)
        for t in valid:
            el = float(terms.eps_low[b, t]) if isinstance(terms.eps_low, torch.Tensor) else terms.eps_low
            eh = float(terms.eps_high[b, t]) if isinstance(terms.eps_high, torch.Tensor) else terms.eps_high
            v = float(terms.weight[b, t]) * _surrogate(
                float(batch.logp[b, t]), float(batch.old_logp[b, t]), float(adv[b, t]), el, eh, terms.dual_clip,
                terms.log_ratio_clamp, terms.clip_mode, terms.beta_low, terms.beta_high, seq)
            p = terms.penalty
            if p is not None:
                s = 1.0 if p.select is None else float(p.select[b, t])
                lp, lo = float(batch.logp[b, t]), float(batch.old_logp[b, t])
                if p.kind == "entropy_bonus":
                    v += -p.coef * float(entropy[b, t]) * s
                elif p.kind == "abs_logratio":
                    v += p.coef * abs(lp - lo) * s
                else:
                    x = float(p.ref_logp[b, t]) - lp
                    v += p.coef * ((-x) if p.estimator == "k1" else math.exp(x) - x - 1.0) * s
            out[b, t] = v
    return out


def _terms_cases(batch):
    B, T = batch.mask.shape
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).to(batch.logp.dtype)
    eps = torch.rand(B, T, generator=g, dtype=torch.float64).to(batch.logp.dtype) * 0.3
    adv2 = torch.randn(B, T, generator=g, dtype=torch.float64).to(batch.logp.dtype)
    sel = torch.rand(B, T, generator=g) > 0.4
    touched = torch.zeros(B, T, dtype=torch.bool)
    return {
        "weights": MethodTerms(weight=w, touched=touched),
        "adv-override-tensor-eps": MethodTerms(weight=w, touched=touched, adv=adv2, eps_low=eps, eps_high=0.1,
                                               dual_clip=None),
        "clamp-dual-abs-penalty": MethodTerms(weight=w, touched=touched, log_ratio_clamp=0.2, dual_clip=1.5,
                                              penalty=Penalty(kind="abs_logratio", coef=0.3, select=sel)),
        "entropy-penalty": MethodTerms(weight=w, touched=touched, penalty=Penalty(kind="entropy_bonus", coef=0.05)),
        "kl-penalty": MethodTerms(weight=w, touched=touched, eps_high=eps,
                                  penalty=Penalty(kind="kl_ref", coef=0.2, ref_logp=batch.ref_logp, estimator="k1")),
        "gradient-preserving": MethodTerms(weight=w, touched=touched, clip_mode="gradient_preserving",
                                           beta_low=0.5, beta_high=0.25, dual_clip=None),
        "gradient-preserving-dual": MethodTerms(weight=w, touched=touched, clip_mode="gradient_preserving",
                                                beta_low=1.5, beta_high=2.0, dual_clip=1.2),
        "sequence": MethodTerms(weight=w, touched=touched, ratio_level="sequence", eps_low=0.01, eps_high=0.02),
    }


@pytest.mark.parametrize("case", list(_terms_cases(_clip_batch())))
def test_method_per_token_loss_matches_a_loop(case):
    batch = _clip_batch()
    batch = batch.replace(**{k: getattr(batch, k).double() for k in ("logp", "old_logp", "entropy", "adv",
                                                                     "ref_logp")})
    terms = _terms_cases(batch)[case]
    ent = batch.entropy
    got = method_per_token_loss(terms, batch.logp, batch.old_logp, batch.adv, batch.mask, ent)
    want = _per_token_reference(terms, batch, ent, terms.ratio_level)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    n = int(batch.mask.sum())
    loss = method_loss(terms, batch.logp, batch.old_logp, batch.adv, batch.mask, ent)  # token-mean by default
    assert float(loss) == pytest.approx(float(want.sum()) / n, rel=1e-10, abs=1e-12)
    dr = method_loss(terms, batch.logp, batch.old_logp, batch.adv, batch.mask, ent, "seq-mean-token-sum-norm", 9)
    assert float(dr) == pytest.approx(float(want.sum()) / (batch.mask.shape[0] * 9), rel=1e-10, abs=1e-12)


def test_method_per_token_loss_follows_the_log_prob_dtype():
    batch = _clip_batch()
    terms = MethodTerms(weight=torch.full(batch.mask.shape, 0.5, dtype=torch.float64),
                        touched=torch.zeros(batch.mask.shape, dtype=torch.bool))
    out = method_per_token_loss(terms, batch.logp, batch.old_logp, batch.adv, batch.mask)
    assert out.dtype == torch.float32
    assert torch.all(out[~batch.mask] == 0)
    assert method_loss(terms, batch.logp, batch.old_logp, batch.adv, batch.mask).dtype == torch.float32


# ------------------------------------------------------------------------- each method's terms


def _assert_clip_fields(terms, p):
    assert (terms.eps_low, terms.eps_high, terms.dual_clip, terms.log_ratio_clamp) == (
        p.eps_low, p.eps_high, p.dual_clip, p.log_ratio_clamp)


def _stat(terms, key) -> float:
    v = terms.stats[key]
    assert isinstance(v, torch.Tensor) and v.numel() == 1, key
    return float(v)


@pytest.mark.parametrize("values", [{}, {"eps_low": 0.3, "eps_high": 0.25, "dual_clip": 1.6, "log_ratio_clamp": 5.0},
                                    {"eps_high": 0.1, "dual_clip": None, "log_ratio_clamp": None}])
@pytest.mark.parametrize("name", ["grpo", "clip_higher"])
def test_plain_clip_methods(name, values):
    batch = _clip_batch()
    p = params_from_dict(name, values)
    terms = apply_method(name, batch, p)
    _assert_clip_fields(terms, p)
    assert terms.weight.dtype == torch.float32 and torch.all(terms.weight == 1) and not terms.weight.requires_grad
    assert terms.adv is None and terms.penalty is None
    assert (terms.ratio_level, terms.clip_mode, terms.beta_low, terms.beta_high) == ("token", "standard", 1.0, 1.0)
    want = _clip_changed(batch, batch.adv, p.eps_low, p.eps_high, p.dual_clip)
    assert torch.equal(terms.touched, want)
    if name == "clip_higher":
        assert _stat(terms, "frac_touched") == pytest.approx(_valid_mean(want.float(), batch.mask))
    else:
        assert terms.stats == {}
    if values:
        assert want.any()


@pytest.mark.parametrize("beta", [0.0, 0.02])
def test_entropy_bonus_terms(beta):
    batch = _clip_batch()
    terms = apply_method("entropy_bonus", batch, {"beta": beta, "eps_high": 0.3})
    clip = _clip_changed(batch, batch.adv, 0.2, 0.3, 10.0)
    assert clip.any()
    assert torch.equal(terms.touched, clip | batch.mask if beta > 0 else clip)
    assert (terms.penalty.kind, terms.penalty.coef, terms.penalty.select) == ("entropy_bonus", beta, None)
    assert _stat(terms, "entropy_mean") == pytest.approx(_valid_mean(batch.entropy, batch.mask), rel=1e-6)
    assert terms.adv is None and torch.all(terms.weight == 1) and terms.eps_high == 0.3


def _top_per_scope(score, eligible, seq_scope, counts):
    """Reference of select_top_per_scope: per scope, sort (−score, position) and take counts[s]."""
    B, T = eligible.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for s in range(len(counts)):
        cand = [(-float(score[b, t]), b, t) for b in range(B) for t in range(T)
                if eligible[b, t] and int(seq_scope[b]) == s]
        for _, b, t in sorted(cand)[: int(counts[s])]:
            out[b, t] = True
    return out


def _scope_lists(mask, seq_scope):
    S = int(seq_scope.max()) + 1
    return [int(sum(int(mask[b].sum()) for b in range(mask.shape[0]) if int(seq_scope[b]) == s)) for s in range(S)]


@pytest.mark.parametrize("rho,scope,micro", [(0.2, "micro", 2), (0.5, "batch", None), (1.0, "micro", 1),
                                             (0.34, "mini", None), (1e-9, "batch", None)])
def test_fork_tokens_terms(rho, scope, micro):
    batch = _small_batch(seed=4, B=6, T=5, lengths=(5, 3, 4, 2, 1, 5), reward=(1.0,) * 6, adv=(0.5, -0.5) * 3)
    B = 6
    ctx = make_context(0, batch_size=B, micro_batch_size=micro, mini_batch_size=3)
    terms = apply_method("fork_tokens", batch, {"rho": rho, "scope": scope}, ctx)
    seq_scope = ctx.scope_ids(scope, B)
    counts = [min(n, math.ceil(rho * n - 1e-9)) for n in _scope_lists(batch.mask, seq_scope)]
    keep = _top_per_scope(batch.entropy, batch.mask, seq_scope, counts)
    assert torch.equal(terms.weight, torch.where(batch.mask & ~keep, 0.0, 1.0))
    assert terms.weight.dtype == torch.float32
    assert torch.equal(terms.touched, batch.mask & ~keep | _clip_changed(batch, batch.adv, 0.2, 0.2, 10.0))
    assert _stat(terms, "frac_kept") == pytest.approx(_valid_mean(keep.float(), batch.mask))
    assert int(terms.stats["n_kept"]) == int(keep.sum()) == sum(counts)


def test_fork_tokens_ceil_of_an_exact_product():
    # 0.3 · 10 = 3.0000000000000004 in binary: the slack keeps ⌈·⌉ at 3
    batch = _small_batch(seed=5, B=2, T=5, lengths=(5, 5), reward=(1.0, 0.0), adv=(0.5, -0.5))
    terms = apply_method("fork_tokens", batch, {"rho": 0.3, "scope": "batch"})
    assert int(terms.stats["n_kept"]) == 3


@pytest.mark.parametrize("lam,threshold", [(0.1, 0.5), (0.0, 0.5), (2.0, 0.8), (0.1, 0.2)])
def test_w_reinforce_raw_terms(lam, threshold):
    batch = _clip_batch()  # rewards 1.0, 0.0, 0.6, 0.4
    p = params_from_dict("w_reinforce", {"lam": lam, "threshold": threshold})
    terms = apply_method("w_reinforce", batch, p)
    B, T = batch.mask.shape
    want = torch.tensor([[(lam if float(batch.reward[b]) > threshold else -1.0) if batch.mask[b, t] else 0.0
                          for t in range(T)] for b in range(B)])
    assert terms.adv.dtype == batch.adv.dtype and torch.equal(terms.adv, want)
    assert torch.all(terms.weight == 1)
    changed = batch.mask & (want != batch.adv)
    assert torch.equal(terms.touched, changed | _clip_changed(batch, want, 0.2, 0.2, 10.0))
    correct = batch.mask & (batch.reward > threshold)[:, None]
    assert _stat(terms, "frac_correct") == pytest.approx(_valid_mean(correct.float(), batch.mask))


def test_w_reinforce_raw_advantage_follows_the_batch_dtype():
    batch = _clip_batch()
    batch = batch.replace(adv=batch.adv.double())
    terms = apply_method("w_reinforce", batch)
    assert terms.adv.dtype == torch.float64


@pytest.mark.parametrize("lam", [0.1, 1.0, 3.0])
def test_w_reinforce_grpo_terms(lam):
    batch = _clip_batch()
    terms = apply_method("w_reinforce", batch, {"lam": lam, "advantage": "grpo", "eps_low": 0.35})
    pos = batch.mask & (batch.adv > 0)
    assert terms.adv is None
    assert torch.equal(terms.weight, torch.where(pos, lam, 1.0).float())
    clip = _clip_changed(batch, batch.adv, 0.35, 0.2, 10.0)
    assert clip.any()
    assert torch.equal(terms.touched, clip | (pos if lam != 1.0 else torch.zeros_like(pos)))
    assert _stat(terms, "frac_positive") == pytest.approx(_valid_mean(pos.float(), batch.mask))


@pytest.mark.parametrize("alpha,kappa", [(0.4, 2.0), (0.0, 2.0), (5.0, 0.5), (0.1, 100.0)])
def test_entropy_adv_terms(alpha, kappa):
    batch = _clip_batch()
    terms = apply_method("entropy_adv", batch, {"alpha": alpha, "kappa": kappa})
    B, T = batch.mask.shape
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            a = float(batch.adv[b, t])
            want[b, t] = a + min(alpha * float(batch.entropy[b, t]), abs(a) / kappa) if batch.mask[b, t] else a
    torch.testing.assert_close(terms.adv.double(), want, rtol=1e-6, atol=1e-7)
    assert not terms.adv.requires_grad
    shifted = batch.mask & (terms.adv != batch.adv)
    assert torch.equal(terms.touched, shifted | _clip_changed(batch, terms.adv, 0.2, 0.2, 10.0))
    assert bool(shifted.any()) == (alpha > 0)
    assert _stat(terms, "adv_shift_mean") == pytest.approx(_valid_mean(want - batch.adv.double(), batch.mask),
                                                           rel=1e-5, abs=1e-7)


def _scoped_c(batch, seq_scope):
    """c = (log p − mean log p)(A − mean A) with means over each scope's valid tokens, Python floats."""
    B, T = batch.mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for s in range(int(seq_scope.max()) + 1):
        cells = [(b, t) for b in range(B) for t in range(T) if batch.mask[b, t] and int(seq_scope[b]) == s]
        n = max(len(cells), 1)
        lp = sum(float(batch.logp[b, t]) for b, t in cells) / n
        am = sum(float(batch.adv[b, t]) for b, t in cells) / n
        for b, t in cells:
            out[b, t] = (float(batch.logp[b, t]) - lp) * (float(batch.adv[b, t]) - am)
    return out


def _cov_batch():
    b = _small_batch(seed=6, B=6, T=6, lengths=(6, 4, 5, 3, 6, 2), reward=(1.0, 0.0) * 3,
                     adv=(1.2, -0.9, 0.4, -0.3, 2.0, -1.5), off_policy=0.4)
    return b


def _cov_run(name, values, micro, seed, fraction):
    """Method ``name`` on :func:`_cov_batch` in a context seeded ``seed`` (mini-batches of 4, micro
    ``micro``): ``(batch, ctx, params, terms, seq_scope, c, counts)`` with the reference covariance
    ``c`` and each scope's selection count from ``fraction`` (clip_ratio or k) and ``min_select``."""
    batch = _cov_batch()
    B = batch.mask.shape[0]
    ctx = make_context(seed, batch_size=B, micro_batch_size=micro, mini_batch_size=4)
    p = params_from_dict(name, values)
    terms = apply_method(name, batch, p, ctx)
    seq_scope = ctx.scope_ids(p.scope, B)
    c = _scoped_c(batch, seq_scope)
    f = getattr(p, fraction)
    counts = [min(n, max(p.min_select, math.floor(f * n + 1e-9))) for n in _scope_lists(batch.mask, seq_scope)]
    return batch, ctx, p, terms, seq_scope, c, counts


@pytest.mark.parametrize(
    "values,micro",
    [
        ({"clip_ratio": 0.3, "lb": -0.4, "ub": 0.4, "scope": "batch"}, None),
        ({"clip_ratio": 0.3, "lb": -0.4, "ub": 0.4, "scope": "micro", "eps_high": 0.3}, 2),
        ({"clip_ratio": 0.01, "lb": 0.05, "ub": 1.5, "scope": "mini", "min_select": 2}, None),
        ({"clip_ratio": 0.01, "lb": 0.05, "ub": 1.5, "scope": "batch", "min_select": 0}, None),
        ({"clip_ratio": 1.0, "lb": -10.0, "ub": 10.0, "scope": "micro", "dual_clip": None}, 3),
        ({"clip_ratio": 0.5, "lb": 0.0, "ub": 0.3, "scope": "batch"}, None),
    ],
)
def test_clip_cov_terms(values, micro):
    batch, ctx, p, terms, seq_scope, c, counts = _cov_run("clip_cov", values, micro, 11, "clip_ratio")
    B, T = batch.mask.shape
    eligible = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            eligible[b, t] = bool(batch.mask[b, t]) and p.lb < float(c[b, t]) < p.ub and _iclip(
                _ratio(batch, b, t), float(batch.adv[b, t]), p.eps_low, p.eps_high, p.dual_clip)
    keys = torch.rand(B, T, generator=torch.Generator().manual_seed(11))
    chosen = _top_per_scope(keys, eligible, seq_scope, counts)
    assert chosen.any() or p.min_select == 0
    assert torch.equal(terms.weight, torch.where(chosen, 0.0, 1.0)) and terms.weight.dtype == torch.float32
    assert torch.equal(terms.touched, chosen | _clip_changed(batch, batch.adv, p.eps_low, p.eps_high, p.dual_clip))
    assert int(terms.stats["n_selected"]) == int(chosen.sum())
    assert int(terms.stats["n_eligible"]) == int(eligible.sum())
    assert _stat(terms, "cov_mean") == pytest.approx(_valid_mean(c, batch.mask), rel=1e-5, abs=1e-7)
    _assert_clip_fields(terms, p)
    # the generator advanced by exactly one [B, T] draw
    nxt = torch.Generator().manual_seed(11)
    torch.rand(B, T, generator=nxt)
    assert torch.equal(torch.rand(3, generator=ctx.generator), torch.rand(3, generator=nxt))


@pytest.mark.parametrize(
    "values,micro",
    [
        ({"k": 0.2, "scope": "batch"}, None),
        ({"k": 0.2, "scope": "micro", "beta": 0.5}, 2),
        ({"k": 0.01, "scope": "mini", "min_select": 2}, None),
        ({"k": 0.01, "scope": "batch", "min_select": 0, "beta": 2.0}, None),
        ({"k": 0.25, "scope": "micro", "beta": 0.0, "eps_low": 0.2, "eps_high": 0.2, "dual_clip": 3.0}, 3),
    ],
)
def test_kl_cov_terms(values, micro):
    batch, ctx, p, terms, seq_scope, c, counts = _cov_run("kl_cov", values, micro, 2, "k")
    chosen = _top_per_scope(c, batch.mask, seq_scope, counts)
    assert chosen.any() or p.min_select == 0
    pen = terms.penalty
    assert (pen.kind, pen.coef, pen.ref_logp) == ("abs_logratio", p.beta, None) and torch.equal(pen.select, chosen)
    clip = _clip_changed(batch, batch.adv, p.eps_low, p.eps_high, p.dual_clip)
    assert torch.equal(terms.touched, clip | chosen if p.beta > 0 else clip)
    assert torch.all(terms.weight == 1) and terms.adv is None
    assert int(terms.stats["n_selected"]) == int(chosen.sum())
    assert _stat(terms, "abs_logratio_mean_selected") == pytest.approx(
        _valid_mean((batch.logp - batch.old_logp).abs(), chosen), rel=1e-6)
    _assert_clip_fields(terms, p)


@pytest.mark.parametrize("beta,estimator", [(0.001, "k3"), (0.5, "k1"), (0.0, "k3")])
def test_kl_ref_terms(beta, estimator):
    batch = _clip_batch()
    terms = apply_method("kl_ref", batch, {"beta": beta, "estimator": estimator, "eps_high": 0.3})
    pen = terms.penalty
    assert (pen.kind, pen.coef, pen.estimator, pen.select) == ("kl_ref", beta, estimator, None)
    assert torch.equal(pen.ref_logp, batch.ref_logp) and not pen.ref_logp.requires_grad
    clip = _clip_changed(batch, batch.adv, 0.2, 0.3, 10.0)
    assert clip.any()
    assert torch.equal(terms.touched, clip | batch.mask if beta > 0 else clip)
    B, T = batch.mask.shape
    kl = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            x = float(batch.ref_logp[b, t] - batch.logp[b, t])
            kl[b, t] = -x if estimator == "k1" else math.exp(x) - x - 1.0
    assert _stat(terms, "kl_mean") == pytest.approx(_valid_mean(kl, batch.mask), rel=1e-5)


def test_kl_ref_without_reference_log_probs():
    batch = _clip_batch().replace(ref_logp=None)
    with pytest.raises(ValueError, match=exact(
            "kl_ref needs reference log-probs (ref_logp): set TokenBatch.ref_logp to log pi_ref of the sampled tokens")):
        apply_method("kl_ref", batch)


@pytest.mark.parametrize(
    "values",
    [{}, {"target": 2.0, "gain": 0.05, "beta_max": 0.5}, {"target": 0.5, "gain": 0.2, "beta0": 0.001, "beta_max": 0.05},
     {"target": 5.0, "gain": 10.0, "beta_max": 0.03}, {"target": 0.0, "beta0": 0.004, "gain": 0.001}],
)
def test_adaptive_entropy_terms(values):
    batch = _clip_batch()
    p = params_from_dict("adaptive_entropy", values)
    terms = apply_method("adaptive_entropy", batch, p)
    h = _valid_mean(batch.entropy, batch.mask)
    beta = min(max(p.beta0 + p.gain * (p.target - h), 0.0), p.beta_max)
    pen = terms.penalty
    assert pen.kind == "entropy_bonus" and pen.select is None and isinstance(pen.coef, float)
    assert pen.coef == pytest.approx(beta, rel=1e-5, abs=1e-12)
    assert _stat(terms, "beta") == pytest.approx(beta, rel=1e-5, abs=1e-12)
    assert _stat(terms, "entropy_mean") == pytest.approx(h, rel=1e-6)
    clip = _clip_changed(batch, batch.adv, 0.2, 0.2, 10.0)
    assert torch.equal(terms.touched, clip | batch.mask if beta > 0 else clip)
    if values.get("gain") == 10.0:
        assert pen.coef == 0.03  # capped at beta_max


@pytest.mark.parametrize("values", [{}, {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0},
                                    {"eps_low": 0.05, "eps_high": 0.1, "dual_clip": 1.5, "log_ratio_clamp": None}])
def test_gspo_terms(values):
    batch = _clip_batch()
    p = params_from_dict("gspo", values)
    terms = apply_method("gspo", batch, p)
    assert terms.ratio_level == "sequence" and terms.clip_mode == "standard"
    _assert_clip_fields(terms, p)
    B, T = batch.mask.shape
    touched = torch.zeros(B, T, dtype=torch.bool)
    seq_ratio = torch.ones(B, T, dtype=torch.float64)
    clipped = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        valid = [t for t in range(T) if batch.mask[b, t]]
        log_s = sum(float(batch.logp[b, t] - batch.old_logp[b, t]) for t in valid) / len(valid)
        for t in valid:
            a = float(batch.adv[b, t])
            log_r = float(batch.logp[b, t] - batch.old_logp[b, t])
            mine = _iclip(math.exp(log_s), a, p.eps_low, p.eps_high, p.dual_clip)
            tok = _iclip(math.exp(log_r), a, p.eps_low, p.eps_high, p.dual_clip)
            grpo_tok = _iclip(math.exp(log_r), a, 0.2, 0.2, 10.0)
            touched[b, t] = abs(log_s - log_r) > 1e-6 or mine != tok or tok != grpo_tok
            seq_ratio[b, t] = math.exp(log_s)
            clipped[b, t] = float(not mine)
    assert torch.equal(terms.touched, touched)
    assert _stat(terms, "seq_ratio_mean") == pytest.approx(_valid_mean(seq_ratio, batch.mask), rel=1e-5)
    assert _stat(terms, "frac_seq_clipped") == pytest.approx(_valid_mean(clipped, batch.mask))
    if values.get("eps_low") == 0.05:
        assert 0 < _stat(terms, "frac_seq_clipped") < 1


def test_gspo_one_token_sequences_on_policy_are_untouched():
    batch = _small_batch(seed=8, B=2, T=3, lengths=(1, 1), off_policy=0.0, reward=(1.0, 0.0), adv=(0.5, -0.5))
    terms = apply_method("gspo", batch, {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0})
    assert not terms.touched.any()
    assert _stat(terms, "seq_ratio_mean") == 1.0 and _stat(terms, "frac_seq_clipped") == 0.0


@pytest.mark.parametrize("beta_low,beta_high", [(1.0, 1.0), (0.0, 0.5), (0.5, 0.0), (0.0, 0.0)])
def test_gppo_terms(beta_low, beta_high):
    batch = _clip_batch()
    p = params_from_dict("gppo", {"beta_low": beta_low, "beta_high": beta_high, "eps_high": 0.25})
    terms = apply_method("gppo", batch, p)
    assert (terms.clip_mode, terms.beta_low, terms.beta_high, terms.ratio_level) == (
        "gradient_preserving", beta_low, beta_high, "token")
    r, a = batch.ratio, batch.adv
    up = batch.mask & (a > 0) & (r > 1.25)
    down = batch.mask & (a < 0) & (r < 0.8)
    assert up.any() and down.any()
    revived = (up if beta_high > 0 else torch.zeros_like(up)) | (down if beta_low > 0 else torch.zeros_like(down))
    clip = _clip_changed(batch, a, 0.2, 0.25, 10.0)
    assert torch.equal(terms.touched, revived | clip)
    assert _stat(terms, "frac_revived") == pytest.approx(_valid_mean(revived.float(), batch.mask))
    _assert_clip_fields(terms, p)


# ------------------------------------------------------------------------------ psr_only, nsr_only


@pytest.mark.parametrize("threshold", [0.5, 0.7, -1.0])
@pytest.mark.parametrize("name", ["psr_only", "nsr_only"])
def test_polarity_terms(name, threshold):
    batch = _clip_batch()  # rewards 1.0, 0.0, 0.6, 0.4; advantages 0.8, −0.6, −0.4, 0
    batch = batch.replace(adv=batch.adv.double())
    p = params_from_dict(name, {"threshold": threshold, "eps_low": 0.25})
    terms = apply_method(name, batch, p)
    B, T = batch.mask.shape
    correct = [float(batch.reward[b]) > threshold for b in range(B)]
    keep = torch.tensor([[bool(batch.mask[b, t]) and (correct[b] if name == "psr_only" else not correct[b])
                          for t in range(T)] for b in range(B)])
    sign = 1.0 if name == "psr_only" else -1.0
    want_adv = torch.where(keep, sign, 0.0).double()
    assert terms.adv.dtype == torch.float64 and torch.equal(terms.adv, want_adv)
    assert not terms.adv.requires_grad
    assert torch.equal(terms.weight, torch.where(batch.mask & ~keep, 0.0, 1.0))
    assert terms.weight.dtype == torch.float32
    changed = batch.mask & (~keep | (want_adv != batch.adv))
    assert torch.equal(terms.touched, changed | _clip_changed(batch, want_adv, 0.25, 0.2, 10.0))
    assert _stat(terms, "frac_kept") == pytest.approx(_valid_mean(keep.float(), batch.mask))
    _assert_clip_fields(terms, p)


def test_polarity_touched_only_where_the_loss_changes():
    # on-policy, every response correct, advantage already +1: psr_only changes nothing
    batch = _small_batch(seed=9, B=2, T=3, lengths=(3, 2), off_policy=0.0, reward=(1.0, 1.0), adv=(1.0, 1.0))
    terms = apply_method("psr_only", batch)
    assert not terms.touched.any() and torch.all(terms.weight == 1)
    assert _stat(terms, "frac_kept") == 1.0
    nsr = apply_method("nsr_only", batch)
    assert torch.equal(nsr.touched, batch.mask) and _stat(nsr, "frac_kept") == 0.0


# ------------------------------------------------------------------------------------------ scopes


def test_scope_reductions():
    from entropy_lens.methods.scopes import (
        n_scopes,
        scope_count,
        scope_max,
        scope_min,
        token_scope,
    )

    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False], [True, True, True]])
    seq_scope = torch.tensor([0, 1, 0, 2])
    values = torch.tensor([[1.0, -3.0, 99.0], [5.0, 6.0, 7.0], [4.0, -99.0, 99.0], [-2.0, 0.5, -7.0]],
                          dtype=torch.float64)
    assert n_scopes(seq_scope) == 3 and n_scopes(torch.zeros(0, dtype=torch.long)) == 0
    assert n_scopes(torch.tensor([0, 0])) == 1
    assert token_scope(seq_scope, mask).tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0], [2, 2, 2]]
    cnt = scope_count(mask, seq_scope)
    assert cnt.dtype == torch.long and cnt.tolist() == [3, 0, 3]
    mx, mn = scope_max(values, mask, seq_scope), scope_min(values, mask, seq_scope)
    assert mx.dtype == torch.float64 and mx.tolist() == [4.0, -math.inf, 0.5]  # an empty scope: −inf
    assert mn.dtype == torch.float64 and mn.tolist() == [-3.0, math.inf, -7.0]  # an empty scope: +inf
    neg = -torch.ones(4, 3)  # every value below the initial 0 of a wrong fill
    assert scope_max(neg, mask, seq_scope).tolist() == [-1.0, -math.inf, -1.0]
    assert scope_min(-neg, mask, seq_scope).tolist() == [1.0, math.inf, 1.0]


@pytest.mark.parametrize(
    "frac,n,min_count,rounding,want",
    [
        (0.29, [100], 0, "floor", [29]),  # 0.29·100 = 28.999999999999996
        (0.3, [10], 0, "ceil", [3]),  # 0.3·10 = 3.0000000000000004
        (0.3, [100, 12345], 0, "ceil", [30, 3704]),  # in fp32, 0.3·100 = 30.000001: ⌈·⌉ would be 31
        (0.25, [10, 3, 0, 1], 0, "floor", [2, 0, 0, 0]),
        (0.25, [10, 3, 0, 1], 0, "ceil", [3, 1, 0, 1]),
        (0.25, [10, 3, 0, 1], 1, "floor", [2, 1, 0, 1]),  # at least one, never more than N
        (0.25, [10, 3, 0, 1], 5, "floor", [5, 3, 0, 1]),
        (1.0, [7, 2], 0, "floor", [7, 2]),
        (1e-4, [7, 2], 0, "ceil", [1, 1]),
        (0.5, [7], 0, "floor", [3]),
        (0.5, [7], 0, "ceil", [4]),
    ],
)
def test_fraction_count(frac, n, min_count, rounding, want):
    from entropy_lens.methods.scopes import fraction_count

    k = fraction_count(frac, torch.tensor(n), min_count=min_count, rounding=rounding)
    assert k.dtype == torch.long and k.tolist() == want
    if min_count == 0 and rounding == "floor":
        assert fraction_count(frac, torch.tensor(n)).tolist() == want  # the defaults: floor, no minimum


def test_select_top_per_scope():
    from entropy_lens.methods.scopes import select_top_per_scope

    score = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.9, 0.2, 0.7, 0.9], [0.3, 0.3, 0.8, 0.0]])
    eligible = torch.tensor([[True, True, True, True], [True, False, True, True], [True, True, False, True]])
    seq_scope = torch.tensor([0, 1, 0])
    for counts in ([2, 1], [3, 2], [0, 3], [9, 9], [1, 0], [5, 2]):
        got = select_top_per_scope(score, eligible, seq_scope, torch.tensor(counts))
        assert got.dtype == torch.bool
        assert torch.equal(got, _top_per_scope(score, eligible, seq_scope, counts)), counts
    # ties by position: the earlier sequence, then the earlier token
    got = select_top_per_scope(score, eligible, seq_scope, torch.tensor([2, 1]))
    assert got.tolist() == [[False, True, True, False], [True, False, False, False], [False, False, False, False]]
    got = select_top_per_scope(score, eligible, seq_scope, torch.tensor([5, 0]))
    assert got.tolist() == [[True, True, True, False], [False, False, False, False], [True, True, False, False]]
    none = select_top_per_scope(score, torch.zeros(3, 4, dtype=torch.bool), seq_scope, torch.tensor([2, 2]))
    assert none.shape == (3, 4) and none.dtype == torch.bool and not none.any()
    one_scope = select_top_per_scope(score, eligible, torch.zeros(3, dtype=torch.long), torch.tensor([3]))
    assert one_scope.tolist() == [[False, True, True, False], [True, False, False, False], [False] * 4]
    # a scope with no eligible token next to one with several (bincount needs minlength)
    later = select_top_per_scope(score, eligible & (seq_scope == 0)[:, None], seq_scope, torch.tensor([1, 4]))
    assert later.tolist() == [[False, True, False, False], [False] * 4, [False] * 4]


# ------------------------------------------------------------------- registry: inputs and sources


@dataclass(frozen=True)
class _NarrowParams(ClipParams):
    SOURCES: ClassVar[dict[str, str]] = {"use_ref": "package choice: test"}

    use_ref: bool = True
    extra: float = 1.0

    def required_inputs(self) -> tuple[str, ...]:
        return ("ref_logp",) if self.use_ref else ()


def test_required_inputs_are_narrowed_by_the_params():
    from entropy_lens.methods import param_sources, params_sources

    try:
        register_method("tmp_k_narrow", summary="n", params=_NarrowParams, needs=("reward", "ref_logp"))(
            lambda b, p, c: None)
        spec = get_method("tmp_k_narrow")
        assert spec.required_inputs() == ("ref_logp",)  # the default params narrow `needs`
        assert spec.required_inputs(_NarrowParams(use_ref=False)) == ()
        b = _small_batch().replace(ref_logp=None)
        assert spec.missing_inputs(b) == ("ref_logp",)
        assert spec.missing_inputs(b, _NarrowParams(use_ref=False)) == ()
        assert spec.missing_inputs(_small_batch()) == ()
        src = params_sources("tmp_k_narrow")
        assert src == param_sources(_NarrowParams)
        assert src["use_ref"] == "package choice: test" and src["extra"] == ""  # no source: empty
        assert src["eps_low"] == param_sources(ClipParams)["eps_low"] != ""
        assert list(src) == ["eps_low", "eps_high", "dual_clip", "log_ratio_clamp", "use_ref", "extra"]
    finally:
        unregister_method("tmp_k_narrow")


def test_apply_method_defaults():
    batch = _cov_batch()
    values = {"clip_ratio": 0.3, "lb": -0.4, "ub": 0.4, "scope": "batch"}
    default = apply_method("clip_cov", batch, values)  # no context: seed 0, one scope
    seeded = apply_method("clip_cov", batch, values, make_context(0))
    other = apply_method("clip_cov", batch, values, make_context(1))
    assert torch.equal(default.weight, seeded.weight) and not torch.equal(default.weight, other.weight)
    as_params = apply_method("clip_cov", batch, params_from_dict("clip_cov", values), make_context(0))
    assert torch.equal(as_params.weight, default.weight)
    plain = apply_method("grpo", batch)  # no params: the defaults
    assert (plain.eps_low, plain.eps_high, plain.dual_clip, plain.log_ratio_clamp) == (0.2, 0.2, 10.0, 20.0)


# ------------------------------------------------------------------------------------------ STEER


def _steer_forms():
    from entropy_lens.methods.steer import OMEGA_FORMS

    return ", ".join(OMEGA_FORMS)


@pytest.mark.parametrize(
    "values,msg",
    [
        ({"mapping": "cubic"}, "mapping must be one of exp, linear, binary, got 'cubic'"),
        ({"omega": "both"}, None),  # the list of forms, below
        ({"scope": "node"}, "scope must be one of micro, mini, batch, got 'node'"),
        ({"entropy": "new"}, "entropy must be one of old, current, got 'new'"),
        ({"lambda_min": 0.0}, "lambda_min must be in (0, 1], got 0.0"),
        ({"lambda_min": 1.0000001}, "lambda_min must be in (0, 1], got 1.0000001"),
        ({"threshold": 0.0}, "threshold must be in (0, 1], got 0.0"),
        ({"threshold": 1.5}, "threshold must be in (0, 1], got 1.5"),
        ({"lambda_max": 1.2}, ("lambda_max must be 1 (or unset) with mapping='exp', which maps into "
                               "[lambda_min, 1]; got 1.2")),
        ({"mapping": "binary", "lambda_max": 0.9}, ("lambda_max must be 1 (or unset) with mapping='binary', "
                                                    "which maps into [lambda_min, 1]; got 0.9")),
        ({"mapping": "linear", "lambda_max": math.inf}, "lambda_max must be in [0.8, inf), got inf"),
        ({"mapping": "linear", "lambda_min": 0.9, "lambda_max": 0.85}, "lambda_max must be in [0.9, inf), got 0.85"),
    ],
)
def test_steer_params_messages(values, msg):
    if msg is None:
        msg = f"omega must be one of {_steer_forms()}, got 'both'"
    with pytest.raises(ValueError, match=exact(f"steer: {msg}")):
        params_from_dict("steer", values)


@pytest.mark.parametrize(
    "values,lam_max",
    [
        ({"lambda_min": 1.0, "threshold": 1.0}, 1.0),
        ({"lambda_min": 1e-9, "threshold": 1e-9, "mapping": "binary"}, 1.0),
        ({"lambda_max": 1.0}, 1.0),
        ({"mapping": "binary", "lambda_max": 1.0}, 1.0),
        ({"mapping": "linear"}, 1.2),
        ({"mapping": "linear", "lambda_min": 0.9, "lambda_max": 0.9}, 0.9),
        ({"mapping": "linear", "lambda_min": 1.0}, 1.2),
        ({"mapping": "linear", "lambda_max": 1e300}, 1e300),
    ],
)
def test_steer_params_accepted_on_their_bounds(values, lam_max):
    p = params_from_dict("steer", values)
    for k, v in values.items():
        assert getattr(p, k) == v
    assert p.resolved_lambda_max == lam_max


def _omega_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(12)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 3).to(dtype)
    old = (logp.double() + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)).to(dtype)
    ent = (torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).to(dtype)
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype)
    ratio = torch.exp(logp - old)
    iclip = torch.rand(3, 4, generator=g) > 0.3
    return logp, old, ent, adv, ratio, iclip


def test_steer_omega_forms_against_a_loop():
    from entropy_lens.methods import steer_omega

    logp, old, ent, adv, ratio, iclip = _omega_inputs()
    code = torch.zeros(3, 4, dtype=torch.float64)
    paper = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        for t in range(4):
            p, po, h, a = math.exp(float(logp[b, t])), math.exp(float(old[b, t])), float(ent[b, t]), float(adv[b, t])
            code[b, t] = (a / po) * p * (1 - p) * (float(logp[b, t]) + h)
            paper[b, t] = -float(ratio[b, t]) * a * p * (1 - p) * (float(logp[b, t]) + h)
    torch.testing.assert_close(steer_omega(logp, old, ent, adv, ratio, iclip), code, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(steer_omega(logp, old, ent, adv, ratio, iclip, "paper"), paper, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(steer_omega(logp, old, ent, adv, ratio, iclip, "paper", True),
                               paper * iclip.double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(steer_omega(logp, old, ent, adv, ratio, iclip, "code", use_iclip=True),
                               code * iclip.double(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=exact(f"omega must be one of {_steer_forms()}, got 'both'")):
        steer_omega(logp, old, ent, adv, ratio, iclip, "both")


def test_steer_entropy_source():
    from entropy_lens.methods import steer_entropy

    batch = _small_batch()
    h_old = batch.entropy + 0.5
    with_old = batch.replace(old_entropy=h_old)
    assert torch.equal(steer_entropy(with_old), h_old)  # default: old
    assert torch.equal(steer_entropy(with_old, "current"), batch.entropy)
    assert torch.equal(steer_entropy(batch), batch.entropy)  # no old entropy recorded
    with pytest.raises(ValueError, match=exact("entropy must be one of old, current, got 'new'")):
        steer_entropy(batch, "new")


def _steer_ref(a, mask, seq_scope, mapping, lmin, lmax, tau):
    """λ of docs/science.md §3.2, Python floats per token."""
    B, T = a.shape
    out = [[1.0] * T for _ in range(B)]
    for s in set(seq_scope.tolist()):
        cells = [(b, t) for b in range(B) for t in range(T) if mask[b, t] and int(seq_scope[b]) == s]
        if not cells:
            continue
        vals = [float(a[b, t]) for b, t in cells]
        M, m = max(vals), min(vals)
        for (b, t), x in zip(cells, vals):
            if mapping == "exp":
                k = math.log(1.0 / lmin) / max(M, 0.02)
                out[b][t] = min(max(math.exp(-k * x), lmin), 1.0)
            elif mapping == "binary":
                out[b][t] = lmin if x >= tau * max(M, 0.02) else 1.0
            elif M - m <= 0:
                out[b][t] = 0.5 * (lmin + lmax)
            else:
                out[b][t] = min(max(lmax - (x - m) * (lmax - lmin) / (M - m), lmin), lmax)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mapping,lmin,lmax", [("exp", 0.7, 1.0), ("linear", 0.8, 1.2), ("binary", 0.6, 1.0)])
def test_steer_weights_are_computed_in_float64(mapping, lmin, lmax):
    from entropy_lens.methods import steer_weights

    g = torch.Generator().manual_seed(13)
    a = torch.rand(16, 24, generator=g, dtype=torch.float64) * 0.9
    mask = torch.rand(16, 24, generator=g) > 0.2
    seq_scope = torch.arange(16) // 4
    want = _steer_ref(a, mask, seq_scope, mapping, lmin, lmax, 0.5)
    got32 = steer_weights(a.float(), mask, seq_scope, mapping, lmin, lmax, 0.5)
    assert got32.dtype == torch.float32
    want32 = _steer_ref(a.float().double(), mask, seq_scope, mapping, lmin, lmax, 0.5).float()
    assert torch.equal(got32, want32)  # fp64 mapping, rounded once to the input's fp32
    got64 = steer_weights(a, mask, seq_scope, mapping, lmin, lmax, 0.5)
    assert got64.dtype == torch.float64
    # the binary mapping's λ_min passes through fp32 (docs/testing.md, "Surviving mutants")
    tol = 1e-7 if mapping == "binary" else 1e-14
    torch.testing.assert_close(got64, want, rtol=tol, atol=tol)
    assert torch.all(got64[~mask] == 1.0)


def test_steer_weights_hit_lambda_min_exactly():
    from entropy_lens.methods import steer_weights

    one = torch.ones(1, 3, dtype=torch.bool)
    scope = torch.tensor([0])
    # exp(−ln(1/λ)/M · M) rounds below λ = 0.5 in fp64: the clamp brings it back
    w = steer_weights(torch.tensor([[0.0, 0.01, 0.05]], dtype=torch.float64), one, scope, "exp", 0.5, 1.0)
    assert float(w[0, 2]) == 0.5 and float(w[0, 0]) == 1.0
    # the linear map's λ_max − (M − m)·(λ_max − λ_min)/(M − m) also rounds below λ_min = 0.5
    w = steer_weights(torch.tensor([[0.0, 0.2, 0.37]], dtype=torch.float64), one, scope, "linear", 0.5, 1.2)
    assert float(w[0, 2]) == 0.5 and float(w[0, 0]) == 1.2
    w = steer_weights(torch.tensor([[0.0, 0.2, 0.37]]), one, scope, "binary", 0.8, 1.0, 0.5)
    assert w.dtype == torch.float32 and w[0].tolist() == [1.0, torch.tensor(0.8).item(), torch.tensor(0.8).item()]


def test_steer_weights_defaults_and_message():
    from entropy_lens.methods import steer_weights

    g = torch.Generator().manual_seed(14)
    a = torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    scope = torch.tensor([0, 0, 1, 1])
    assert torch.equal(steer_weights(a, mask, scope), steer_weights(a, mask, scope, "exp", 0.8, 1.0, 0.5))
    torch.testing.assert_close(steer_weights(a, mask, scope, "binary"), _steer_ref(a, mask, scope, "binary", 0.8, 1.0, 0.5))
    assert torch.equal(steer_weights(a, mask, scope, "linear"), steer_weights(a, mask, scope, "linear", 0.8, 1.0))
    torch.testing.assert_close(steer_weights(a, mask, scope, "linear"), _steer_ref(a, mask, scope, "linear", 0.8, 1.0, 0.5))
    with pytest.raises(ValueError, match=exact("mapping must be one of exp, linear, binary, got 'cubic'")):
        steer_weights(a, mask, scope, "cubic")


def test_select_top_per_scope_edge_cases():
    from entropy_lens.methods.scopes import select_top_per_scope

    score = torch.tensor([[0.3, 0.9], [0.1, 0.2]])
    only = torch.tensor([[False, False], [True, False]])
    got = select_top_per_scope(score, only, torch.tensor([0, 0]), torch.tensor([1]))
    assert got.tolist() == [[False, False], [True, False]]  # a single eligible token is picked
    # many equal scores: the first positions win (a sort that is not stable would pick others)
    B, T = 8, 40
    flat = torch.zeros(B, T)
    flat[3, 5] = 1.0
    elig = torch.ones(B, T, dtype=torch.bool)
    got = select_top_per_scope(flat, elig, torch.zeros(B, dtype=torch.long), torch.tensor([25]))
    want = torch.zeros(B, T, dtype=torch.bool)
    want[3, 5] = True
    want[0, :24] = True
    assert torch.equal(got, want)
    two = select_top_per_scope(flat, elig, torch.arange(B) // 4, torch.tensor([50, 3]))
    want = torch.zeros(B, T, dtype=torch.bool)
    want[3, 5] = True
    want[0, :40] = True
    want[1, :9] = True
    want[4, :3] = True
    assert torch.equal(two, want)


def test_correct_tokens_threshold_is_strict_and_defaults_to_half():
    from entropy_lens.methods.baselines import correct_tokens

    mask = torch.tensor([[True, True], [True, False], [True, True], [False, False]])
    reward = torch.tensor([0.5, 0.51, 1.0, 1.0])
    assert correct_tokens(reward, mask).tolist() == [[False, False], [True, False], [True, True], [False, False]]
    assert correct_tokens(reward, mask, 0.51).tolist() == [[False, False], [False, False], [True, True],
                                                           [False, False]]
    batch = _clip_batch().replace(reward=torch.tensor([0.5, 0.0, 0.6, 0.4]))
    terms = apply_method("psr_only", batch)  # a reward equal to the threshold is wrong
    assert torch.all(terms.weight[0][batch.mask[0]] == 0) and torch.all(terms.adv[0] == 0)


def test_float_dtypes_of_weights_and_advantages():
    from entropy_lens.methods.baselines import polarity_advantage

    batch = _clip_batch()
    b64 = batch.replace(**{k: getattr(batch, k).double() for k in ("logp", "old_logp", "entropy", "adv")})
    for name in list_methods():
        if not name.startswith("tmp_"):
            assert apply_method(name, b64).weight.dtype == torch.float32, name
    correct = torch.tensor([[True, False], [False, False]])
    mask = torch.tensor([[True, True], [True, False]])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        adv = polarity_advantage(correct, mask, 0.1, 1.0)
        w_psr = apply_method("psr_only", batch).weight
        w_nsr = apply_method("nsr_only", batch).weight
    finally:
        torch.set_default_dtype(prev)
    assert adv.dtype == torch.float32 and adv.tolist() == [[torch.tensor(0.1).item(), -1.0], [-1.0, 0.0]]
    assert w_psr.dtype == torch.float32 and w_nsr.dtype == torch.float32


def test_polarity_touched_follows_its_own_dual_clip():
    # a wrong response whose advantage is already −1: nsr_only changes the loss only through the
    # clip; a token with r > c = 10 is dual-clipped under both, so it is untouched
    batch = _small_batch(seed=10, B=2, T=3, lengths=(3, 3), off_policy=0.0, reward=(0.0, 1.0), adv=(-1.0, 1.0))
    log_r = torch.log(torch.tensor([[12.0, 1.0, 0.9], [1.0, 1.0, 1.0]]))
    batch = batch.replace(old_logp=batch.logp - log_r)
    terms = apply_method("nsr_only", batch)
    assert terms.touched.tolist() == [[False, False, False], [True, True, True]]
    low = apply_method("nsr_only", batch, {"dual_clip": 20.0})  # r = 12 < 20: the token is live again
    assert low.touched.tolist() == [[True, False, False], [True, True, True]]


def test_mean_over_a_single_selected_token():
    batch = _cov_batch()
    terms = apply_method("kl_cov", batch, {"k": 1e-6, "scope": "batch"})  # min_select = 1: one token
    chosen = terms.penalty.select
    assert int(chosen.sum()) == 1
    b, t = torch.nonzero(chosen)[0].tolist()
    assert _stat(terms, "abs_logratio_mean_selected") == pytest.approx(
        abs(float(batch.logp[b, t] - batch.old_logp[b, t])), rel=1e-6)
    one = _small_batch(seed=11, B=2, T=3, lengths=(1, 0), reward=(1.0, 0.0), adv=(0.5, -0.5))
    terms = apply_method("entropy_bonus", one)
    assert _stat(terms, "entropy_mean") == pytest.approx(float(one.entropy[0, 0]), rel=1e-6)


@pytest.mark.parametrize("form", ["lm_head", "lm_head_source"])
def test_steer_omega_from_an_lm_head_score(form):
    from entropy_lens.methods import steer_omega
    from entropy_lens.methods.steer import OMEGA_INPUTS

    logp, old, ent, adv, ratio, iclip = _omega_inputs(torch.float32)
    score = torch.randn(3, 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64).requires_grad_(True)
    om = steer_omega(logp, old, ent, adv, ratio, iclip, form, False, score)
    assert om.dtype == torch.float32 and not om.requires_grad
    assert torch.equal(om, score.detach().float())
    om = steer_omega(logp, old, ent, adv, ratio, iclip, form, True, score)
    assert torch.equal(om, score.detach().float() * iclip.float())
    field = OMEGA_INPUTS[form]
    with pytest.raises(ValueError, match=exact(
            f"omega={form!r} needs the LM-head kernel score (TokenBatch.{field}), which this batch lacks")):
        steer_omega(logp, old, ent, adv, ratio, iclip, form)

    # the method reads the batch field its form names, and declares it
    batch = _small_batch(seed=16)
    g = torch.Generator().manual_seed(17)
    fields = {name: torch.randn(batch.mask.shape, generator=g) * 0.3 for name in OMEGA_INPUTS.values()}
    with_scores = batch.replace(**fields)
    terms = apply_method("steer", with_scores, {"omega": form, "scope": "batch"})
    want = _steer_ref(fields[field].abs().double(), batch.mask, torch.zeros(4, dtype=torch.long), "exp", 0.8, 1.0, 0.5)
    torch.testing.assert_close(terms.weight, want.float())
    spec, p = get_method("steer"), params_from_dict("steer", {"omega": form})
    assert p.required_inputs() == (field,) and spec.required_inputs(p) == (field,)
    assert spec.missing_inputs(batch, p) == (field,) and spec.missing_inputs(with_scores, p) == ()
    assert spec.missing_inputs(batch) == () and params_from_dict("steer").required_inputs() == ()
