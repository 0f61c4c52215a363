"""The objective's modes against plain float64 loops: the log-ratio clamp, the sequence-level ratio
(GSPO-token) and gradient-preserving clipping (GPPO / CE-GPPO), with finite-difference and
analytic gradient checks."""

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


def tensors(seed=0, B=4, T=5, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, T).clone()
    lengths = torch.tensor([T, T - 1, 2, T])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def ppo_token(lr, a, el, eh, c):
    """PPO-clip loss of one token from its (already clamped) log-ratio, plain floats."""
    r = math.exp(lr)
    val = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
    if c is not None and a < 0:
        val = min(val, -a * c)
    return val


def loop_loss(logp, old, adv, mask, el, eh, c, clamp=None, level="token", mode="standard", bl=1.0, bh=1.0):
    """Token-mean loss of the objective, one token at a time in float64 (test reference)."""
    B, T = mask.shape
    total, n = 0.0, 0
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        seq = sum(float(logp[b, t] - old[b, t]) for t in valid) / max(len(valid), 1)
        for t in valid:
            lr = seq if level == "sequence" else float(logp[b, t] - old[b, t])
            if clamp is not None:
                lr = min(max(lr, -clamp), clamp)
            a, r = float(adv[b, t]), math.exp(lr)
            val = ppo_token(lr, a, el, eh, c)
            if mode == "gradient_preserving" and a > 0 and r > 1 + eh:
                val = -a * bh * (1 + eh)
            if mode == "gradient_preserving" and a < 0 and r < 1 - el:
                val = -a * bl * (1 - el)
                if c is not None:
                    val = min(val, -a * c)
            total += val
            n += 1
    return total / max(n, 1)


def objective(logp, old, adv, mask, el, eh, c, **kw):
    per = clipped_surrogate(logp, old, adv, el, eh, c, mask=mask, **kw)
    return aggregate(torch.where(mask, per, 0.0), mask, "token-mean")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["standard", "gradient_preserving"])
@pytest.mark.parametrize("clamp", [None, 0.3, 20.0])
def test_objective_matches_loop_reference(level, mode, clamp):
    logp, old, adv, mask = tensors(seed=1)
    kw = {"log_ratio_clamp": clamp, "ratio_level": level, "clip_mode": mode, "beta_low": 0.5, "beta_high": 0.75}
    got = objective(logp, old, adv, mask, 0.2, 0.28, 3.0, **kw)
    ref = loop_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, clamp, level, mode, 0.5, 0.75)
    assert float(got) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_default_keywords_are_the_plain_ppo_clip():
    logp, old, adv, _ = tensors(seed=2, spread=2.0)
    a = clipped_surrogate(logp, old, adv, 0.2, 0.2, 3.0)
    b = clipped_surrogate(logp, old, adv, 0.2, 0.2, 3.0, log_ratio_clamp=None, ratio_level="token",
                          clip_mode="standard")
    assert torch.equal(a, b)


def test_log_ratio_clamp_caps_the_ratio_and_its_gradient():
    logp = torch.tensor([[-0.1, -30.0, -0.2]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-28.0, -1.0, -0.3]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, 1.0]], dtype=torch.float64)
    per = clipped_surrogate(logp, old, adv, math.inf, math.inf, None, log_ratio_clamp=20.0)
    # token 0: log r = 27.9 → e^20; token 1: log r = −29 → e^−20; token 2 untouched
    expected = [math.exp(20.0), -math.exp(-20.0), -math.exp(0.1)]
    torch.testing.assert_close(per[0], torch.tensor(expected, dtype=torch.float64))
    per.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0  # clamped: no gradient, as verl
    assert float(logp.grad[0, 2]) == pytest.approx(-math.exp(0.1))


@pytest.mark.parametrize("clamp", [None, 20.0])
def test_sequence_ratio_gradient_matches_finite_differences(clamp):
    """GSPO-token's value is GSPO's sequence objective, so its autograd gradient must equal the
    finite-difference gradient of the loop reference (away from the clip kinks)."""
    logp, old, adv, mask = tensors(seed=3, spread=0.05)
    kw = {"log_ratio_clamp": clamp, "ratio_level": "sequence"}
    x = logp.clone().requires_grad_(True)
    objective(x, old, adv, mask, 0.2, 0.2, None, **kw).backward()
    h = 1e-6
    for b, t in [(0, 0), (1, 3), (2, 1), (3, 4)]:
        up, dn = logp.clone(), logp.clone()
        up[b, t] += h
        dn[b, t] -= h
        fd = (loop_loss(up, old, adv, mask, 0.2, 0.2, None, clamp, "sequence")
              - loop_loss(dn, old, adv, mask, 0.2, 0.2, None, clamp, "sequence")) / (2 * h)
        assert float(x.grad[b, t]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_sequence_ratio_value_and_gradient_per_token():
    logp, old, _, mask = tensors(seed=4)
    x = logp.clone().requires_grad_(True)
    lr = sequence_log_ratio(x, old, mask)
    for b in range(mask.shape[0]):
        valid = mask[b]
        mean = float((logp[b] - old[b])[valid].mean())
        assert torch.allclose(lr[b][valid].detach(), torch.full_like(lr[b][valid], mean))
    lr.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # ∂ log s_i,t / ∂ log p_t' = δ_tt'


def test_gradient_preserving_gradient_is_beta_times_bound():
    """Analytic per-token gradient of the token-mean loss: −A·r/L inside, −β·(1±ε)·A/L where the
    PPO clip would cut it, 0 where the dual clip holds."""
    logp, old, adv, mask = tensors(seed=5, spread=1.0)
    el, eh, bl, bh, c = 0.2, 0.28, 0.5, 0.75, 3.0
    x = logp.clone().requires_grad_(True)
    objective(x, old, adv, mask, el, eh, c, clip_mode="gradient_preserving", beta_low=bl, beta_high=bh).backward()
    L = int(mask.sum())
    seen = set()
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        a, r = float(adv[b, t]), math.exp(float(logp[b, t] - old[b, t]))
        if a > 0 and r > 1 + eh:
            want, kind = -bh * (1 + eh) * a / L, "up"
        elif a < 0 and r < 1 - el:
            want, kind = -bl * (1 - el) * a / L, "down"
        elif a < 0 and r > c:
            want, kind = 0.0, "dual"
        else:
            want, kind = -a * r / L, "inside"
        seen.add(kind)
        assert float(x.grad[b, t]) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert {"up", "down", "inside"} <= seen


def test_gradient_preserving_with_unit_beta_keeps_the_ppo_value():
    logp, old, adv, _ = tensors(seed=6, spread=1.0)
    std = clipped_surrogate(logp, old, adv, 0.2, 0.28, 3.0)
    gp = clipped_surrogate(logp, old, adv, 0.2, 0.28, 3.0, clip_mode="gradient_preserving")
    torch.testing.assert_close(gp, std, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"ratio_level": "group"}, "ratio_level"),
        ({"clip_mode": "soft"}, "clip_mode"),
        ({"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
    ],
)
def test_bad_modes_are_one_line_errors(kw, match):
    logp, old, adv, _ = tensors()
    with pytest.raises(ValueError, match=match):
        clipped_surrogate(logp, old, adv, **kw)


def test_surrogate_dlogp_is_the_per_token_derivative():
    logp, old, adv, mask = tensors(seed=7, spread=1.0)
    r = torch.exp(logp - old)
    g = surrogate_dlogp(logp, old, adv, 0.2, 0.28, 3.0)
    torch.testing.assert_close(g, torch.where(clip_active(r, adv, 0.2, 0.28, 3.0), -adv * r, 0.0))
    L = int(mask.sum())
    for kw in ({"ratio_level": "sequence", "mask": mask}, {"clip_mode": "gradient_preserving", "beta_low": 0.5}):
        x = logp.clone().requires_grad_(True)
        objective(x, old, adv, mask, 0.2, 0.28, 3.0, **{k: v for k, v in kw.items() if k != "mask"}).backward()
        got = surrogate_dlogp(logp, old, adv, 0.2, 0.28, 3.0, **kw)
        torch.testing.assert_close(torch.where(mask, got, 0.0) / L, x.grad)
