"""Advantage estimators against hand-computed values and a per-sample loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_lens.advantages import (
    ADVANTAGES,
    broadcast_to_tokens,
    compute_advantages,
    dr_grpo,
    grpo,
    opo,
    rloo,
)

# group 5: rewards (1, 0, 0); group 2: all equal (1, 1); group 9: a single response (0.3)
REWARD = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.3])
GROUP = torch.tensor([5, 5, 5, 2, 2, 9])
LENGTHS = torch.tensor([2, 1, 1, 4, 6, 3])


def test_grpo_hand_values():
    std = math.sqrt(1.0 / 3.0)  # unbiased: ((2/3)^2 + 2·(1/3)^2) / 2 = 1/3
    expected = torch.tensor([(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), 0, 0, 0])
    torch.testing.assert_close(grpo(REWARD, GROUP), expected)


def test_dr_grpo_hand_values():
    torch.testing.assert_close(dr_grpo(REWARD, GROUP), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))


def test_rloo_hand_values():
    # 1 − mean(0, 0) = 1; 0 − mean(1, 0) = −0.5; lone response → 0
    torch.testing.assert_close(rloo(REWARD, GROUP), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0]))


def test_opo_hand_values():
    # group 5: b = (2·1 + 1·0 + 1·0) / 4 = 0.5
    torch.testing.assert_close(opo(REWARD, GROUP, LENGTHS), torch.tensor([0.5, -0.5, -0.5, 0, 0, 0]))


def test_opo_zero_length_group_falls_back_to_mean():
    adv = opo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_opo_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        opo(REWARD, GROUP)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_all_equal_and_single_groups_are_zero_and_finite(name):
    reward = torch.tensor([2.0, 2.0, 2.0, -1.0])
    group = torch.tensor([0, 0, 0, 1])
    adv = compute_advantages(name, reward, group, torch.tensor([3, 1, 2, 5]))
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros(4))


def _loop_reference(name, reward, group, lengths):
    out = []
    for i in range(len(reward)):
        members = [j for j in range(len(reward)) if group[j] == group[i]]
        rs = [reward[j] for j in members]
        n = len(rs)
        mean = sum(rs) / n
        if name == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in rs) / max(n - 1, 1))
            out.append((reward[i] - mean) / (std + 1e-6))
        elif name == "dr_grpo":
            out.append(reward[i] - mean)
        elif name == "rloo":
            out.append(0.0 if n == 1 else reward[i] - (sum(rs) - reward[i]) / (n - 1))
        else:
            w = sum(lengths[j] for j in members)
            b = sum(lengths[j] * reward[j] for j in members) / w
            out.append(reward[i] - b)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_matches_loop_reference_on_random_groups(name):
    g = torch.Generator().manual_seed(3)
    B = 40
    reward = torch.randint(0, 3, (B,), generator=g).double()
    group = torch.randint(0, 9, (B,), generator=g) * 3  # non-contiguous ids
    lengths = torch.randint(1, 50, (B,), generator=g)
    got = compute_advantages(name, reward, group, lengths)
    ref = _loop_reference(name, reward.tolist(), group.tolist(), lengths.tolist())
    torch.testing.assert_close(got, ref)


def test_rloo_is_scaled_dr_grpo():
    g = torch.Generator().manual_seed(0)
    reward = torch.rand(12, generator=g)
    group = torch.arange(12) // 4
    torch.testing.assert_close(rloo(reward, group), dr_grpo(reward, group) * 4 / 3)


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError) as e:
        compute_advantages("ppo", REWARD, GROUP)
    for name in ADVANTAGES:
        assert name in str(e.value)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="group_id"):
        grpo(REWARD, GROUP[:3])


def test_broadcast_to_tokens():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask)
    assert torch.equal(out, torch.tensor([[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]))


def test_integer_rewards_are_accepted():
    adv = dr_grpo(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_two_response_groups_hand_values():
    """Groups of two: the unbiased std divides by n − 1 = 1, and RLOO's baseline is the other response."""
    reward, group = torch.tensor([1.0, 0.0, 3.0, 2.0]), torch.tensor([0, 0, 1, 1])
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # centred ±0.5, var = (0.25 + 0.25) / 1
    torch.testing.assert_close(grpo(reward, group), torch.tensor([a, -a, a, -a]))
    torch.testing.assert_close(rloo(reward, group), torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_opo_weighted_baseline_when_lengths_sum_to_one():
    # lengths (1, 0): b = (1·1 + 0·0) / 1 = 1, not the plain mean 0.5
    torch.testing.assert_close(opo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([1, 0])),
                               torch.tensor([0.0, -1.0]))


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_integer_rewards_give_float32_values_of_every_estimator(name):
    ints = compute_advantages(name, torch.tensor([1, 0, 0, 2, 2]), torch.tensor([0, 0, 0, 1, 1]), torch.tensor([2, 1, 1, 3, 1]))
    floats = compute_advantages(name, torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0]), torch.tensor([0, 0, 0, 1, 1]),
                                torch.tensor([2, 1, 1, 3, 1]))
    assert ints.dtype == torch.float32
    torch.testing.assert_close(ints, floats)
    assert float(ints[0]) > 0.0 and float(ints[3]) == 0.0


def test_advantage_dtype_follows_the_reward():
    out = opo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.25, -0.75]))
    tok = broadcast_to_tokens(torch.tensor([2, -1]), torch.tensor([[True, False], [True, True]]))
    assert tok.dtype == torch.float32 and tok.tolist() == [[2.0, 0.0], [-1.0, -1.0]]


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_empty_batch_gives_empty_advantages(name):
    out = compute_advantages(name, torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_error_messages_name_the_problem_exactly():
    with pytest.raises(ValueError, match=r"^reward must be a 1-D \[B\] tensor, got shape \(2, 3\)$"):
        grpo(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^opo needs lengths \[B\] \(response lengths in tokens\)$"):
        opo(REWARD, GROUP)
    with pytest.raises(ValueError, match=r"^lengths has shape \(2,\), reward has \(6,\); both must be \[B\]$"):
        opo(REWARD, GROUP, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"^lengths must be >= 0$"):
        opo(REWARD, GROUP, torch.tensor([1, 2, 3, 4, -1, 6]))
    with pytest.raises(ValueError, match=r"^unknown advantage estimator 'ppo'; choose one of: grpo, dr_grpo, rloo, opo$"):
        compute_advantages("ppo", REWARD, GROUP)
