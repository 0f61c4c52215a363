"""dh_jvp (parameter-space first order) against the measured change of a real small SGD step."""

import math

import numpy as np
import pytest
import torch

from entropy_lens.model.forward import pack, response_stats
from entropy_lens.model.jvp import jvp_prediction
from entropy_lens.model.update import (
    NonFiniteUpdateError,
    grpo_token_mean_loss,
    one_step_update,
    restore,
    snapshot,
)


def _setup(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[2, 4] + torch.randint(7, 37, (4,), generator=g).tolist() + [3, 2, 5] for _ in range(6)]
    responses = [torch.randint(7, 37, (int(n),), generator=g).tolist() for n in torch.randint(4, 12, (6,), generator=g)]
    packed = pack(prompts, responses, pad_id=0)
    before = response_stats(model, packed)
    adv = torch.where(packed.mask, torch.tensor([1.0, -1.0, 0.5, -0.5, 1.2, -1.2])[:, None], 0.0)
    return packed, before, adv


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adamw", 1e-4)])
def test_dh_jvp_tracks_measured_change(tiny_model, optimizer, lr):
    packed, before, adv = _setup(tiny_model)
    theta = snapshot(tiny_model)
    loss_fn = grpo_token_mean_loss(before["logp"], adv, packed.mask)
    delta, loss = one_step_update(tiny_model, packed, loss_fn, lr, optimizer, micro_batch=4)
    after = response_stats(tiny_model, packed)
    measured = (after["entropy"] - before["entropy"])[packed.mask].numpy()
    restore(tiny_model, theta)
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p.detach(), theta[n])
    pred = jvp_prediction(tiny_model, packed, theta, delta, 1.0, 4)[packed.mask].numpy()
    pcc = np.corrcoef(pred, measured)[0, 1]
    assert pcc > 0.99, pcc
    assert np.abs(measured).max() > 1e-4  # the step really moved the entropies


def test_jvp_error_is_second_order_in_lr(tiny_model):
    packed, before, adv = _setup(tiny_model, seed=1)
    theta = snapshot(tiny_model)
    loss_fn = grpo_token_mean_loss(before["logp"], adv, packed.mask)
    errs = []
    for lr in (0.02, 0.01):
        delta, _ = one_step_update(tiny_model, packed, loss_fn, lr, "sgd")
        measured = response_stats(tiny_model, packed)["entropy"] - before["entropy"]
        restore(tiny_model, theta)
        pred = jvp_prediction(tiny_model, packed, theta, delta, 1.0, 4)
        errs.append(float((pred - measured)[packed.mask].abs().max()))
    assert 2.8 < errs[0] / errs[1] < 5.0, errs


def test_bad_optimizer_and_lr(tiny_model):
    packed, before, adv = _setup(tiny_model)
    loss_fn = grpo_token_mean_loss(before["logp"], adv, packed.mask)
    with pytest.raises(ValueError, match="optimizer"):
        one_step_update(tiny_model, packed, loss_fn, 0.1, "lion")
    with pytest.raises(ValueError, match="learning rate"):
        one_step_update(tiny_model, packed, loss_fn, 0.0, "sgd")


def _params_equal(model, theta) -> bool:
    return all(torch.equal(p.detach(), theta[n]) for n, p in model.named_parameters())


def test_non_finite_loss_names_the_micro_batch_and_leaves_the_model(tiny_model):
    packed, before, adv = _setup(tiny_model)
    theta = snapshot(tiny_model)
    adv = torch.where(packed.mask, torch.tensor([1.0, -1.0, float("inf"), 0.5, 1.0, -1.0])[:, None], 0.0)
    loss_fn = grpo_token_mean_loss(before["logp"], adv, packed.mask)
    with pytest.raises(NonFiniteUpdateError) as info:
        one_step_update(tiny_model, packed, loss_fn, 0.05, "sgd", micro_batch=2)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert "non-finite loss" in msg and "micro-batch 2 of 3 (sequences 2-3)" in msg and "reward" in msg
    assert _params_equal(tiny_model, theta)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_non_finite_gradient_with_finite_loss(tiny_model):
    """Extreme old log-probs overflow the ratio exp(logp - old_logp): the clipped loss stays finite
    but its gradient is NaN — refused before the step, naming the parameter and micro-batch."""
    packed, before, adv = _setup(tiny_model)
    theta = snapshot(tiny_model)
    old = before["logp"].clone()
    old[4:] = -500.0  # sequences 4-5: the third micro-batch
    loss_fn = grpo_token_mean_loss(old, adv, packed.mask, log_ratio_clamp=None)
    with pytest.raises(NonFiniteUpdateError, match=r"non-finite gradient of .* after micro-batch 3 of 3 \(sequences 4-5\)"):
        one_step_update(tiny_model, packed, loss_fn, 0.05, "sgd", micro_batch=2)
    assert _params_equal(tiny_model, theta)
    # the default log-ratio clamp (±20 nats, verl 0.4.1) keeps the same batch finite
    delta, loss = one_step_update(tiny_model, packed, grpo_token_mean_loss(old, adv, packed.mask), 0.05, "sgd",
                                  micro_batch=2)
    assert all(bool(torch.isfinite(d).all()) for d in delta.values()) and loss == loss
    restore(tiny_model, theta)


def test_step_that_overflows_the_parameters_is_undone(tiny_model):
    packed, before, adv = _setup(tiny_model)
    theta = snapshot(tiny_model)
    loss_fn = grpo_token_mean_loss(before["logp"], adv, packed.mask)
    for optimizer in ("adamw", "sgd"):
        with pytest.raises(NonFiniteUpdateError, match="learning rate 1e\\+39 too large"):
            one_step_update(tiny_model, packed, loss_fn, 1e39, optimizer)
        assert _params_equal(tiny_model, theta)
    with pytest.raises(ValueError, match="finite"):
        one_step_update(tiny_model, packed, loss_fn, float("inf"), "sgd")


def test_validate_on_extreme_old_logp_stays_finite_through_the_log_ratio_clamp(tiny_model, tiny_tokenizer):
    """old_logp of -900 nats makes exp(log p - old_logp) overflow; the GRPO loss of validate clamps
    the log-ratio at ±20 nats (verl 0.4.1), so the step and every written column stay finite (the
    unclamped path refuses such a step: test_non_finite_gradient_with_finite_loss)."""
    import pandas as pd
    from conftest import arithmetic_rows

    from entropy_lens.io.rollouts import validate_rollouts
    from entropy_lens.pipelines.validate import ValidateSettings, run_validate

    rows = arithmetic_rows()
    for r in rows:
        r["old_logp"] = [-900.0] * len(r["response"].split())  # accepted by the schema (>= -1000)
    frame = validate_rollouts(pd.DataFrame(rows), "r.jsonl")
    theta = snapshot(tiny_model)
    tokens, summary = run_validate(tiny_model, tiny_tokenizer, frame, ValidateSettings(lr=0.05, jvp=False), "r.jsonl")
    assert np.isfinite(tokens["dh_measured"]).all() and math.isfinite(summary["loss"])
    assert _params_equal(tiny_model, theta)


def test_jvp_through_sdpa_math_equals_eager_attention():
    """With ``attention="sdpa-math"`` an SDPA model keeps SDPA (math backend) for the JVP; the values
    equal eager attention's."""
    from conftest import make_model

    from entropy_lens.model.jvp import forward_ad_attention

    sdpa = make_model(seed=3, attn="sdpa").double()
    eager = make_model(seed=3, attn="eager").double()
    packed, before, adv = _setup(sdpa, seed=2)
    theta = snapshot(sdpa)
    delta, _ = one_step_update(sdpa, packed, grpo_token_mean_loss(before["logp"], adv, packed.mask), 0.05, "sgd")
    restore(sdpa, theta)
    with forward_ad_attention(sdpa, "sdpa-math") as kind_sdpa:
        assert sdpa.config._attn_implementation == "sdpa"
    with forward_ad_attention(eager, "sdpa-math") as kind_eager:  # not an SDPA model: eager
        assert eager.config._attn_implementation == "eager"
    with forward_ad_attention(sdpa) as kind_default:  # the default switches to eager and back
        assert sdpa.config._attn_implementation == "eager"
    assert (kind_sdpa, kind_eager, kind_default) == ("sdpa-math", "eager", "eager")
    with pytest.raises(ValueError, match="attention for the JVP must be one of eager, sdpa-math, got 'flash'"):
        with forward_ad_attention(sdpa, "flash"):
            pass
    got = jvp_prediction(sdpa, packed, theta, delta, 1.0, 4, attention="sdpa-math")
    ref = jvp_prediction(eager, packed, theta, delta, 1.0, 4)
    assert float(ref[packed.mask].abs().max()) > 1e-4
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert sdpa.config._attn_implementation == "sdpa"  # left as it was


def test_non_sdpa_models_fall_back_to_eager_attention_and_back(monkeypatch):
    from conftest import make_model

    from entropy_lens.model import jvp

    model = make_model(seed=4, attn="eager")
    model.config._attn_implementation = "flash_attention_2"  # what a GPU checkpoint may carry
    calls = []

    def record(m, implementation):  # flash-attn is not installed here: record the switch only
        calls.append(implementation)
        m.config._attn_implementation = implementation

    monkeypatch.setattr(jvp, "set_attention", record)
    with jvp.forward_ad_attention(model) as kind:
        inside = model.config._attn_implementation
    assert (kind, inside) == ("eager", "eager")
    assert calls == ["eager", "flash_attention_2"] and model.config._attn_implementation == "flash_attention_2"
