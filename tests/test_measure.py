"""dh_jvp (parameter-space first order) against the measured change of a real small SGD step."""

import numpy as np
import pytest
import torch

from entropy_lens.model.forward import pack, response_stats
from entropy_lens.model.jvp import jvp_prediction
from entropy_lens.model.update import (
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
