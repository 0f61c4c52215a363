"""Value tests of entropy_lens.objective that mutation testing showed missing (docs/testing.md):
the clipped surrogate's value and its gradient w.r.t. log p in every clip zone and mode, the
sequence ratio, the log-ratio clamp and every aggregation, against per-token references written
with Python floats from the formulas of docs/science.md §1."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lens.objective import (
    aggregate,
    clip_active,
    clipped_surrogate,
    sequence_log_ratio,
    surrogate_dlogp,
)

# log r per token and A: inside the clip, above 1 + ε_high, below 1 − ε_low, above the dual clip,
# for both signs of A, and A = 0. Row 1 ends with a padding token.
LOG_R = [[0.05, 0.5, -0.5, 1.6], [-0.05, 0.4, 2.0, 0.3]]
ADV = [[1.5, 0.8, -0.7, -1.2], [-0.6, -0.9, 0.0, 2.0]]
MASK = [[True, True, True, True], [True, True, True, False]]
OLD = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.5, -2.5, -0.2]]
EL, EH, C = 0.2, 0.28, 3.0


def tensors():
    old = torch.tensor(OLD, dtype=torch.float64)
    logp = (old + torch.tensor(LOG_R, dtype=torch.float64)).requires_grad_(True)
    return logp, old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK)


def ref_token(lr, a, el=EL, eh=EH, c=C, kappa=None, mode="standard", bl=1.0, bh=1.0):
    """(ℓ, ∂ℓ/∂log p) of one token at log-ratio ``lr``; ∂ is w.r.t. this token's log p."""
    grad_r = 1.0
    if kappa is not None and abs(lr) > kappa:
        lr, grad_r = math.copysign(kappa, lr), 0.0
    r = math.exp(lr)
    lo, hi = 1 - el, 1 + eh
    if mode == "standard":
        unclipped, clipped = -a * r, -a * min(max(r, lo), hi)
        loss, g = (unclipped, -a * r * grad_r) if unclipped >= clipped else (clipped, 0.0)
    elif a > 0 and r > hi:
        loss, g = -a * bh * hi, -a * bh * hi * grad_r
    elif a < 0 and r < lo:
        loss, g = -a * bl * lo, -a * bl * lo * grad_r
    else:
        loss, g = -a * r, -a * r * grad_r
    if c is not None and a < 0 and -a * c < loss:
        loss, g = -a * c, 0.0
    return loss, g


def check(expected, **kwargs):
    logp, old, adv, _ = tensors()
    loss = clipped_surrogate(logp, old, adv, EL, EH, kwargs.pop("dual_clip", C), **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), torch.tensor([[e[0] for e in row] for row in expected], dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.tensor([[e[1] for e in row] for row in expected], dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)


def test_standard_clip_values_and_gradients_in_every_zone():
    check([[ref_token(lr, a) for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)])
    check([[ref_token(lr, a, c=None) for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)], dual_clip=None)
    # the case reaches every zone: A>0 clipped above, A<0 clipped below, the dual clip, A = 0
    r = [[math.exp(x) for x in row] for row in LOG_R]
    assert r[0][1] > 1 + EH and ADV[0][1] > 0 and r[0][2] < 1 - EL and ADV[0][2] < 0 and r[0][3] > C > 1 + EH


def test_log_ratio_clamp():
    expected = [[ref_token(lr, a, kappa=0.45) for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)]
    check(expected, log_ratio_clamp=0.45)
    assert expected[0][3] != ref_token(LOG_R[0][3], ADV[0][3])  # the clamp changes this token
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"^log_ratio_clamp must be > 0 or None, got {bad!r}$"):
            clipped_surrogate(*tensors()[:3], log_ratio_clamp=bad)


def test_gradient_preserving_clip_values_and_gradients():
    expected = [[ref_token(lr, a, mode="gp", bl=0.5, bh=2.0) for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)]
    check(expected, clip_mode="gradient_preserving", beta_low=0.5, beta_high=2.0)
    gppo = [[ref_token(lr, a, mode="gp") for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)]
    check(gppo, clip_mode="gradient_preserving")
    assert gppo[0][1][1] == pytest.approx(-0.8 * 1.28)  # the clipped token keeps a gradient


def test_sequence_ratio_values_and_gradients():
    logp, old, _, mask = tensors()
    mean = [sum(x for x, m in zip(rl, mr) if m) / sum(mr) for rl, mr in zip(LOG_R, MASK)]
    s = sequence_log_ratio(logp, old, mask)
    torch.testing.assert_close(s.detach(), torch.tensor([[mean[0]] * 4, [mean[1]] * 4], dtype=torch.float64))
    (g,) = torch.autograd.grad(s.sum(), logp)
    assert torch.equal(g, torch.ones_like(g))  # gradient 1 per token: the mean is stop-gradient
    every = sequence_log_ratio(logp, old)  # no mask: every position
    torch.testing.assert_close(every.detach()[1], torch.full((4,), sum(LOG_R[1]) / 4, dtype=torch.float64))
    empty = sequence_log_ratio(logp, old, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(empty.detach(), torch.zeros(2, 4, dtype=torch.float64))
    expected = [[ref_token(mean[b], a) for a in ADV[b]] for b in range(2)]
    check(expected, ratio_level="sequence", mask=mask)


def test_surrogate_dlogp_equals_the_reference_gradient():
    logp, old, adv, _ = tensors()
    g = surrogate_dlogp(logp, old, adv, EL, EH, C)
    exp = [[ref_token(lr, a)[1] for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)]
    torch.testing.assert_close(g, torch.tensor(exp, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert not g.requires_grad and logp.grad is None
    gp = surrogate_dlogp(logp, old, adv, EL, EH, None, clip_mode="gradient_preserving", beta_high=2.0)
    exp = [[ref_token(lr, a, c=None, mode="gp", bh=2.0)[1] for lr, a in zip(rl, ra)] for rl, ra in zip(LOG_R, ADV)]
    torch.testing.assert_close(gp, torch.tensor(exp, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_clip_active_zones_and_per_token_bounds():
    r = torch.tensor([1.1, 1.3, 0.85, 0.75, 3.5, 3.5, 1.0])
    a = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 0.0])
    assert clip_active(r, a, EL, EH).tolist() == [True, False, True, False, True, False, True]
    assert clip_active(r, a, EL, EH, C).tolist() == [True, False, True, False, False, False, True]
    assert clip_active(r, a).tolist() == [True, False, True, False, True, False, True]  # defaults 0.2 / 0.2
    # exactly on a bound is still inside
    assert clip_active(torch.tensor([1.25, 0.75, 3.0]), torch.tensor([1.0, -1.0, -1.0]), 0.25, 0.25, 3.0).tolist() == [True] * 3
    eh = torch.tensor([0.05, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2])
    assert clip_active(r, a, EL, eh).tolist() == [False, True, True, False, True, False, True]


def test_bad_arguments_name_the_problem():
    logp, old, adv, _ = tensors()
    with pytest.raises(ValueError, match=r"^dual_clip must be > 1 \(got 1\.0\)$"):
        clipped_surrogate(logp, old, adv, dual_clip=1.0)
    assert torch.isfinite(clipped_surrogate(logp, old, adv, dual_clip=1.0001)).all()
    with pytest.raises(ValueError, match=r"^ratio_level must be one of token, sequence, got 'seq'$"):
        clipped_surrogate(logp, old, adv, ratio_level="seq")
    with pytest.raises(ValueError, match=r"^clip_mode must be one of standard, gradient_preserving, got 'gp'$"):
        clipped_surrogate(logp, old, adv, clip_mode="gp")
    with pytest.raises(ValueError, match=r"^unknown loss aggregation 'sum'; choose one of: token-mean, "
                                         r"seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm$"):
        aggregate(logp, torch.tensor(MASK), "sum")


def test_every_aggregation_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, 99.0], [7.0, 7.0, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    assert aggregate(x, mask, "token-mean").item() == pytest.approx(17.0 / 5)
    assert aggregate(x, mask).item() == pytest.approx(17.0 / 5)
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 5.5) / 2)  # empty row ignored
    assert aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx((6.0 + 11.0) / 2)
    assert aggregate(x, mask, "seq-mean-token-sum-norm").item() == pytest.approx(17.0 / (3 * 4))
    assert aggregate(x, mask, "seq-mean-token-sum-norm", 10).item() == pytest.approx(17.0 / 30)
    none = torch.zeros(3, 4, dtype=torch.bool)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert aggregate(x, none, mode).item() == 0.0
    one = torch.tensor([[False, True, False, False], [False] * 4, [False] * 4])
    assert aggregate(x, one, "token-mean").item() == 2.0
    assert aggregate(x, one, "seq-mean-token-mean").item() == 2.0
    assert aggregate(x, one, "seq-mean-token-sum").item() == 2.0


def test_zero_advantage_tokens_are_never_clipped():
    """I_clip is about A > 0 or A < 0: a token with A = 0 keeps I_clip = 1 at any ratio; with an
    unbounded upper clip (ε_high = inf) only the dual clip removes A < 0 tokens, never A > 0 ones."""
    r = torch.tensor([0.1, 1.5, 5.0, 5.0, 5.0])
    a = torch.tensor([0.0, 0.0, 0.0, 0.5, -0.5])
    assert clip_active(r, a, EL, EH, C).tolist() == [True, True, True, False, False]
    assert clip_active(r, a, EL, float("inf"), C).tolist() == [True, True, True, True, False]


def test_gradient_preserving_clip_at_the_bounds_and_for_small_positive_advantages():
    # r exactly on a bound (ε = 0: bound 1 = e^0) is not beyond it: the plain −A·r, not β times it
    logp = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss = clipped_surrogate(logp, old, adv, 0.0, 0.0, None, clip_mode="gradient_preserving", beta_low=0.5, beta_high=2.0)
    assert loss.tolist() == [-1.0, 1.0]
    # 0 < A < 1 below 1 − ε_low is inside the clip for A > 0: −A·r with gradient −A·r
    lp = torch.tensor([-0.5], dtype=torch.float64, requires_grad=True)
    out = clipped_surrogate(lp, torch.zeros(1, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64), EL, EH,
                            None, clip_mode="gradient_preserving", beta_low=0.5)
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert out.item() == pytest.approx(-0.5 * math.exp(-0.5)) and g.item() == pytest.approx(-0.5 * math.exp(-0.5))


def test_log_ratio_clamp_acts_on_both_sides():
    lp = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    out = clipped_surrogate(lp, torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64),
                            0.9, float("inf"), None, log_ratio_clamp=0.5)
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert out.tolist() == pytest.approx([-math.exp(-0.5), math.exp(0.5)])
    assert g.tolist() == [0.0, 0.0]  # clamped: no gradient


def test_sequence_ratio_of_a_one_token_row_is_that_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -1.0, -3.5], [-0.25, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    s = sequence_log_ratio(logp, old, mask)
    assert s[:, 0].tolist() == pytest.approx([0.0, -0.25])


def test_aggregate_keeps_the_loss_dtype():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[True, False], [True, True]])
    out = aggregate(x, mask)
    assert out.dtype == torch.bfloat16 and out.item() == pytest.approx(8.0 / 3, rel=1e-2)
