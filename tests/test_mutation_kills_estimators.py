"""Value tests of entropy_lens.estimators that mutation testing showed missing (docs/testing.md):
every column of ``closed_form_columns`` against a per-token scalar reference written from the
formulas of docs/science.md §2 with Python floats, the effective coefficient, the edge cases of
the normalisers and the quadrant boundaries."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lens import estimators as est
from entropy_lens.tokens import TokenBatch

# (logp, old_logp, entropy, sum_p2, sum_p2_logp, adv) per token; row 1 ends with two padding tokens.
# The tokens cover every clip zone with eps_low 0.2, eps_high 0.28, dual clip 3: A>0 inside,
# A>0 above 1+ε_high, A<0 inside, A<0 below 1−ε_low, A<0 above the dual clip c, A = 0.
ROWS = [
    [(-0.3, -0.3, 1.1, 0.55, -0.40, 1.5), (-1.2, -1.6, 2.0, 0.30, -0.70, 0.8),
     (-2.5, -2.4, 0.9, 0.60, -0.20, -0.7), (-0.9, -0.4, 1.4, 0.45, -0.50, -1.1)],
    [(-0.2, -1.5, 0.7, 0.70, -0.15, -0.6), (-3.0, -3.1, 2.6, 0.20, -0.90, 0.0),
     (-0.5, -9.0, 5.0, 0.10, -0.10, 4.0), (-7.0, -0.1, 3.0, 0.90, -0.30, -5.0)],
]
VALID = [[True, True, True, True], [True, True, False, False]]
EPS_LOW, EPS_HIGH, DUAL, LR = 0.2, 0.28, 3.0, 0.37


def make_batch(dtype=torch.float64) -> TokenBatch:
    cols = [torch.tensor([[tok[i] for tok in row] for row in ROWS], dtype=dtype) for i in range(6)]
    mask = torch.tensor(VALID)
    return TokenBatch(
        token_ids=torch.arange(8).reshape(2, 4), mask=mask, logp=cols[0], old_logp=cols[1], entropy=cols[2],
        sum_p2=cols[3], sum_p2_logp=cols[4], adv=cols[5], group_id=torch.zeros(2, dtype=torch.long),
        reward=torch.zeros(2, dtype=dtype),
    )


def reference_columns(dual=DUAL):
    """Per-token scalar reference of every closed-form column (0 / False on padding)."""
    valid = [tok for row, vrow in zip(ROWS, VALID) for tok, v in zip(row, vrow) if v]
    L = len(valid)
    mean_lp = sum(t[0] for t in valid) / L
    mean_a = sum(t[5] for t in valid) / L
    out = {k: [[0.0] * 4 for _ in range(2)] for k in ("ratio", "omega_paper", "omega_code", "dh_all_logit", "dh_cov")}
    out["clip_active"] = [[False] * 4 for _ in range(2)]
    out["quadrant"] = [[0] * 4 for _ in range(2)]
    for b, row in enumerate(ROWS):
        for t, (lp, olp, h, sp2, sp2l, a) in enumerate(row):
            if not VALID[b][t]:  # every float column, the ratio included, is 0 on padding
                continue
            r = math.exp(lp - olp)
            p = math.exp(lp)
            dead = (a > 0 and r > 1 + EPS_HIGH) or (a < 0 and r < 1 - EPS_LOW) or (dual is not None and a < 0 and r > dual)
            ica = 0.0 if dead else 1.0
            out["ratio"][b][t] = r
            out["clip_active"][b][t] = not dead
            out["omega_paper"][b][t] = -(LR / L) * ica * a * r * p * (1 - p) * (lp + h)
            out["omega_code"][b][t] = a / math.exp(olp) * p * (1 - p) * (lp + h)
            out["dh_all_logit"][b][t] = -(LR / L) * ica * a * r * (p * (lp + h) - (sp2l + h * sp2))
            out["dh_cov"][b][t] = -(LR / L) * (lp - mean_lp) * (a - mean_a)
            likely = lp + h > 0
            out["quadrant"][b][t] = 0 if a == 0 else (1 if likely else 2) if a > 0 else (4 if likely else 3)
    return out


def test_closed_form_columns_equal_the_scalar_formulas_token_by_token():
    batch = make_batch()
    # padding holds values that would change every column if it were not masked out
    cols = est.closed_form_columns(batch, LR, EPS_LOW, EPS_HIGH, DUAL)
    ref = reference_columns()
    assert set(cols) == {"ratio", "clip_active", "omega_paper", "omega_code", "dh_all_logit", "dh_cov", "quadrant"}
    for name in ("ratio", "omega_paper", "omega_code", "dh_all_logit", "dh_cov"):
        assert cols[name].dtype == torch.float64, name
        torch.testing.assert_close(cols[name], torch.tensor(ref[name], dtype=torch.float64), rtol=1e-12, atol=1e-15, msg=name)
    assert cols["clip_active"].dtype == torch.bool
    assert cols["clip_active"].tolist() == ref["clip_active"]
    assert cols["quadrant"].dtype == torch.int8
    assert cols["quadrant"][batch.mask].tolist() == [q for row, v in zip(ref["quadrant"], VALID) for q, ok in zip(row, v) if ok]
    # the case exercises every zone: clipped and unclipped tokens of both signs, and the dual clip
    assert cols["clip_active"].tolist() == [[True, False, True, False], [False, True, False, False]]


def test_closed_form_columns_without_dual_clip_keep_the_high_ratio_negative_token():
    cols = est.closed_form_columns(make_batch(), LR, EPS_LOW, EPS_HIGH, None)
    ref = reference_columns(dual=None)
    assert cols["clip_active"].tolist() == ref["clip_active"]
    assert cols["clip_active"][1, 0].item() is True  # A<0, r = e^{1.3} > 1: only the dual clip removes it
    torch.testing.assert_close(cols["omega_paper"], torch.tensor(ref["omega_paper"], dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_closed_form_columns_keep_the_batch_dtype():
    """float32 batches give float32 columns (η/L is not rounded through another dtype)."""
    cols = est.closed_form_columns(make_batch(torch.float32), LR, EPS_LOW, EPS_HIGH, DUAL)
    ref = reference_columns()
    for name in ("omega_paper", "dh_all_logit", "dh_cov"):
        assert cols[name].dtype == torch.float32
        torch.testing.assert_close(cols[name], torch.tensor(ref[name], dtype=torch.float32), rtol=2e-6, atol=1e-9)


def test_normalisers_with_no_or_one_valid_token():
    lp, h, a = torch.tensor([-0.5]), torch.tensor([1.2]), torch.tensor([2.0])
    p = math.exp(-0.5)
    one = -0.3 * 2.0 * p * (1 - p) * (-0.5 + 1.2)  # η/L with L = 1
    for n in (0, 1):  # L = 0 is read as 1 (no division by zero)
        assert est.omega_paper(lp, h, a, 1.0, 1.0, 0.3, n).item() == pytest.approx(one, rel=1e-6)
        assert est.scaled_prediction("omega_code", torch.tensor([2.0]), 0.3, n).item() == pytest.approx(-0.6, rel=1e-6)
    assert est.omega_paper(lp, h, a, 1.0, 1.0, 0.3, 2).item() == pytest.approx(one / 2, rel=1e-6)
    bracket = p * (-0.5 + 1.2) - (-0.2 + 1.2 * 0.4)
    for n in (0, 1):
        got = est.dh_all_logit(lp, h, torch.tensor([0.4]), torch.tensor([-0.2]), a, 1.5, 1.0, 0.3, n)
        assert got.item() == pytest.approx(-0.3 * 2.0 * 1.5 * bracket, rel=1e-6)
    # scaled_prediction leaves every other estimator as it is
    col = torch.tensor([0.25, -1.0])
    for name in ("omega_paper", "dh_all_logit", "dh_cov", "dh_jvp"):
        assert torch.equal(est.scaled_prediction(name, col, 0.3, 7), col)
    assert torch.allclose(est.scaled_prediction("omega_code", col, 0.3, 3), -0.1 * col)


def test_cov_term_and_dh_cov_with_one_and_no_valid_token():
    logp = torch.tensor([[-0.5, -2.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 3.0]], dtype=torch.float64)
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert torch.equal(est.cov_term(logp, adv, none), torch.zeros(1, 3, dtype=torch.float64))
    assert torch.equal(est.dh_cov(logp, adv, none, 0.5), torch.zeros(1, 3, dtype=torch.float64))
    two = torch.tensor([[True, True, False]])
    # means over the two valid tokens: log p −1.25, A 0 → c = (0.75·1, −0.75·−1, 0)
    assert est.cov_term(logp, adv, two).tolist() == [[0.75, 0.75, 0.0]]
    assert est.dh_cov(logp, adv, two, 0.5).tolist() == [[-0.1875, -0.1875, 0.0]]
    one = torch.tensor([[False, True, False]])  # one token is its own mean: c = 0, also on it
    assert est.cov_term(logp, adv, one).tolist() == [[0.0, 0.0, 0.0]]
    assert est.dh_cov(logp, adv, one, 0.5).tolist() == [[0.0, 0.0, 0.0]]


def test_quadrant_boundaries_and_dtype():
    # p = e^{−H} exactly (log p + H = 0) is rare; A = 0 is Q0 whatever p is
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -0.5, -2.0, -0.5, -2.0, -0.5])
    ent = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = torch.tensor([1.0, -1.0, 0.0, 1e-9, 0.5, 0.5, -0.5, -0.5, 0.0])
    q = est.quadrant(logp, ent, adv)
    assert q.dtype == torch.int8
    assert q.tolist() == [2, 3, 0, 2, 1, 2, 4, 3, 0]
    assert est.entropy_factor(torch.tensor([-1.5]), torch.tensor([2.0])).item() == pytest.approx(0.5)


def test_probability_factor_values():
    lp = torch.tensor([math.log(0.25), math.log(0.9)], dtype=torch.float64)
    assert torch.allclose(est.probability_factor(lp), torch.tensor([0.1875, 0.09], dtype=torch.float64))
    assert torch.allclose(est.probability_factor(lp, 2.0), torch.tensor([0.375, 0.18], dtype=torch.float64))
    ratio = torch.tensor([0.5, 3.0], dtype=torch.float64)
    assert torch.allclose(est.probability_factor(lp, ratio), torch.tensor([0.09375, 0.27], dtype=torch.float64))


def test_effective_coefficient_and_penalty_coefficient_values():
    w = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.25, 9.0]], dtype=torch.float32)
    adv = torch.tensor([[2.0, -1.0, 0.5], [0.0, 4.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    coef = est.effective_coefficient(w, adv, mask)
    assert coef.dtype == torch.float64
    assert coef.tolist() == [[1.0, -1.0, 1.0], [0.0, 1.0, 0.0]]
    g = torch.tensor([[0.2, -0.4, 0.0], [1.0, 0.5, 3.0]], dtype=torch.float64)
    r = torch.tensor([[2.0, 0.5, 1.0], [4.0, 1.0, 1.0]], dtype=torch.float64)
    pen = est.penalty_coefficient(g, r, mask)
    assert pen.tolist() == [[-0.1, 0.8, 0.0], [-0.25, -0.5, 0.0]]
    coef = est.effective_coefficient(w, adv, mask, ratio=r, dlogp=g)
    torch.testing.assert_close(coef, torch.tensor([[0.9, -0.2, 1.0], [-0.25, 0.5, 0.0]], dtype=torch.float64))
    # the coefficient has the advantage's dtype: float64 weights are rounded to a float32 advantage
    w64 = torch.tensor([[1.0 + 2.0**-40]], dtype=torch.float64)
    coef = est.effective_coefficient(w64, torch.tensor([[1.0]]), torch.tensor([[True]]))
    assert coef.dtype == torch.float32 and coef.item() == 1.0


def test_dh_jvp_holds_the_unmoved_parameters_fixed_and_refuses_an_empty_update():
    a = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)

    def entropy_fn(p):
        z = p["a"] * p["b"]
        logq = torch.log_softmax(z, -1)
        return -(logq.exp() * logq).sum(-1, keepdim=True)

    da = torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64)
    # reference: directional derivative of H along (Δa, 0) by central differences
    h = 1e-6
    fd = (entropy_fn({"a": a + h * da, "b": b}) - entropy_fn({"a": a - h * da, "b": b})) / (2 * h)
    got = est.dh_jvp(entropy_fn, {"a": a, "b": b}, {"a": da, "unknown": torch.ones(3)})
    assert got.shape == (1,)
    assert got.item() == pytest.approx(fd.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"^dh_jvp: the update touches none of the given parameters$"):
        est.dh_jvp(entropy_fn, {"a": a, "b": b}, {"unknown": torch.ones(3)})
