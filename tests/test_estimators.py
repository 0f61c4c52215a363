"""Finite-difference golden tests of the closed-form ΔH estimators on a tabular softmax policy."""


import numpy as np
import pytest
import torch

from entropy_lens import estimators as est
from entropy_lens.objective import clip_active, clipped_surrogate


def entropy_of(z: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(z, -1)
    return -(logq.exp() * logq).sum(-1)


def tabular_case(seed=0, S=10, V=12, off_policy=True):
    """States with logits Z [S, V] as parameters, one sampled token per state, mixed advantages."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(S, V, generator=g, dtype=torch.float64) * 2.0
    a = torch.randint(0, V, (S,), generator=g)
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    logq = torch.log_softmax(Z, -1)
    logp = logq.gather(-1, a[:, None]).squeeze(-1)
    # behaviour policy: slightly different, so ratios differ from 1 and some tokens are clipped
    old_logp = logp + (torch.randn(S, generator=g, dtype=torch.float64) * 0.3 if off_policy else 0.0)
    return Z, a, adv, old_logp


def loss_of(Z, a, adv, old_logp, eps=0.2):
    logp = torch.log_softmax(Z, -1).gather(-1, a[:, None]).squeeze(-1)
    return clipped_surrogate(logp, old_logp, adv, eps, eps, dual_clip=None).mean()  # token-mean, L = S


def sgd_step(Z, a, adv, old_logp, lr, only_sampled=False):
    Zp = Z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(Zp, a, adv, old_logp), Zp)
    if only_sampled:
        g = torch.zeros_like(g).scatter(-1, a[:, None], g.gather(-1, a[:, None]))
    return Z - lr * g


def stats(Z, a, old_logp, adv):
    logq = torch.log_softmax(Z, -1)
    q = logq.exp()
    logp = logq.gather(-1, a[:, None]).squeeze(-1)
    H = -(q * logq).sum(-1)
    ratio = torch.exp(logp - old_logp)
    ica = clip_active(ratio, adv, 0.2, 0.2).double()
    return logp, H, (q * q).sum(-1), (q * q * logq).sum(-1), ratio, ica


def errors(pred_fn, only_sampled, lrs, seed=0):
    Z, a, adv, old = tabular_case(seed)
    S = Z.shape[0]
    out = []
    for lr in lrs:
        actual = entropy_of(sgd_step(Z, a, adv, old, lr, only_sampled)) - entropy_of(Z)
        pred = pred_fn(*stats(Z, a, old, adv), adv, lr, S)
        out.append(float((pred - actual).abs().max()))
    return out


def test_omega_paper_matches_single_logit_step_to_second_order():
    def pred(logp, H, sp2, sp2l, r, ica, adv, lr, L):
        return est.omega_paper(logp, H, adv, r, ica, lr, L)

    e = errors(pred, True, [0.4, 0.2, 0.1])
    assert e[0] / e[1] == pytest.approx(4.0, rel=0.15) and e[1] / e[2] == pytest.approx(4.0, rel=0.15), e


def test_dh_all_logit_matches_full_policy_gradient_step_to_second_order():
    def pred(logp, H, sp2, sp2l, r, ica, adv, lr, L):
        return est.dh_all_logit(logp, H, sp2, sp2l, adv, r, ica, lr, L)

    e = errors(pred, False, [0.4, 0.2, 0.1])
    assert e[0] / e[1] == pytest.approx(4.0, rel=0.15) and e[1] / e[2] == pytest.approx(4.0, rel=0.15), e


def test_omega_paper_is_wrong_at_first_order_for_the_full_step():
    """Sanity: the single-logit form is not exact for the full softmax step (error ∝ η)."""
    def pred(logp, H, sp2, sp2l, r, ica, adv, lr, L):
        return est.omega_paper(logp, H, adv, r, ica, lr, L)

    e = errors(pred, False, [0.2, 0.1])
    assert e[0] / e[1] == pytest.approx(2.0, rel=0.2), e


def test_clipped_tokens_do_not_move_and_are_predicted_zero():
    Z, a, adv, old = tabular_case(3)
    logp, H, sp2, sp2l, r, ica = stats(Z, a, old, adv)
    assert (ica == 0).any() and (ica == 1).any()
    dead = ica == 0
    actual = entropy_of(sgd_step(Z, a, adv, old, 0.1)) - entropy_of(Z)
    assert torch.all(actual[dead].abs() < 1e-15)
    assert torch.all(est.dh_all_logit(logp, H, sp2, sp2l, adv, r, ica, 0.1, len(a))[dead] == 0)
    assert torch.all(est.omega_paper(logp, H, adv, r, ica, 0.1, len(a))[dead] == 0)


def test_dh_jvp_equals_dh_all_logit_in_the_tabular_case():
    Z, a, adv, old = tabular_case(1)
    lr = 0.05
    delta = {"Z": sgd_step(Z, a, adv, old, lr) - Z}
    tangent = est.dh_jvp(lambda p: entropy_of(p["Z"]), {"Z": Z}, delta)
    logp, H, sp2, sp2l, r, ica = stats(Z, a, old, adv)
    assert torch.allclose(tangent, est.dh_all_logit(logp, H, sp2, sp2l, adv, r, ica, lr, len(a)), atol=1e-12)


def test_omega_code_relation_to_paper_form():
    """ω_code = paper form ÷ p, without I_clip and η/L, opposite sign (on-policy: H_old = H)."""
    Z, a, adv, _ = tabular_case(2, off_policy=False)
    logq = torch.log_softmax(Z, -1)
    logp, H = logq.gather(-1, a[:, None]).squeeze(-1), entropy_of(Z)
    lr, L = 0.3, len(a)
    paper = est.omega_paper(logp, H, adv, 1.0, 1.0, lr, L)
    code = est.omega_code(logp, logp, H, adv)
    assert torch.allclose(paper, -(lr / L) * code * logp.exp(), atol=1e-14)
    assert torch.allclose(est.scaled_prediction("omega_code", code, lr, L) * logp.exp(), paper, atol=1e-14)


def test_quadrant_signs_match_first_order_sign():
    Z, a, adv, _ = tabular_case(4, S=200, V=20, off_policy=False)
    logp, H = torch.log_softmax(Z, -1).gather(-1, a[:, None]).squeeze(-1), entropy_of(Z)
    q = est.quadrant(logp, H, adv)
    om = est.omega_paper(logp, H, adv, 1.0, 1.0, 0.1, 200)
    assert set(q.tolist()) == {1, 2, 3, 4}
    assert torch.all(om[(q == 1) | (q == 3)] < 0) and torch.all(om[(q == 2) | (q == 4)] > 0)
    assert est.quadrant(logp, H, torch.zeros_like(adv)).eq(0).all()


def test_cov_term_sums_to_covariance():
    g = torch.Generator().manual_seed(0)
    logp, adv = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    c = est.cov_term(logp, adv, mask)
    x, y = logp[mask].numpy(), adv[mask].numpy()
    assert float(c.sum() / mask.sum()) == pytest.approx(float(np.cov(x, y, bias=True)[0, 1]), abs=1e-12)
    assert torch.all(c[~mask] == 0)
    assert float(est.dh_cov(logp, adv, mask, 0.5).sum()) == pytest.approx(-0.5 * float(np.cov(x, y, bias=True)[0, 1]), abs=1e-12)
