"""Method registry, parameters, the one objective and each method's definition."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from entropy_lens.advantages import broadcast_to_tokens
from entropy_lens.advantages import grpo as grpo_adv
from entropy_lens.estimators import cov_term
from entropy_lens.methods import (
    FACTORS,
    ClipParams,
    MethodTerms,
    Penalty,
    SteerParams,
    apply_method,
    get_method,
    list_methods,
    make_context,
    method_loss,
    method_per_token_loss,
    params_from_dict,
    register_method,
    steer_weights,
    unregister_method,
)
from entropy_lens.tokens import TokenBatch

EXPECTED = {
    "grpo",
    "clip_higher",
    "entropy_bonus",
    "fork_tokens",
    "w_reinforce",
    "entropy_adv",
    "clip_cov",
    "kl_cov",
    "steer",
    "psr_only",
    "nsr_only",
    "kl_ref",
    "adaptive_entropy",
    "gspo",
    "gppo",
}


def make_batch(seed=0, B=8, T=6, V=7, off_policy=0.3, lengths=None, adv_scale=1.0, logp_grad=False):
    """A small batch with exact per-token statistics of random softmax distributions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    logpi = torch.log_softmax(logits, -1)
    pi = logpi.exp()
    tok = torch.multinomial(pi.reshape(-1, V), 1, generator=g).reshape(B, T)
    logp = logpi.gather(-1, tok[..., None])[..., 0]
    if lengths is None:
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    reward = torch.rand(B, generator=g)
    group = torch.arange(B) // 4
    adv = broadcast_to_tokens(grpo_adv(reward, group), mask) * adv_scale
    old = logp + off_policy * torch.randn(B, T, generator=g)
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    if logp_grad:
        logp = logp.clone().requires_grad_(True)
    return TokenBatch(
        ref_logp=ref,
        token_ids=tok,
        mask=mask,
        logp=logp,
        old_logp=old,
        entropy=-(pi * logpi).sum(-1),
        sum_p2=(pi**2).sum(-1),
        sum_p2_logp=(pi**2 * logpi).sum(-1),
        adv=adv,
        group_id=group,
        reward=reward,
    )


def loss_and_grads(batch, terms, agg_mode="token-mean"):
    logp = batch.logp.detach().clone().requires_grad_(True)
    ent = batch.entropy.detach().clone().requires_grad_(True)
    loss = method_loss(terms, logp, batch.old_logp, batch.adv, batch.mask, ent, agg_mode)
    loss.backward()
    return loss.detach(), logp.grad, ent.grad


def ctx(seed=0, B=8, micro=None, mini=None):
    return make_context(seed, lr=1e-3, batch_size=B, micro_batch_size=micro, mini_batch_size=mini)


# ----------------------------------------------------------------------------- registry contract


def test_every_expected_method_is_registered():
    assert EXPECTED <= set(list_methods())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract(name):
    batch = make_batch(seed=1, logp_grad=True)
    spec = get_method(name)
    assert set(spec.factors) <= set(FACTORS)
    assert spec.summary and "\n" not in spec.summary
    terms = apply_method(name, batch, None, ctx(7, micro=2, mini=4))
    B, T = batch.mask.shape
    assert terms.weight.shape == (B, T) and not terms.weight.requires_grad
    assert terms.touched.shape == (B, T) and terms.touched.dtype == torch.bool
    assert not (terms.touched & ~batch.mask).any(), "padding is never touched"
    assert torch.equal(terms.weight[~batch.mask], torch.ones_like(terms.weight[~batch.mask]))
    assert terms.adv is None or (terms.adv.shape == (B, T) and not terms.adv.requires_grad)
    for eps in (terms.eps_low, terms.eps_high):
        assert isinstance(eps, float) or eps.shape in ((), (B, T))
    assert all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in terms.stats.values())
    loss, g_logp, _ = loss_and_grads(batch, terms)
    assert torch.isfinite(loss)
    assert torch.all(g_logp[~batch.mask] == 0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_padding_values_have_no_effect(name):
    clean = make_batch(seed=2)
    pad = ~clean.mask
    junk = clean.replace(
        logp=torch.where(pad, -40.0, clean.logp),
        old_logp=torch.where(pad, 3.0, clean.old_logp),
        entropy=torch.where(pad, 50.0, clean.entropy),
        sum_p2=torch.where(pad, 0.9, clean.sum_p2),
        adv=torch.where(pad, 100.0, clean.adv),
    )
    t_clean = apply_method(name, clean, None, ctx(3, micro=2))
    t_junk = apply_method(name, junk, None, ctx(3, micro=2))
    assert torch.equal(t_clean.weight[clean.mask], t_junk.weight[clean.mask])
    assert torch.equal(t_clean.touched, t_junk.touched)
    l_clean, g_clean, e_clean = loss_and_grads(clean, t_clean)
    l_junk, g_junk, e_junk = loss_and_grads(junk, t_junk)
    torch.testing.assert_close(l_clean, l_junk)
    torch.testing.assert_close(g_clean, g_junk)
    torch.testing.assert_close(e_clean, e_junk)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deterministic_under_seed(name):
    batch = make_batch(seed=4, B=8, T=10)
    a = apply_method(name, batch, None, ctx(11, micro=4))
    b = apply_method(name, batch, None, ctx(11, micro=4))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.touched, b.touched)
    assert (a.adv is None) == (b.adv is None) and (a.adv is None or torch.equal(a.adv, b.adv))
    assert torch.equal(loss_and_grads(batch, a)[0], loss_and_grads(batch, b)[0])


NEUTRAL = [
    ("grpo", {}),
    ("clip_higher", {"eps_high": 0.2}),
    ("steer", {"lambda_min": 1.0, "eps_high": 0.2}),
    ("steer", {"lambda_min": 1.0, "eps_high": 0.2, "omega": "paper", "use_iclip": True, "scope": "batch"}),
    ("steer", {"mapping": "linear", "lambda_min": 1.0, "lambda_max": 1.0, "eps_high": 0.2}),
    ("steer", {"mapping": "binary", "lambda_min": 1.0, "eps_high": 0.2, "entropy": "current"}),
    ("fork_tokens", {"rho": 1.0}),
    ("w_reinforce", {"lam": 1.0, "advantage": "grpo"}),
    ("clip_cov", {"clip_ratio": 1e-9, "min_select": 0}),
    ("entropy_bonus", {"beta": 0.0}),
    ("entropy_adv", {"alpha": 0.0}),
    ("kl_cov", {"beta": 0.0, "eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0, "log_ratio_clamp": 20.0}),
    ("kl_ref", {"beta": 0.0}),
    ("adaptive_entropy", {"gain": 0.0}),
]


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name,values", NEUTRAL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(NEUTRAL)])
def test_neutral_parameters_reduce_to_grpo(name, values, agg_mode):
    batch = make_batch(seed=5, B=8, T=8, off_policy=0.4)
    ref = apply_method("grpo", batch, None, ctx())
    terms = apply_method(name, batch, values, ctx(micro=2))
    assert not terms.touched.any()
    l_ref, g_ref, _ = loss_and_grads(batch, ref, agg_mode)
    l_m, g_m, e_m = loss_and_grads(batch, terms, agg_mode)
    torch.testing.assert_close(l_m, l_ref)
    torch.testing.assert_close(g_m, g_ref)
    assert e_m is None or torch.all(e_m == 0)


def test_grpo_loss_is_plain_token_mean_of_clipped_surrogate():
    batch = make_batch(seed=6, off_policy=0.5)
    terms = apply_method("grpo", batch)
    r = torch.exp(batch.logp - batch.old_logp)
    A = batch.adv
    per = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2))
    per = torch.where(A < 0, torch.minimum(per, -10.0 * A), per)
    expected = per[batch.mask].mean()
    torch.testing.assert_close(loss_and_grads(batch, terms)[0], expected)


# ---------------------------------------------------------------------------------- registry errors


def test_unknown_method_lists_available():
    with pytest.raises(ValueError) as e:
        get_method("ppo_magic")
    assert "steer" in str(e.value) and "clip_cov" in str(e.value)


def test_unknown_param_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        params_from_dict("steer", {"lambda_minn": 0.7})
    msg = str(e.value)
    assert "lambda_minn" in msg and "lambda_min" in msg and "mapping" in msg


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("steer", "lambda_min", 0.0),
        ("steer", "lambda_min", 1.2),
        ("steer", "lambda_min", -0.5),
        ("steer", "mapping", "cubic"),
        ("steer", "omega", "both"),
        ("steer", "scope", "node"),
        ("steer", "lambda_max", 1.2),  # exp mapping clamps to [λ_min, 1]
        ("steer", "entropy", "new"),
        ("steer", "threshold", 0.0),
        ("grpo", "log_ratio_clamp", 0.0),
        ("w_reinforce", "advantage", "rloo"),
        ("kl_ref", "estimator", "k2"),
        ("kl_ref", "beta", -1.0),
        ("gspo", "eps_low", -1.0),
        ("gppo", "beta_low", -0.5),
        ("adaptive_entropy", "beta0", 0.5),  # above beta_max = 0.01
        ("adaptive_entropy", "gain", -1.0),
        ("grpo", "eps_low", -0.1),
        ("grpo", "eps_high", -1e-3),
        ("grpo", "dual_clip", 0.9),
        ("clip_cov", "clip_ratio", 0.0),
        ("clip_cov", "clip_ratio", 1.5),
        ("clip_cov", "ub", 0.5),  # ub must exceed lb = 1
        ("kl_cov", "k", 2.0),
        ("kl_cov", "beta", -1.0),
        ("fork_tokens", "rho", 0.0),
        ("fork_tokens", "rho", 1.01),
        ("entropy_adv", "kappa", 0.0),
        ("entropy_bonus", "beta", -0.1),
        ("w_reinforce", "lam", -0.1),
        ("steer", "use_iclip", "yes"),
        ("steer", "lambda_min", "abc"),
    ],
)
def test_out_of_range_values_name_the_parameter(name, key, value):
    with pytest.raises(ValueError) as e:
        params_from_dict(name, {key: value})
    assert key in str(e.value) and name in str(e.value)


def test_linear_lambda_max_below_lambda_min_is_an_error():
    with pytest.raises(ValueError, match=r"lambda_max must be in \[0.9"):
        SteerParams(mapping="linear", lambda_min=0.9, lambda_max=0.85)


def test_params_are_frozen_and_round_trip():
    p = params_from_dict("steer", {"lambda_min": 0.7, "mapping": "linear"})
    assert p.lambda_min == 0.7 and p.resolved_lambda_max == 1.2
    assert SteerParams().resolved_lambda_max == 1.0
    assert params_from_dict("steer", p.to_dict()) == p
    with pytest.raises(Exception):
        p.lambda_min = 0.5  # frozen
    assert params_from_dict("clip_higher").eps_high == 0.28
    assert params_from_dict("grpo", {"eps_low": 1}).eps_low == 1.0  # ints accepted as floats


def test_duplicate_and_bad_registrations_are_errors():
    @dataclass(frozen=True)
    class P(ClipParams):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("steer", summary="again", params=P)(lambda b, p, c: None)
    with pytest.raises(ValueError, match="unknown factor"):
        register_method("tmp_method_x", summary="x", factors=("temperature",), params=P)
    try:
        register_method("tmp_method_y", summary="y", factors=("clip",), params=P)(lambda b, p, c: None)
        assert "tmp_method_y" in list_methods()
    finally:
        unregister_method("tmp_method_y")
    assert "tmp_method_y" not in list_methods()


def test_method_rejects_wrong_params_type():
    with pytest.raises(TypeError):
        get_method("steer")(make_batch(), params_from_dict("grpo"), ctx())


def test_weight_with_grad_is_rejected():
    w = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="gradient"):
        MethodTerms(weight=w, touched=torch.zeros(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- STEER


def ref_steer_weights(om_abs, mask, seq_scope, mapping, lmin, lmax):
    """Per-token Python loop reference of docs/science.md §3.2 (test only)."""
    B, T = len(om_abs), len(om_abs[0])
    out = [[1.0] * T for _ in range(B)]
    for s in sorted(set(seq_scope)):
        vals = [om_abs[b][t] for b in range(B) if seq_scope[b] == s for t in range(T) if mask[b][t]]
        if not vals:
            continue
        M, m = max(vals), min(vals)
        for b in range(B):
            if seq_scope[b] != s:
                continue
            for t in range(T):
                if not mask[b][t]:
                    continue
                a = om_abs[b][t]
                if mapping == "exp":
                    k = math.log(1.0 / lmin) / max(M, 0.02)
                    lam = min(max(math.exp(-k * a), lmin), 1.0)
                elif M == m:
                    lam = (lmin + lmax) / 2
                else:
                    lam = min(max(lmax - (a - m) * (lmax - lmin) / (M - m), lmin), lmax)
                out[b][t] = lam
    return torch.tensor(out)


def ref_omega(batch, form, use_iclip, eps_low=0.2, eps_high=0.28, dual=10.0):
    B, T = batch.mask.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            lp, olp = float(batch.logp[b, t]), float(batch.old_logp[b, t])
            H, A = float(batch.entropy[b, t]), float(batch.adv[b, t])
            p, r = math.exp(lp), math.exp(lp - olp)
            if form == "code":
                om = A / math.exp(olp) * p * (1 - p) * (lp + H)
            else:
                om = -r * A * p * (1 - p) * (lp + H)
            dead = (A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low) or (A < 0 and r > dual)
            if use_iclip and dead:
                om = 0.0
            out[b][t] = abs(om)
    return out


SCOPE_IDS = {"micro": [0, 0, 1, 1, 2, 2, 3, 3], "mini": [0] * 4 + [1] * 4, "batch": [0] * 8}


@pytest.mark.parametrize("scope", ["micro", "mini", "batch"])
@pytest.mark.parametrize(
    "mapping,form,use_iclip,lmin,lmax",
    [
        ("exp", "code", False, 0.8, None),
        ("exp", "paper", True, 0.7, None),
        ("exp", "code", True, 0.5, 1.0),
        ("linear", "code", False, 0.8, None),
        ("linear", "paper", False, 0.6, 1.0),
    ],
)
def test_steer_weights_match_loop_reference(scope, mapping, form, use_iclip, lmin, lmax):
    batch = make_batch(seed=8, off_policy=0.4)
    p = SteerParams(mapping=mapping, omega=form, use_iclip=use_iclip, lambda_min=lmin, lambda_max=lmax, scope=scope)
    terms = get_method("steer")(batch, p, ctx(micro=2, mini=4))
    om = ref_omega(batch, form, use_iclip)
    ref = ref_steer_weights(om, batch.mask.tolist(), SCOPE_IDS[scope], mapping, lmin, p.resolved_lambda_max)
    torch.testing.assert_close(terms.weight, ref, rtol=1e-5, atol=1e-6)
    # per scope, the token with the largest |ω| sits at λ_min (exp: max|ω| ≥ 0.02 here)
    lam_min32 = torch.tensor(lmin, dtype=torch.float32)
    for s in set(SCOPE_IDS[scope]):
        rows = [b for b in range(8) if SCOPE_IDS[scope][b] == s]
        w = terms.weight[rows][batch.mask[rows]]
        assert torch.isclose(w.min(), lam_min32)
        assert w.max() <= p.resolved_lambda_max + 1e-6


def test_steer_omega_floor_keeps_weights_above_lambda_min():
    batch = make_batch(seed=9, adv_scale=1e-3)  # every |ω| ≪ 0.02
    om = ref_omega(batch, "code", False)
    M = max(om[b][t] for b in range(8) for t in range(6) if batch.mask[b, t])
    assert M < 0.02
    terms = apply_method("steer", batch, {"scope": "batch"}, ctx())
    ref = ref_steer_weights(om, batch.mask.tolist(), [0] * 8, "exp", 0.8, 1.0)
    torch.testing.assert_close(terms.weight, ref, rtol=1e-6, atol=1e-7)
    w = terms.weight[batch.mask]
    assert (w > 0.8).all()
    expected_min = math.exp(-math.log(1 / 0.8) * M / 0.02)
    assert math.isclose(float(w.min()), expected_min, rel_tol=1e-5)


def test_steer_exp_clamp_bounds_weights():
    g = torch.Generator().manual_seed(0)
    om = torch.rand(4, 5, generator=g) * 3
    mask = torch.ones(4, 5, dtype=torch.bool)
    w = steer_weights(om, mask, torch.tensor([0, 0, 1, 1]), "exp", 0.6, 1.0)
    assert (w >= 0.6).all() and (w <= 1.0).all()
    ref = ref_steer_weights(om.tolist(), mask.tolist(), [0, 0, 1, 1], "exp", 0.6, 1.0)
    torch.testing.assert_close(w, ref)
    # largest |ω| of each scope → exactly λ_min
    assert torch.isclose(w[:2].min(), torch.tensor(0.6)) and torch.isclose(w[2:].min(), torch.tensor(0.6))


def test_steer_linear_all_equal_scope_gets_midpoint():
    om = torch.tensor([[0.3, 0.3, 9.0], [0.3, 0.3, 0.3], [0.1, 0.5, 0.9], [0.2, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True], [True, False, False]])
    seq_scope = torch.tensor([0, 0, 1, 2])
    w = steer_weights(om, mask, seq_scope, "linear", 0.8, 1.2)
    assert torch.allclose(w[:2][mask[:2]], torch.tensor(1.0))  # scope 0: all |ω| = 0.3 → (0.8+1.2)/2
    assert w[0, 2] == 1.0  # padding
    torch.testing.assert_close(w[2], torch.tensor([1.2, 1.0, 0.8]))
    assert torch.isclose(w[3, 0], torch.tensor(1.0))  # a one-token scope is "all equal"
    ref = ref_steer_weights(om.tolist(), mask.tolist(), seq_scope.tolist(), "linear", 0.8, 1.2)
    torch.testing.assert_close(w, ref)


def test_steer_scope_changes_result():
    batch = make_batch(seed=10)
    w_micro = apply_method("steer", batch, {"scope": "micro"}, ctx(micro=2)).weight
    w_batch = apply_method("steer", batch, {"scope": "batch"}, ctx(micro=2)).weight
    assert not torch.equal(w_micro, w_batch)
    # with no micro-batch assignment, micro scope = the whole batch
    w_none = apply_method("steer", batch, {"scope": "micro"}, ctx()).weight
    assert torch.equal(w_none, w_batch)


# --------------------------------------------------------------------------- Clip-Cov / KL-Cov


def scope_counts(mask, seq_scope):
    return [int(mask[[b for b in range(len(seq_scope)) if seq_scope[b] == s]].sum()) for s in sorted(set(seq_scope))]


@pytest.mark.parametrize("scope,micro,mini", [("batch", None, None), ("micro", 2, None), ("mini", 2, 4)])
def test_clip_cov_selects_floor_fraction_per_scope(scope, micro, mini):
    batch = make_batch(seed=12, B=8, T=20, off_policy=0.0)  # on-policy: nothing clipped
    ids = {"batch": [0] * 8, "micro": SCOPE_IDS["micro"], "mini": SCOPE_IDS["mini"]}[scope]
    values = {"clip_ratio": 0.3, "lb": -1e9, "ub": 1e9, "scope": scope}
    terms = apply_method("clip_cov", batch, values, ctx(0, micro=micro, mini=mini))
    sel = terms.weight == 0
    for s, n in zip(sorted(set(ids)), scope_counts(batch.mask, ids)):
        rows = [b for b in range(8) if ids[b] == s]
        assert int(sel[rows].sum()) == math.floor(0.3 * n + 1e-9)
    assert not (sel & ~batch.mask).any()
    assert int(terms.stats["n_selected"]) == int(sel.sum())


def test_clip_cov_min_select_and_seeding():
    batch = make_batch(seed=13, B=8, T=20, off_policy=0.0)
    wide = {"lb": -1e9, "ub": 1e9, "scope": "batch"}
    one = apply_method("clip_cov", batch, {**wide, "clip_ratio": 1e-6}, ctx(0))
    assert int((one.weight == 0).sum()) == 1  # verl convention: at least one token
    none = apply_method("clip_cov", batch, {**wide, "clip_ratio": 1e-6, "min_select": 0}, ctx(0))
    assert int((none.weight == 0).sum()) == 0
    a = apply_method("clip_cov", batch, {**wide, "clip_ratio": 0.25}, ctx(1)).weight
    b = apply_method("clip_cov", batch, {**wide, "clip_ratio": 0.25}, ctx(1)).weight
    c = apply_method("clip_cov", batch, {**wide, "clip_ratio": 0.25}, ctx(2)).weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_cov_only_selects_eligible_unclipped_tokens():
    batch = make_batch(seed=14, B=8, T=30, off_policy=0.5, adv_scale=3.0)
    c = cov_term(batch.logp, batch.adv, batch.mask)
    terms = apply_method("clip_cov", batch, {"clip_ratio": 1.0, "lb": 0.5, "ub": 3.0, "scope": "batch"}, ctx(0))
    sel = terms.weight == 0
    r = batch.ratio
    A = batch.adv
    clipped = ((A > 0) & (r > 1.2)) | ((A < 0) & (r < 0.8)) | ((A < 0) & (r > 10.0))
    eligible = batch.mask & (c > 0.5) & (c < 3.0) & ~clipped
    assert eligible.any()
    assert torch.equal(sel, eligible)  # ratio 1 → every eligible token is detached
    # a detached token contributes no gradient
    _, g, _ = loss_and_grads(batch, terms)
    assert torch.all(g[sel] == 0)


@pytest.mark.parametrize("scope,micro", [("batch", None), ("micro", 2)])
def test_kl_cov_selects_top_k_by_cov_per_scope(scope, micro):
    batch = make_batch(seed=15, B=8, T=25)
    ids = SCOPE_IDS["micro"] if scope == "micro" else [0] * 8
    terms = apply_method("kl_cov", batch, {"k": 0.1, "scope": scope}, ctx(0, micro=micro))
    sel = terms.penalty.select
    assert terms.penalty.kind == "abs_logratio" and terms.dual_clip is None and terms.eps_high == math.inf
    for s, n in zip(sorted(set(ids)), scope_counts(batch.mask, ids)):
        rows = [b for b in range(8) if ids[b] == s]
        m = batch.mask[rows]
        c = cov_term(batch.logp[rows], batch.adv[rows], m)  # means over this scope's valid tokens
        k = max(1, math.floor(0.1 * n + 1e-9))
        s_sel = sel[rows]
        assert int(s_sel.sum()) == k
        assert c[s_sel].min() >= c[m & ~s_sel].max()


def test_kl_cov_penalty_gradient_and_no_clip():
    batch = make_batch(seed=16, off_policy=0.5)
    terms = apply_method("kl_cov", batch, {"k": 0.2, "scope": "batch"}, ctx())
    off = apply_method("kl_cov", batch, {"k": 0.2, "scope": "batch", "beta": 0.0}, ctx())
    _, g, _ = loss_and_grads(batch, terms)
    _, g0, _ = loss_and_grads(batch, off)
    L = batch.n_tokens
    sign = torch.sign(batch.logp - batch.old_logp)
    expected = g0 + (1.0 / L) * sign * terms.penalty.select
    torch.testing.assert_close(g, expected)
    # no PPO clip: the surrogate gradient is −A·r/L on every valid token
    torch.testing.assert_close(g0, torch.where(batch.mask, -batch.adv * batch.ratio / L, 0.0))


def test_kl_cov_is_inert_on_policy():
    batch = make_batch(seed=17, off_policy=0.0)
    terms = apply_method("kl_cov", batch, {"k": 0.5}, ctx())
    off = apply_method("kl_cov", batch, {"k": 0.5, "beta": 0.0}, ctx())
    assert terms.penalty.select.sum() > 0
    l1, g1, _ = loss_and_grads(batch, terms)
    l0, g0, _ = loss_and_grads(batch, off)
    assert torch.equal(l1, l0) and torch.equal(g1, g0)


# ------------------------------------------------------------------------- the other methods


def test_fork_tokens_keeps_top_entropy_ceil_fraction():
    batch = make_batch(seed=18, B=8, T=12)
    terms = apply_method("fork_tokens", batch, {"rho": 0.2, "scope": "micro"}, ctx(micro=2))
    kept = (terms.weight == 1) & batch.mask
    for s in range(4):
        rows = [2 * s, 2 * s + 1]
        m = batch.mask[rows]
        n = int(m.sum())
        assert int(kept[rows].sum()) == math.ceil(0.2 * n - 1e-9)
        H = batch.entropy[rows]
        assert H[kept[rows]].min() >= H[m & ~kept[rows]].max()
    assert set(terms.weight[batch.mask].tolist()) <= {0.0, 1.0}


def test_w_reinforce_grpo_mode_weights_positive_advantage_only():
    batch = make_batch(seed=19)
    terms = apply_method("w_reinforce", batch, {"lam": 0.1, "advantage": "grpo"}, ctx())
    pos = batch.mask & (batch.adv > 0)
    assert torch.allclose(terms.weight[pos], torch.tensor(0.1))
    assert torch.all(terms.weight[batch.mask & ~pos] == 1)
    assert torch.equal(terms.touched, pos)


def test_entropy_adv_shapes_advantage():
    batch = make_batch(seed=20)
    terms = apply_method("entropy_adv", batch, None, ctx())
    psi = torch.minimum(0.4 * batch.entropy, batch.adv.abs() / 2.0)
    torch.testing.assert_close(terms.adv[batch.mask], (batch.adv + psi)[batch.mask])
    # the shaped advantage never flips a negative advantage's sign
    neg = batch.mask & (batch.adv < 0)
    assert (terms.adv[neg] < 0).all()


def test_entropy_bonus_gradient_on_entropy():
    batch = make_batch(seed=21)
    terms = apply_method("entropy_bonus", batch, {"beta": 0.01}, ctx())
    assert terms.penalty.needs_entropy and terms.touched.equal(batch.mask)
    _, _, g_ent = loss_and_grads(batch, terms)
    L = batch.n_tokens
    torch.testing.assert_close(g_ent, torch.where(batch.mask, -0.01 / L, 0.0))
    with pytest.raises(ValueError, match="entropy"):
        method_per_token_loss(terms, batch.logp, batch.old_logp, batch.adv, batch.mask, None)


def test_clip_higher_touches_exactly_the_newly_unclipped_tokens():
    batch = make_batch(seed=22, B=8, T=30, off_policy=0.4)
    terms = apply_method("clip_higher", batch, None, ctx())
    r = batch.ratio
    expected = batch.mask & (batch.adv > 0) & (r > 1.2) & (r <= 1.28)
    assert expected.any()
    assert torch.equal(terms.touched, expected)


def test_penalty_kind_is_validated():
    with pytest.raises(ValueError, match="penalty kind"):
        Penalty(kind="l2", coef=1.0)
