"""STEER driven by the LM-head kernel score (``steer.omega=lm_head``): the score against a finite
difference of a head-only SGD step, the weights it gives, the trainer passing the θ_old score of
the whole batch to every mini-batch, ``compare`` reading it from the table, and the refusals."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from conftest import make_model
from test_compare import LR, make_frame
from test_train import TINY

from entropy_lens.methods import (
    apply_method,
    get_method,
    make_context,
    params_from_dict,
)
from entropy_lens.model.forward import pack, response_hidden, response_stats
from entropy_lens.model.head import check_linear_head, lm_head_score
from entropy_lens.pipelines.compare import compare_methods
from entropy_lens.tokens import TokenBatch
from entropy_lens.train import build_config, train
from entropy_lens.train import step as train_step


def _untied(seed: int = 3):
    model = make_model(seed=seed).double()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model


def _packed(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [2, 2], [3, 1, 4]]
    lengths = [4, 2, 5, 3, 1]
    responses = [torch.randint(3, 20, (n,), generator=g).tolist() for n in lengths]
    packed = pack(prompts, responses, 0)
    coef = torch.where(packed.mask, torch.randn(packed.mask.shape, generator=g, dtype=torch.float64), 0.0)
    return packed, coef


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_lm_head_score_is_the_finite_difference_of_a_head_only_sgd_step(tau):
    """ω_j = d/dη H_j(W − η g) at η = 0, g = ∇_W of −Σ_k c_k log p_k (the token-sum objective, L = 1)."""
    model = _untied()
    packed, coef = _packed()
    score = lm_head_score(model, packed, coef, tau, micro_batch=2)
    m = packed.mask
    with torch.no_grad():  # float64 end to end (the library's statistics reduce in float32)
        hidden = response_hidden(model, packed)
    ids = packed.response_ids[m]

    def log_probs(weight: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(hidden @ weight.T / tau, dim=-1)

    def entropy(weight: torch.Tensor) -> torch.Tensor:
        logq = log_probs(weight)
        return -(logq.exp() * logq).sum(-1)

    w = model.lm_head.weight.detach().clone().requires_grad_()
    loss = -(coef[m] * log_probs(w).gather(-1, ids[:, None])[:, 0]).sum()
    (g,) = torch.autograd.grad(loss, w)
    eps = 1e-6  # central difference: error ~ eps²·‖g‖³ (‖g‖ ≈ 20 here)
    w0 = w.detach()
    fd = torch.zeros_like(score)
    fd[m] = (entropy(w0 - eps * g) - entropy(w0 + eps * g)) / (2 * eps)
    assert float(fd[m].abs().max()) > 1e-3  # a real signal
    assert torch.allclose(score[m], fd[m], rtol=1e-6, atol=1e-9 * float(fd[m].abs().max()))
    assert bool((score[~m] == 0).all())
    # micro-batching the hidden states changes nothing
    assert torch.allclose(lm_head_score(model, packed, coef, tau, micro_batch=5), score, rtol=1e-12, atol=1e-15)


def test_lm_head_source_score_is_the_finite_difference_of_each_tokens_own_head_step():
    """S_k = d/dη Σ_j H_j(W − η g_k) at η = 0, g_k = ∇_W of −c_k log p_k (token k's loss alone);
    Σ_k S_k = Σ_j ω_j (both count the whole batch's change)."""
    tau = 0.8
    model = _untied(seed=5)
    packed, coef = _packed(seed=2)
    m = packed.mask
    source = lm_head_score(model, packed, coef, tau, micro_batch=2, role="source")
    receiver = lm_head_score(model, packed, coef, tau, micro_batch=2)
    with torch.no_grad():
        hidden = response_hidden(model, packed)
    ids, c = packed.response_ids[m], coef[m]

    def log_probs(weight: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(hidden @ weight.T / tau, dim=-1)

    def total_entropy(weight: torch.Tensor) -> torch.Tensor:
        logq = log_probs(weight)
        return -(logq.exp() * logq).sum()

    w0 = model.lm_head.weight.detach().clone()
    eps = 1e-6
    fd = []
    for k in range(len(ids)):
        w = w0.clone().requires_grad_()
        (g,) = torch.autograd.grad(-c[k] * log_probs(w)[k, ids[k]], w)
        fd.append(float((total_entropy(w0 - eps * g) - total_entropy(w0 + eps * g)) / (2 * eps)))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert float(fd.abs().max()) > 1e-3
    assert torch.allclose(source[m], fd, rtol=1e-6, atol=1e-9 * float(fd.abs().max()))
    assert float(source[m].sum()) == pytest.approx(float(receiver[m].sum()), rel=1e-10)
    assert not torch.allclose(source[m], receiver[m])  # the two roles rank tokens differently
    with pytest.raises(ValueError, match="role must be one of receiver, source, got 'own'"):
        lm_head_score(model, packed, coef, tau, micro_batch=2, role="own")


def test_softcapped_heads_are_refused():
    model = make_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="needs a linear LM head; this model soft-caps its logits"):
        check_linear_head(model, "steer with omega=lm_head")
    packed, coef = _packed()
    with pytest.raises(ValueError, match="soft-caps"):
        lm_head_score(model, packed, coef, 1.0, micro_batch=5)


def _batch_with_score():
    frame = make_frame(seed=2)
    b = TokenBatch.from_frame(frame, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    score = torch.where(b.mask, torch.randn(b.mask.shape, generator=g, dtype=torch.float64) * 5.0, 0.0)
    return b, score


def _exp_weights_reference(score: torch.Tensor, mask: torch.Tensor, lambda_min: float) -> torch.Tensor:
    """λ = clamp(exp(−ln(1/λ_min)·|ω| / max(M, 0.02)), λ_min, 1), M = max|ω| of the whole batch."""
    out = torch.ones_like(score)
    a = score.abs()
    M = max(float(a[mask].max()), 0.02)
    for b in range(score.shape[0]):
        for t in range(score.shape[1]):
            if mask[b, t]:
                out[b, t] = min(1.0, max(lambda_min, math.exp(-math.log(1 / lambda_min) * float(a[b, t]) / M)))
    return out


def test_steer_lm_head_weights_follow_the_score_not_the_code_form():
    b, score = _batch_with_score()
    params = params_from_dict("steer", {"omega": "lm_head", "scope": "batch", "lambda_min": 0.6})
    ctx = make_context(0, 1e-3, batch_size=b.mask.shape[0])
    w = apply_method("steer", b.replace(omega_lm_head=score), params, ctx).weight
    ref = _exp_weights_reference(score, b.mask, 0.6)
    assert torch.allclose(w.double(), ref, rtol=1e-6)
    code = apply_method("steer", b, params_from_dict("steer", {"scope": "batch", "lambda_min": 0.6}), ctx).weight
    assert not torch.allclose(w, code)
    # the sign of the score does not matter (the mapping reads |ω|)
    w_neg = apply_method("steer", b.replace(omega_lm_head=-score), params, ctx).weight
    assert torch.equal(w, w_neg)


def test_steer_lm_head_declares_and_checks_its_input():
    spec = get_method("steer")
    lm = params_from_dict("steer", {"omega": "lm_head"})
    assert spec.required_inputs() == ()
    assert spec.required_inputs(lm) == ("omega_lm_head",)
    assert spec.required_inputs(params_from_dict("steer", {"omega": "lm_head_source"})) == ("omega_lm_head_source",)
    b, score = _batch_with_score()
    assert spec.missing_inputs(b, lm) == ("omega_lm_head",)
    assert spec.missing_inputs(b.replace(omega_lm_head=score), lm) == ()
    with pytest.raises(ValueError, match="omega='lm_head' needs the LM-head kernel score"):
        apply_method("steer", b, lm, make_context(0, 1e-3, batch_size=b.mask.shape[0]))
    with pytest.raises(ValueError, match="omega must be one of code, paper, lm_head"):
        params_from_dict("steer", {"omega": "jvp"})


def test_compare_reads_the_score_from_the_table_or_skips_the_method():
    frame = make_frame(seed=4)
    over = {"steer": {"omega": "lm_head"}}
    with pytest.raises(ValueError, match="method steer needs omega_lm_head"):
        compare_methods(frame, ["grpo", "steer"], over, lr=LR, skip_missing=False)
    _, summary = compare_methods(frame, ["grpo", "steer"], over, lr=LR)
    assert set(summary["skipped"]) == {"steer"}
    b = TokenBatch.from_frame(frame)
    score = torch.where(b.mask, torch.linspace(-3, 2, b.mask.numel()).reshape(b.mask.shape), 0.0)
    with_col = frame.copy()
    with_col["omega_lm_head"] = score[b.mask].double().numpy()
    long_df, summary = compare_methods(with_col, ["grpo", "steer"], over, lr=LR)
    assert summary["skipped"] == {}
    got = long_df[long_df["method"] == "steer"].sort_values(["sample", "pos"])["weight"].to_numpy()
    params = params_from_dict("steer", {"omega": "lm_head", "scope": "batch"})
    expected = apply_method("steer", TokenBatch.from_frame(with_col), params,
                            make_context(0, LR, batch_size=b.mask.shape[0])).weight[b.mask]
    assert np.allclose(got, expected.double().numpy(), rtol=1e-6)
    assert got.min() < 0.81  # the largest |ω| reaches λ_min


@pytest.mark.parametrize(("omega", "field", "role"), [("lm_head", "omega_lm_head", "receiver"),
                                                     ("lm_head_source", "omega_lm_head_source", "source")])
def test_the_trainer_gives_every_mini_batch_the_theta_old_score_of_the_whole_batch(monkeypatch, omega, field, role):
    scores, seen = [], []
    real_score, real_apply = train_step.lm_head_score, train_step.apply_method

    def spy_score(model, packed, coef, temperature, micro_batch, chunk_rows=256, role="receiver"):
        assert role == expected_role
        out = real_score(model, packed, coef, temperature, micro_batch, chunk_rows, role)
        with torch.no_grad():
            old = response_stats(model, packed, temperature, micro_batch=micro_batch)
        scores.append((out, coef, packed.mask, old["logp"]))
        return out

    def spy_apply(name, batch, params, ctx):
        seen.append(batch)
        return real_apply(name, batch, params, ctx)

    expected_role = role
    monkeypatch.setattr(train_step, "lm_head_score", spy_score)
    monkeypatch.setattr(train_step, "apply_method", spy_apply)
    cfg = build_config("arithmetic-tiny", "steer", TINY + ["log.jvp_every=0", f"method.omega={omega}"],
                       steps=1)
    with tempfile.TemporaryDirectory() as d:
        train(cfg, d)
    assert len(scores) == 1  # once per step, before the updates
    out, coef, mask, old_logp = scores[0]
    assert float(coef[mask].abs().max()) > 0 and float(out[mask].abs().max()) > 0  # mixed rewards after the warm-up
    # c_k = A_k at θ_old, and every mini-batch reads its rows of the one score
    assert all(getattr(b, other) is None for b in seen for other in ("omega_lm_head", "omega_lm_head_source")
               if other != field)
    got = torch.cat([getattr(b, field)[b.mask] for b in seen]).double().sort().values
    assert torch.allclose(got, out[mask].sort().values.to(got.dtype))
    adv = torch.cat([b.adv[b.mask] for b in seen]).double().sort().values
    assert torch.allclose(adv, coef[mask].double().sort().values)
    old_seen = torch.cat([b.old_logp[b.mask] for b in seen]).double().sort().values
    assert torch.allclose(old_seen, old_logp[mask].double().sort().values, atol=1e-6)


def test_the_trainer_computes_no_score_for_other_methods(monkeypatch):
    calls = []
    monkeypatch.setattr(train_step, "lm_head_score", lambda *a, **k: calls.append(1))
    cfg = build_config("arithmetic-tiny", "steer", TINY + ["sft.steps=0", "log.jvp_every=0"], steps=1)
    with tempfile.TemporaryDirectory() as d:
        train(cfg, d)
    assert calls == []
