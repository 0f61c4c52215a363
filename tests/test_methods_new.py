"""The methods added after the first registry (psr_only, nsr_only, kl_ref, adaptive_entropy, gspo,
gppo), W-REINFORCE on raw rewards, STEER's binary mapping and entropy source, the reference
defaults and their sources, required inputs, and the optional TokenBatch fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from test_methods import ctx, loss_and_grads, make_batch, ref_omega

from entropy_lens.integrations import wants_old_entropy
from entropy_lens.methods import (
    GRPO_DUAL_CLIP,
    GRPO_EPS_HIGH,
    GRPO_EPS_LOW,
    LOG_RATIO_CLAMP,
    ClipParams,
    SteerParams,
    apply_method,
    get_method,
    kl_estimate,
    list_methods,
    method_loss,
    params_from_dict,
    params_sources,
    register_method,
    steer_weights,
)
from entropy_lens.tokens import TokenBatch

# ------------------------------------------------------------------------ defaults and sources


def test_reference_clip_defaults():
    assert (GRPO_EPS_LOW, GRPO_EPS_HIGH, GRPO_DUAL_CLIP, LOG_RATIO_CLAMP) == (0.2, 0.2, 10.0, 20.0)
    p = ClipParams()
    assert (p.eps_low, p.eps_high, p.dual_clip, p.log_ratio_clamp) == (0.2, 0.2, 10.0, 20.0)
    expect = {  # (eps_low, eps_high, dual_clip) per method
        "grpo": (0.2, 0.2, 10.0), "clip_higher": (0.2, 0.28, 10.0), "steer": (0.2, 0.28, 10.0),
        "gspo": (3e-4, 4e-4, None), "kl_cov": (math.inf, math.inf, None), "gppo": (0.2, 0.2, 10.0),
    }
    for name, bounds in expect.items():
        d = params_from_dict(name)
        assert (d.eps_low, d.eps_high, d.dual_clip) == bounds, name
        assert d.log_ratio_clamp == 20.0
    s = SteerParams()
    assert (s.entropy, s.mapping, s.omega, s.lambda_min, s.scope) == ("old", "exp", "code", 0.8, "micro")


@pytest.mark.parametrize("name", list_methods())
def test_every_parameter_default_has_a_source(name):
    src = params_sources(name)
    assert list(src) == [k for k in params_from_dict(name).to_dict()]
    empty = [k for k, v in src.items() if not v.strip()]
    assert not empty, f"{name}: no source for {empty}"
    for k, v in src.items():  # a paper id, a reference script or code, or a stated package choice
        assert "arXiv" in v or "verl" in v or "STEER" in v or v.startswith("package choice"), (name, k, v)


def test_methods_command_shows_sources():
    from typer.testing import CliRunner

    from entropy_lens_cli.app import app

    res = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    for text in ("clip_ratio_c = 10", "2507.18071", "kl_ref", "ref_logp", "run_exp.sh"):
        assert text in res.output


# ------------------------------------------------------------------------------ required inputs


def test_needs_are_declared_and_checked():
    assert get_method("kl_ref").needs == ("ref_logp",)
    assert get_method("psr_only").needs == ("reward",) and get_method("grpo").needs == ()
    assert get_method("w_reinforce").required_inputs() == ("reward",)
    assert get_method("w_reinforce").required_inputs(params_from_dict("w_reinforce", {"advantage": "grpo"})) == ()
    batch = make_batch(seed=30).replace(ref_logp=None)
    assert get_method("kl_ref").missing_inputs(batch) == ("ref_logp",)
    assert get_method("psr_only").missing_inputs(batch) == ()
    with pytest.raises(ValueError, match=r"kl_ref needs reference log-probs \(ref_logp\)"):
        apply_method("kl_ref", batch)

    @dataclass(frozen=True)
    class P(ClipParams):
        pass

    with pytest.raises(ValueError, match="unknown input"):
        register_method("tmp_needs_x", summary="x", params=P, needs=("value_head",))


def test_optional_token_fields_are_validated_and_round_trip():
    batch = make_batch(seed=31)
    with pytest.raises(ValueError, match="old_entropy has shape"):
        batch.replace(old_entropy=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ref_logp has shape"):
        batch.replace(ref_logp=torch.zeros(3))
    full = batch.replace(old_entropy=batch.entropy + 0.25)
    back = TokenBatch.from_frame(full.to_frame())
    torch.testing.assert_close(back.old_entropy[full.mask], full.old_entropy[full.mask])
    torch.testing.assert_close(back.ref_logp[full.mask], full.ref_logp[full.mask])
    plain = TokenBatch.from_frame(batch.replace(ref_logp=None).to_frame())
    assert plain.old_entropy is None and plain.ref_logp is None


# --------------------------------------------------------------------- rewards: W-REINFORCE, PSR, NSR


@pytest.mark.parametrize("rewards", [[1.0, -1.0], [1.0, 0.0]], ids=["pm1", "01"])
def test_w_reinforce_raw_advantage_for_both_reward_conventions(rewards):
    batch = make_batch(seed=32)
    B = batch.mask.shape[0]
    reward = torch.tensor([rewards[b % 2] for b in range(B)])
    batch = batch.replace(reward=reward)
    terms = apply_method("w_reinforce", batch, {"lam": 0.1}, ctx())
    for b in range(B):
        for t in range(batch.mask.shape[1]):
            want = (0.1 if b % 2 == 0 else -1.0) if batch.mask[b, t] else 0.0
            assert float(terms.adv[b, t]) == pytest.approx(want)
    assert torch.all(terms.weight == 1)


def test_w_reinforce_gives_signal_in_all_correct_and_all_wrong_groups():
    batch = make_batch(seed=33, off_policy=0.0)
    reward = torch.tensor([1.0] * 4 + [-1.0] * 4)  # group 0 all correct, group 1 all wrong
    batch = batch.replace(reward=reward, adv=torch.zeros_like(batch.adv))
    _, g, _ = loss_and_grads(batch, apply_method("w_reinforce", batch, None, ctx()))
    L = batch.n_tokens
    expect = torch.where(batch.mask, torch.where(reward[:, None] > 0, -0.1 / L, 1.0 / L), 0.0)
    torch.testing.assert_close(g, expect)  # on-policy: ∂ℓ/∂log p = −A'/L
    _, g_grpo, _ = loss_and_grads(batch, apply_method("w_reinforce", batch, {"advantage": "grpo"}, ctx()))
    assert torch.all(g_grpo == 0)


def test_psr_plus_nsr_is_w_reinforce_with_unit_lambda():
    batch = make_batch(seed=34, off_policy=0.3)
    batch = batch.replace(reward=torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0]))
    psr = apply_method("psr_only", batch, None, ctx())
    nsr = apply_method("nsr_only", batch, None, ctx())
    both = apply_method("w_reinforce", batch, {"lam": 1.0}, ctx())
    l_p, g_p, _ = loss_and_grads(batch, psr)
    l_n, g_n, _ = loss_and_grads(batch, nsr)
    l_w, g_w, _ = loss_and_grads(batch, both)
    torch.testing.assert_close(l_p + l_n, l_w)
    torch.testing.assert_close(g_p + g_n, g_w)
    correct = batch.mask & (batch.reward > 0.5)[:, None]
    assert torch.all(psr.weight[batch.mask & ~correct] == 0) and torch.all(psr.adv[correct] == 1)
    assert torch.all(nsr.weight[correct] == 0) and torch.all(nsr.adv[batch.mask & ~correct] == -1)
    assert torch.all(g_p[batch.mask & ~correct] == 0) and torch.all(g_n[correct] == 0)


# --------------------------------------------------------------------------------------- kl_ref


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_ref_penalty_matches_loop_and_finite_differences(estimator):
    batch = make_batch(seed=35).replace(adv=torch.zeros(8, 6))  # only the penalty moves the loss
    batch = batch.replace(**{k: getattr(batch, k).double() for k in ("logp", "old_logp", "ref_logp", "entropy")})
    terms = apply_method("kl_ref", batch, {"beta": 0.3, "estimator": estimator}, ctx())
    assert terms.penalty.kind == "kl_ref" and terms.touched.equal(batch.mask)

    def loop(logp):
        tot = 0.0
        for b, t in zip(*torch.nonzero(batch.mask, as_tuple=True)):
            x = float(batch.ref_logp[b, t] - logp[b, t])
            tot += 0.3 * (-x if estimator == "k1" else math.exp(x) - x - 1.0)
        return tot / batch.n_tokens

    x = batch.logp.clone().requires_grad_(True)
    loss = method_loss(terms, x, batch.old_logp, batch.adv, batch.mask)
    assert float(loss.detach()) == pytest.approx(loop(batch.logp), rel=1e-12)
    loss.backward()
    h = 1e-6
    for b, t in [(0, 0), (0, 5), (3, 1)]:
        up, dn = batch.logp.clone(), batch.logp.clone()
        up[b, t] += h
        dn[b, t] -= h
        assert float(x.grad[b, t]) == pytest.approx((loop(up) - loop(dn)) / (2 * h), rel=1e-6)
    # the closed-form ∂penalty/∂log p (what compare folds into the coefficient) equals autograd × L
    g = terms.penalty.dlogp(batch.logp, batch.old_logp)
    torch.testing.assert_close(torch.where(batch.mask, g, 0.0) / batch.n_tokens, x.grad)


def test_kl_estimators_values():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    x = ref - logp
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.exp(x) - x - 1)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_kl_ref_rows_cut_the_reference():
    batch = make_batch(seed=36)
    terms = apply_method("kl_ref", batch, None, ctx())
    sub = terms.rows(slice(2, 4), 5)
    assert torch.equal(sub.penalty.ref_logp, batch.ref_logp[2:4, :5])


# ----------------------------------------------------------------------------- adaptive_entropy


@pytest.mark.parametrize("target,beta0", [(2.0, 0.001), (0.1, 0.0), (0.1, 0.004)])
def test_adaptive_entropy_coefficient_and_gradient(target, beta0):
    batch = make_batch(seed=37)
    h = float(batch.entropy[batch.mask].double().mean())
    assert 0.1 < h < 2.0
    beta = min(max(beta0 + 0.05 * (target - h), 0.0), 0.5)  # plain float reference of the rule
    terms = apply_method("adaptive_entropy", batch, {"target": target, "gain": 0.05, "beta0": beta0,
                                                     "beta_max": 0.5}, ctx())
    assert terms.penalty.kind == "entropy_bonus"
    assert terms.penalty.coef == pytest.approx(beta, rel=1e-6, abs=1e-12)
    assert bool(terms.touched.any()) == (beta > 0)
    _, _, g_ent = loss_and_grads(batch, terms)
    torch.testing.assert_close(g_ent, torch.where(batch.mask, -beta / batch.n_tokens, 0.0))
    capped = apply_method("adaptive_entropy", batch.replace(entropy=torch.zeros_like(batch.entropy)),
                          {"target": 2.0, "gain": 1.0, "beta_max": 0.02}, ctx())
    assert capped.penalty.coef == pytest.approx(0.02)


# ----------------------------------------------------------------------------------- gspo, gppo


def test_gspo_is_grpo_on_policy_with_equal_bounds_and_uses_sequence_ratio():
    batch = make_batch(seed=38, off_policy=0.0)
    same = {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0}
    terms = apply_method("gspo", batch, same, ctx())
    assert terms.ratio_level == "sequence" and not terms.touched.any()
    l_g, g_g, _ = loss_and_grads(batch, terms)
    l_r, g_r, _ = loss_and_grads(batch, apply_method("grpo", batch, None, ctx()))
    torch.testing.assert_close(l_g, l_r)
    torch.testing.assert_close(g_g, g_r)
    off = make_batch(seed=38, off_policy=0.3)
    t_off = apply_method("gspo", off, None, ctx())
    assert t_off.touched.equal(off.mask)
    _, g, _ = loss_and_grads(off, t_off)
    s = torch.exp(torch.where(off.mask, off.logp - off.old_logp, 0.0).sum(-1) / off.mask.sum(-1))
    active = ((off.adv[:, 0] > 0) & (s <= 1 + 4e-4)) | ((off.adv[:, 0] < 0) & (s >= 1 - 3e-4))
    expect = torch.where(off.mask & active[:, None], -off.adv * s[:, None] / off.n_tokens, 0.0)
    torch.testing.assert_close(g, expect)


def test_gppo_touches_and_revives_clipped_tokens():
    batch = make_batch(seed=39, B=8, T=30, off_policy=0.6)
    terms = apply_method("gppo", batch, {"beta_low": 0.5, "beta_high": 0.75}, ctx())
    r, a = batch.ratio, batch.adv
    up = batch.mask & (a > 0) & (r > 1.2)
    down = batch.mask & (a < 0) & (r < 0.8)
    assert up.any() and down.any()
    assert torch.equal(terms.touched, up | down)
    _, g, _ = loss_and_grads(batch, terms)
    L = batch.n_tokens
    torch.testing.assert_close(g[up], (-0.75 * 1.2 * a / L)[up])
    torch.testing.assert_close(g[down], (-0.5 * 0.8 * a / L)[down])


# ------------------------------------------------------------------------ STEER binary and H_old


def ref_binary(om_abs, mask, tau, lmin):
    B, T = len(om_abs), len(om_abs[0])
    vals = [om_abs[b][t] for b in range(B) for t in range(T) if mask[b][t]]
    cut = tau * max(max(vals), 0.02)
    return torch.tensor([[(lmin if om_abs[b][t] >= cut else 1.0) if mask[b][t] else 1.0 for t in range(T)]
                         for b in range(B)])


@pytest.mark.parametrize("tau", [0.3, 0.5, 1.0])
def test_steer_binary_mapping_matches_loop_reference(tau):
    batch = make_batch(seed=40, off_policy=0.4)
    p = {"mapping": "binary", "threshold": tau, "lambda_min": 0.7, "scope": "batch"}
    terms = apply_method("steer", batch, p, ctx())
    ref = ref_binary(ref_omega(batch, "code", False), batch.mask.tolist(), tau, 0.7)
    torch.testing.assert_close(terms.weight, ref)
    w = terms.weight[batch.mask]
    assert torch.all(torch.isclose(w, torch.tensor(0.7)) | (w == 1.0)) and (w < 1).any()
    if tau == 1.0:
        assert int((terms.weight[batch.mask] < 1).sum()) == 1  # only the largest |ω|
    w = steer_weights(torch.tensor([[0.001, 0.009, 0.011]]), torch.ones(1, 3, dtype=torch.bool),
                      torch.tensor([0]), "binary", 0.8, 1.0, 0.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.8]]))  # floor: cut = 0.5·0.02
    with pytest.raises(ValueError, match="lambda_max must be 1"):
        SteerParams(mapping="binary", lambda_max=1.2)


def test_steer_reads_old_entropy_by_default():
    batch = make_batch(seed=41)
    h_old = batch.entropy * 0.5 + 0.1
    with_old = batch.replace(old_entropy=h_old)
    w_old = apply_method("steer", with_old, {"scope": "batch"}, ctx()).weight
    w_as_cur = apply_method("steer", batch.replace(entropy=h_old), {"scope": "batch", "entropy": "current"}, ctx())
    torch.testing.assert_close(w_old, w_as_cur.weight)  # 'old' reads old_entropy
    w_cur = apply_method("steer", with_old, {"scope": "batch", "entropy": "current"}, ctx()).weight
    w_fallback = apply_method("steer", batch, {"scope": "batch"}, ctx()).weight
    torch.testing.assert_close(w_cur, w_fallback)  # no old_entropy: 'old' falls back to entropy
    assert not torch.equal(w_old, w_cur)
    assert wants_old_entropy("steer", SteerParams()) and wants_old_entropy("steer", SteerParams(omega="paper"))
    assert not wants_old_entropy("steer", SteerParams(entropy="current"))
    assert not wants_old_entropy("fork_tokens", params_from_dict("fork_tokens"))
