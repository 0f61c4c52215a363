"""Fast value tests of the pipeline functions whose numbers land in tokens.parquet
(``prepare.truncate``, ``prepare.token_batch``, ``analyze.shard_frame``, ``analyze.finish_frame``,
``validate.instrument``), on a tiny model and hand-made batches; references are written with
Python floats and full ``model(input_ids).logits`` forwards, one sequence at a time."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, make_tokenizer

from entropy_lens.io.rollouts import Tokenized
from entropy_lens.objective import clipped_surrogate
from entropy_lens.pipelines.analyze import AnalyzeSettings, finish_frame, shard_frame
from entropy_lens.pipelines.prepare import Prepared, token_batch, truncate
from entropy_lens.pipelines.validate import (
    ValidateSettings,
    instrument,
    measured_and_jvp,
)

TAU = 0.7
# three responses (lengths 3, 1, 2) in two groups: rewards (1, 0 | 1); the old log-probs make
# ratios inside, above and below the clip
PROMPTS = [[2, 8, 9], [2, 10], [2, 11, 12, 13]]
RESPONSES = [[14, 15, 16], [17], [18, 19]]
REWARD = [1.0, 0.0, 1.0]
GROUP = [0, 0, 7]
OLD = [[-5.25, -4.75, -5.0], [-5.5], [-3.0, -5.5]]  # exact in float32


def forward_stats(model, prompt, response, tau=TAU):
    """(log p, H, Σp², Σp² log p) of each response token from one unpadded full forward, float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: len(prompt) + len(response) - 1].double() / tau
    logq = torch.log_softmax(logits, -1)
    logp = logq.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    q = logq.exp()
    return logp, -(q * logq).sum(-1), (q * q).sum(-1), (q * q * logq).sum(-1)


def grid(rows, width, fill=0.0, dtype=torch.float32):
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def prepared(old=True, n=3):
    """The first ``n`` sequences (n = 2: B = 2 rows of T = 3 tokens, so B ≠ T)."""
    tok = Tokenized([list(p) for p in PROMPTS[:n]], [list(r) for r in RESPONSES[:n]], False, [])
    return Prepared(tok=tok, old_logp=grid(OLD[:n], 3) if old else None,
                    reward=torch.tensor(REWARD[:n], dtype=torch.float64), group_id=torch.tensor(GROUP[:n]),
                    lengths=[len(r) for r in RESPONSES[:n]], pad_id=0)


def grpo_reference():
    """GRPO advantage per response by hand: group 0 rewards (1, 0): ±0.5 / (std 0.7071 + 1e-6); group 7 alone: 0."""
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    return [a, -a, 0.0]


def test_truncate_cuts_responses_and_old_logp_and_notes_it():
    tok = Tokenized([[1], [1]], [[5, 6, 7], [8]], False, ["earlier"])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    cut, cut_old = truncate(tok, old, 2)
    assert cut.response_ids == [[5, 6], [8]] and cut.prompt_ids == [[1], [1]]
    assert cut_old.tolist() == [[-1.0, -2.0], [-4.0, 0.0]]
    assert cut.notes == ["earlier", ("1 of 2 responses truncated to max_len=2 response tokens (longest had 3); "
                                     "their rewards are those of the whole responses")]
    same, same_old = truncate(tok, old, 3)  # nothing longer: unchanged
    assert same is tok and same_old is old
    cut1, none_old = truncate(tok, None, 1)
    assert cut1.response_ids == [[5], [8]] and none_old is None
    assert cut1.notes[-1].startswith("1 of 2 responses truncated to max_len=1 response tokens (longest had 3)")
    for bad in (0, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"^max_len must be an integer >= 1, got {bad!r}$"):
            truncate(tok, old, bad)


def test_token_batch_values_on_and_off_policy():
    mask = grid([[1, 1, 1], [1], [1, 1]], 3, dtype=torch.float64).bool()
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 7.0, 7.0], [-0.2, -0.1, 7.0]], dtype=torch.float64)
    stats = {"logp": logp, "entropy": logp.abs() + 1, "sum_p2": logp.abs() / 10, "sum_p2_logp": -logp.abs() / 20}
    old = grid(OLD, 3)
    old[1, 1:] = 5.0  # padding values must not reach the batch
    reward = torch.tensor(REWARD, dtype=torch.float32)
    b = token_batch(stats, torch.arange(9).reshape(3, 3), mask, old, reward, torch.tensor(GROUP), "grpo", TAU)
    a = grpo_reference()[0]
    assert b.logp.dtype == torch.float64 and b.reward.dtype == torch.float64 and b.adv.dtype == torch.float64
    torch.testing.assert_close(b.adv, torch.tensor([[a, a, a], [-a, 0, 0], [0, 0, 0]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.old_logp, torch.tensor([[-5.25, -4.75, -5.0], [-5.5, 0.0, 0.0], [-3.0, -5.5, 0.0]],
                                                        dtype=torch.float64), rtol=0, atol=1e-6)
    assert b.meta == {"temperature": TAU}
    assert torch.equal(b.entropy, stats["entropy"]) and torch.equal(b.sum_p2_logp, stats["sum_p2_logp"])
    on = token_batch(stats, torch.arange(9).reshape(3, 3), mask, None, reward, torch.tensor(GROUP), "grpo", TAU)
    assert torch.equal(on.old_logp, torch.where(mask, logp, 0.0))  # on-policy: ratio 1 on every token
    # OPO reads the response lengths from the mask: group 0 lengths (3, 1) → b = (3·1 + 1·0) / 4
    opo = token_batch(stats, torch.arange(9).reshape(3, 3), mask, old, reward, torch.tensor(GROUP), "opo", TAU)
    assert opo.adv[:, 0].tolist() == pytest.approx([0.25, -0.75, 0.0])


def raw_frame(model, start=0, next_model=None):
    rows = []
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        lp, h, sp2, sp2l = forward_stats(model, p, r)
        nxt = forward_stats(next_model, p, r) if next_model is not None else None
        for t, tok in enumerate(r):
            row = {"sample": b + start, "pos": t, "token_id": tok, "logp": float(lp[t]), "entropy": float(h[t]),
                   "sum_p2": float(sp2[t]), "sum_p2_logp": float(sp2l[t])}
            if nxt is not None:
                row["entropy_next"], row["logp_next"] = float(nxt[1][t]), float(nxt[0][t])
            rows.append(row)
    return pd.DataFrame(rows)


def test_shard_frame_is_the_full_forward_with_global_sample_index():
    model, nxt = make_model(seed=0), make_model(seed=1)
    prep = prepared()
    settings = AnalyzeSettings(temperature=TAU, micro_batch=2)
    frame = shard_frame(model, nxt, prep.packed(1, 3), 1, settings)
    assert list(frame.columns) == ["sample", "pos", "token_id", "logp", "entropy", "sum_p2", "sum_p2_logp",
                                   "entropy_next", "logp_next"]
    ref = raw_frame(model, next_model=nxt)
    ref = ref[ref["sample"] >= 1].reset_index(drop=True)
    assert frame["sample"].tolist() == [1, 2, 2] and frame["pos"].tolist() == [0, 0, 1]
    assert frame["token_id"].tolist() == [17, 18, 19]
    for col in ("logp", "entropy", "sum_p2", "sum_p2_logp", "entropy_next", "logp_next"):
        assert frame[col].dtype == np.float64
        np.testing.assert_allclose(frame[col], ref[col], rtol=1e-5, atol=1e-5, err_msg=col)
    alone = shard_frame(model, None, prep.packed(0, 1), 0, settings)
    assert "entropy_next" not in alone.columns and alone["sample"].tolist() == [0, 0, 0]


def test_finish_frame_columns_over_all_shards():
    model, nxt = make_model(seed=0), make_model(seed=1)
    prep = prepared()
    settings = AnalyzeSettings(lr=0.3, temperature=TAU, eps_low=0.1, eps_high=0.4, dual_clip=4.0, advantage="grpo")
    frame, batch = finish_frame(raw_frame(model, next_model=nxt), prep, settings, make_tokenizer())
    assert len(frame) == 6 and frame["quadrant"].dtype == np.int8
    assert batch.meta == {"temperature": TAU}
    a = grpo_reference()[0]
    adv = [a, a, a, -a, 0.0, 0.0]
    old = [x for r in OLD for x in r]
    ref = raw_frame(model, next_model=nxt)
    np.testing.assert_allclose(frame["adv"], adv, atol=1e-12)
    np.testing.assert_allclose(frame["old_logp"], old, atol=1e-6)
    assert frame["reward"].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert frame["token"].tolist() == ["7", "8", "9", "10", "11", "12"]  # 7 specials, then "0", "1", ...: id 14 is "7"
    np.testing.assert_allclose(frame["dh_measured"], ref["entropy_next"] - ref["entropy"], atol=1e-12)
    L = 6
    for i, row in frame.iterrows():
        r = math.exp(row["logp"] - old[i])
        A = adv[i]
        dead = (A > 0 and r > 1.4) or (A < 0 and r < 0.9) or (A < 0 and r > 4.0)
        p = math.exp(row["logp"])
        assert row["ratio"] == pytest.approx(r, rel=1e-9)
        assert bool(row["clip_active"]) == (not dead)
        assert row["omega_paper"] == pytest.approx(-(0.3 / L) * (not dead) * A * r * p * (1 - p) * (row["logp"] + row["entropy"]), abs=1e-12)
    assert batch.logp.dtype == torch.float64 and batch.n_tokens == 6
    # the case has a clipped token of each sign: A > 0 above 1 + ε_high, A < 0 below 1 − ε_low
    assert frame["clip_active"].tolist() == [True, False, True, False, True, True]


def test_instrument_statistics_and_settings_reach_the_columns():
    model = make_model(seed=0)
    prep = prepared(n=2)
    settings = ValidateSettings(lr=0.5, temperature=TAU, eps_low=0.1, eps_high=0.4, dual_clip=4.0,
                                advantage="dr_grpo", micro_batch=1)
    packed, batch, cols = instrument(model, prep, settings)
    seen = []
    packed2, _, _ = instrument(model, prep, settings, progress=lambda stage, n: seen.append((stage, n)))
    assert seen == [("forward", 2)]  # sequences, not tokens (B = 2, T = 3)
    assert torch.equal(packed.response_ids, packed2.response_ids) and packed.mask.sum() == 4
    assert batch.meta == {"temperature": TAU}
    for b, (p, r) in enumerate(zip(PROMPTS[:2], RESPONSES[:2])):
        lp, h, _, _ = forward_stats(model, p, r)
        torch.testing.assert_close(batch.logp[b, : len(r)].double(), lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.entropy[b, : len(r)].double(), h, rtol=1e-5, atol=1e-5)
    # Dr. GRPO: r − group mean → (0.5, −0.5)
    assert batch.adv[:, 0].tolist() == pytest.approx([0.5, -0.5])
    old = grid(OLD[:2], 3)
    m = batch.mask
    ratio = torch.exp(torch.where(m, batch.logp - old, 0.0))
    A = batch.adv
    dead = ((A > 0) & (ratio > 1.4)) | ((A < 0) & (ratio < 0.9)) | ((A < 0) & (ratio > 4.0))
    assert cols["clip_active"].tolist() == (~dead & m).tolist()
    p = batch.logp.exp()
    L = 4
    om = -(0.5 / L) * (~dead).float() * A * ratio * p * (1 - p) * (batch.logp + batch.entropy)
    torch.testing.assert_close(cols["omega_paper"], torch.where(m, om, 0.0), rtol=1e-5, atol=1e-7)


def reference_dh(model, batch, lr, wd, eps_low, eps_high, dual):
    """(loss, ΔH [B, T]) of one plain SGD step (weight decay ``wd``) on the token-mean clipped
    surrogate of ``batch``, by hand on a copy of ``model``."""
    ref = copy.deepcopy(model)
    n_tok = int(batch.mask.sum())
    total = 0.0
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES[: batch.mask.shape[0]])):
        logits = ref(torch.tensor([p + r])).logits[0, len(p) - 1: len(p) + len(r) - 1].float() / TAU
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        old, adv = batch.old_logp[b, : len(r)].detach(), batch.adv[b, : len(r)].detach()
        total = total + clipped_surrogate(lp, old, adv, eps_low, eps_high, dual).sum()
    loss = total / n_tok
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    with torch.no_grad():
        for q, g in zip(ref.parameters(), grads):
            q -= lr * (g + wd * q)
    dh = torch.zeros(batch.mask.shape, dtype=torch.float64)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES[: batch.mask.shape[0]])):
        dh[b, : len(r)] = forward_stats(ref, p, r)[1] - forward_stats(model, p, r)[1]
    return float(loss), dh


def test_measured_and_jvp_is_one_independent_sgd_step_and_restores_the_model():
    model = make_model(seed=0)
    prep = prepared(n=2)
    settings = ValidateSettings(lr=0.05, temperature=TAU, eps_low=0.1, eps_high=0.4, dual_clip=4.0,
                                advantage="dr_grpo", micro_batch=1, jvp=False)
    packed, batch, _ = instrument(model, prep, settings)
    # the A < 0 response gets r = e² > c on its token: the dual clip matters for this step
    batch = batch.replace(old_logp=torch.where(batch.adv < 0, batch.logp - 2.0, batch.old_logp))
    assert float(batch.adv[1, 0]) == -0.5 and math.exp(float(batch.logp[1, 0] - batch.old_logp[1, 0])) > 4.0
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    dh, jvp, loss, floor = measured_and_jvp(model, packed, batch, settings, progress=lambda s, n: seen.append((s, n)))
    assert jvp is None
    assert seen == [("update", 1), ("update", 1), ("forward after", 2)]
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta[n]), n  # θ restored
    ref_loss, ref_dh = reference_dh(model, batch, 0.05, 0.0, 0.1, 0.4, 4.0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-3, atol=1e-6)
    assert torch.all(dh[~batch.mask] == 0) and float(dh.abs().max()) > 1e-5
    # η = 0 through the same measuring path changes nothing: the floor is 0 and the step is above it
    assert floor["measuring_dtype"] == "float32"
    assert floor["floor_abs_dh"]["p50"] <= 1e-7 and (floor["p50_ratio"] is None or floor["p50_ratio"] > 1e3)
    assert floor["step_abs_dh"]["p50"] == pytest.approx(float(torch.quantile(dh[batch.mask].abs().double(), 0.5)))
    # weight decay reaches the optimizer
    wd = ValidateSettings(**{**settings.__dict__, "weight_decay": 0.5})
    dh_wd, *_ = measured_and_jvp(model, packed, batch, wd)
    torch.testing.assert_close(dh_wd.double(), reference_dh(model, batch, 0.05, 0.5, 0.1, 0.4, 4.0)[1], rtol=1e-3, atol=1e-6)
    assert not torch.allclose(dh_wd, dh, rtol=1e-3, atol=1e-6)
    # with the JVP: the first order of the same step, same direction and scale as the measured change
    seen.clear()
    with_jvp = ValidateSettings(**{**settings.__dict__, "jvp": True})
    _, jvp, *_ = measured_and_jvp(model, packed, batch, with_jvp, progress=lambda s, n: seen.append((s, n)))
    assert ("jvp", 1) in seen and jvp.shape == dh.shape
    cos = float((jvp * dh).sum() / (jvp.norm() * dh.norm()))
    assert cos > 0.95 and 0.7 < float(jvp.norm() / dh.norm()) < 1.4, (cos, jvp, dh)


def test_measured_change_of_a_bf16_model_is_measured_in_fp32_on_both_sides():
    """A bf16 model: the entropies before and after the step both come from the fp32 copy, so a
    negligible step measures ΔH ≈ 0 (not the bf16 rounding of the instrumented forward), and the
    entropy before is the fp32 copy's."""
    model = make_model(seed=0).to(torch.bfloat16)
    prep = prepared(n=2)
    settings = ValidateSettings(lr=1e-9, temperature=TAU, advantage="dr_grpo", micro_batch=1, jvp=False)
    packed, batch, _ = instrument(model, prep, settings)
    fp32 = copy.deepcopy(model).float()
    before = [forward_stats(fp32, p, r)[1] for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    gap = max(float((batch.entropy[b, : len(h)].double() - h).abs().max()) for b, h in enumerate(before))
    assert gap > 1e-4  # the bf16 forward differs from the fp32 one on this batch
    dh, _, _, floor = measured_and_jvp(model, packed, batch, settings)
    assert float(dh.abs().max()) < 1e-5 and floor["measuring_dtype"] == "float32"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_truncate_keeps_the_retokenized_flag_and_accepts_no_responses():
    for flag in (False, True):
        cut, _ = truncate(Tokenized([[1]], [[5, 6, 7]], flag, []), None, 1)
        assert cut.retokenized is flag and cut.response_ids == [[5]]
    empty = Tokenized([], [], False, [])
    same, old = truncate(empty, None, 2)
    assert same is empty and old is None
