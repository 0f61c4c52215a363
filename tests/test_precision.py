"""Low precision: the fp32 master update of bf16 models, the fp32 measuring model and the η = 0
noise floor of ``validate``."""

from __future__ import annotations

import copy

import pytest
import torch

from entropy_lens.model.forward import pack, response_stats
from entropy_lens.model.update import grpo_token_mean_loss, one_step_update, snapshot
from entropy_lens.pipelines.prepare import token_batch
from entropy_lens.pipelines.validate import (
    ValidateSettings,
    abs_quantiles,
    measured_and_jvp,
    measuring_model,
    noise_floor,
)


def _setup(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[2, 4] + torch.randint(7, 37, (4,), generator=g).tolist() + [3] for _ in range(4)]
    responses = [torch.randint(7, 37, (int(n),), generator=g).tolist() for n in (5, 3, 6, 4)]
    packed = pack(prompts, responses, pad_id=0)
    adv = torch.where(packed.mask, torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None], 0.0)
    return packed, adv


def test_bf16_step_goes_through_an_fp32_master_copy(tiny_model):
    """A step far below bf16's resolution survives in delta (fp32), equal to the fp32 update of
    the same bf16 gradient; the bf16 parameters themselves do not move."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    packed, adv = _setup(model)
    old = response_stats(model, packed)["logp"]
    theta = snapshot(model)
    lr = 1e-3  # updates ~1e-6: below bf16's spacing at the weights' scale (~4e-4), above fp32's (~1e-8)
    delta, _ = one_step_update(model, packed, grpo_token_mean_loss(old, adv, packed.mask), lr, "sgd", micro_batch=4)
    assert all(d.dtype == torch.float32 for d in delta.values())
    assert sum(float(d.abs().sum()) for d in delta.values()) > 0
    # the rounded bf16 parameters did not move for most entries (the step is ~1e-6 of weights ~1e-2)
    moved = sum(int((p.detach() != theta[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((d != 0).sum()) for d in delta.values())
    assert moved < 0.05 * total and nonzero > 10 * moved
    # reference: the same bf16 gradient, SGD step in fp32 by hand
    for p in model.parameters():
        p.data.copy_(theta[next(n for n, q in model.named_parameters() if q is p)])
    model.zero_grad(set_to_none=True)
    from entropy_lens.model.forward import response_logp_entropy

    logp, ent = response_logp_entropy(model, packed)
    grpo_token_mean_loss(old, adv, packed.mask)(slice(0, 4), logp, ent).backward()
    for n, p in model.named_parameters():
        expected = (theta[n].float() - lr * p.grad.float()) - theta[n].float()  # fp32 step, as the master takes it
        assert torch.allclose(delta[n], expected, rtol=0, atol=2e-8), n
        assert float(expected.abs().max()) > 1e-7


def test_bf16_validate_measures_in_fp32_and_reports_the_floor(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    packed, adv = _setup(model)
    stats = response_stats(model, packed)
    group = torch.tensor([0, 0, 1, 1])
    reward = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch = token_batch(stats, packed.response_ids, packed.mask, stats["logp"], reward, group, "grpo", 1.0)
    settings = ValidateSettings(lr=1e-4, optimizer="sgd", micro_batch=4, jvp=True)
    dh, dh_jvp, _, floor = measured_and_jvp(model, packed, batch, settings)
    assert floor["measuring_dtype"] == "float32"
    assert floor["floor_abs_dh"]["max"] == 0.0  # CPU forwards are deterministic: no floor
    assert floor["step_abs_dh"]["p50"] > 0 and floor["note"] is None
    # the measured change is the fp32 model's, and dh_jvp tracks it in scale
    m = packed.mask
    assert abs(float(dh_jvp[m].sum()) / float(dh[m].sum()) - 1) < 0.1
    assert next(model.parameters()).dtype == torch.bfloat16  # the user's model is untouched in dtype


def test_measuring_model_is_the_model_itself_in_fp32(tiny_model):
    assert measuring_model(tiny_model) is tiny_model
    low = copy.deepcopy(tiny_model).to(torch.float16)
    meter = measuring_model(low)
    assert meter is not low and next(meter.parameters()).dtype == torch.float32


def test_noise_floor_note_when_the_signal_is_within_10x():
    mask = torch.ones(1, 4, dtype=torch.bool)
    step = torch.tensor([[1e-6, -2e-6, 3e-6, 1e-6]])
    floor = noise_floor(step, torch.tensor([[5e-7, -5e-7, 1e-7, 2e-7]]), mask, torch.float32)
    assert floor["p50_ratio"] == pytest.approx(1.5e-6 / 3.5e-7)
    assert "noise floor" in floor["note"]
    quiet = noise_floor(step, torch.zeros(1, 4), mask, torch.float32)
    assert quiet["p50_ratio"] is None and quiet["note"] is None
    assert abs_quantiles(torch.tensor([-4.0, 1.0, 2.0, 3.0]))["max"] == 4.0
