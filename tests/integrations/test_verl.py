"""verl adapter: registered losses against verl's own, entropy supply, trainer hooks, rollout dump.

Needs ``pip install torch==2.13.0 verl`` (no extras); skipped when verl is absent (CI runs it in a
separate environment: .ci/extras).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import entropy_lens.integrations.verl as ev  # noqa: E402
from entropy_lens.io.rollouts import load_rollouts, old_logp_grid, tokenize_rollouts  # noqa: E402
from entropy_lens.methods import (  # noqa: E402
    MethodContext,
    apply_method,
    get_method,
    list_methods,
    method_loss,
)
from entropy_lens.tokens import TokenBatch  # noqa: E402

WORDS = [str(i) for i in range(20)] + ["+", "-", "=", "Answer:", "the", "is", "what", "?", "so", "and"]


def make_tokenizer():
    """A word-level fast tokenizer (vocabulary < 48 tokens), as tests/conftest.py builds it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "\n"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")


def ev_version() -> str:
    import verl

    return verl.__version__


def actor_config(policy_loss: dict | None = None, **kw) -> ActorConfig:
    """verl's actor config (frozen fields: everything is set at construction)."""
    from verl.workers.config.actor import PolicyLossConfig

    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=4)
    base.update(kw)
    return ActorConfig(policy_loss=PolicyLossConfig(**(policy_loss or {})), **base)


def random_batch(seed: int, B: int = 8, T: int = 24, off_policy: float = 0.3, adv_scale: float = 2.0):
    """Right-padded micro-batch: log p_old, log p (requires grad), group-constant advantages, mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 4.0
    # folded, not clamped: no ties (a tie's order in verl's top-k is unspecified; ours is by position)
    logp = -(old + off_policy * torch.randn(B, T, generator=g)).abs()
    adv = (adv_scale * torch.randn(B, 1, generator=g)).expand(B, T).contiguous()
    old = torch.where(mask, old, torch.zeros(()))  # padding holds junk-free zeros, as verl's
    return old, logp.requires_grad_(), adv, mask


def loss_and_grad(fn, old, logp, adv, mask, **kw):
    lp = logp.detach().clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, metrics


# --------------------------------------------------------------------------------- registration


def test_every_method_is_a_verl_loss():
    for name in list_methods():
        fn = get_policy_loss_fn(f"el_{name}")
        assert isinstance(fn, ev.VerlPolicyLoss) and fn.method == name
    # verl's own losses are left alone
    assert not isinstance(get_policy_loss_fn("clip_cov"), ev.VerlPolicyLoss)
    assert not isinstance(get_policy_loss_fn("vanilla"), ev.VerlPolicyLoss)
    with pytest.raises(ValueError, match="verl already has a policy loss named 'kl_cov'"):
        ev.register_verl_loss("kl_cov", "kl_cov")
    with pytest.raises(ValueError, match="scope must be 'micro'"):
        ev.register_verl_loss("el_test_scope", "steer", {"scope": "batch"})
    with pytest.raises(ValueError, match="unknown parameter"):
        ev.register_verl_loss("el_test_bad", "steer", {"lamda_min": 0.7})


def test_config_mapping():
    cfg = actor_config(clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=10.0)
    assert ev.verl_config_params("grpo", cfg) == {"eps_low": 0.1, "eps_high": 0.3, "dual_clip": 10.0}
    assert ev.verl_config_params("clip_higher", cfg) == {"eps_low": 0.1, "dual_clip": 10.0}  # keeps ε_high 0.28
    pl = cfg.policy_loss
    assert ev.verl_config_params("kl_cov", cfg) == {"k": pl.kl_cov_ratio, "beta": pl.ppo_kl_coef}  # no clip kept
    assert ev.verl_config_params("clip_cov", cfg) == {
        "eps_low": 0.1, "eps_high": 0.3, "dual_clip": 10.0,
        "clip_ratio": pl.clip_cov_ratio, "lb": pl.clip_cov_lb, "ub": pl.clip_cov_ub,
    }
    # explicit parameters beat verl's config, which beats the method's defaults
    loss = ev.VerlPolicyLoss("steer", {"lambda_min": 0.7, "eps_high": 0.28})
    p = loss.resolve_params(cfg)
    assert (p.lambda_min, p.eps_low, p.eps_high, p.dual_clip) == (0.7, 0.1, 0.28, 10.0)


def test_params_from_env():
    assert ev.params_from_env({}) == {}
    assert ev.params_from_env({ev.ENV_PARAMS: '{"steer": {"lambda_min": 0.7}}'}) == {"steer": {"lambda_min": 0.7}}
    with pytest.raises(ValueError, match="ENTROPY_LENS_VERL_PARAMS: malformed JSON"):
        ev.params_from_env({ev.ENV_PARAMS: "{steer"})
    with pytest.raises(ValueError, match="expected a JSON object"):
        ev.params_from_env({ev.ENV_PARAMS: '{"steer": 0.7}'})
    with pytest.raises(ValueError, match="unknown method"):
        ev.register_verl_losses(params={"stear": {}})


# ------------------------------------------------------------------------ equality with verl's own


AGG_CASES = [
    ("token-mean", {}),
    ("token-mean", {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 16}),
    ("token-sum", {"dp_size": 2}),
    ("seq-mean-token-mean", {}),
    ("seq-mean-token-mean", {"dp_size": 4, "global_batch_size": 64}),
    ("seq-mean-token-sum", {"dp_size": 2, "global_batch_size": 32}),
    ("seq-mean-token-sum-norm", {}),
    ("seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 32, "loss_scale_factor": 40}),
]


def verl_has(agg: str) -> bool:
    """Whether this verl's agg_loss knows mode ``agg`` (``token-sum`` arrived after 0.8)."""
    try:
        core_algos.agg_loss(torch.zeros(1, 1), torch.ones(1, 1), agg)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("agg,info", AGG_CASES)
def test_grpo_equals_verl_vanilla(agg, info):
    if not verl_has(agg):
        pytest.skip(f"verl {ev_version()} has no loss_agg_mode {agg!r}")
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    cfg.global_batch_info.update(info)
    for seed in range(4):
        old, logp, adv, mask = random_batch(seed, off_policy=0.4)
        mask[seed % mask.shape[0]] = False  # one empty sequence: the per-sequence modes must skip it
        w = None
        if seed % 2:
            w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
        kw = dict(loss_agg_mode=agg, config=cfg, rollout_is_weights=w)
        ref, g_ref, m_ref = loss_and_grad(get_policy_loss_fn("vanilla"), old, logp, adv, mask, **kw)
        ours, g_ours, m_ours = loss_and_grad(get_policy_loss_fn("el_grpo"), old, logp, adv, mask, **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)
        for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
            assert m_ours[key] == pytest.approx(m_ref[key], rel=1e-5, abs=1e-7)
        assert m_ours["actor/pg_clipfrac"] > 0.0  # the batch really exercises the clip


def _forced_randperm(eligible: torch.Tensor, chosen: torch.Tensor):
    """A torch.randperm replacement that makes verl's Clip-Cov draw pick ``chosen`` (its
    candidates are ``eligible``'s positions in row-major order, as verl's ``torch.nonzero``)."""
    flat_chosen = chosen.reshape(-1)[torch.nonzero(eligible.reshape(-1)).squeeze(1)]
    order = torch.argsort((~flat_chosen).to(torch.int64), stable=True)

    def randperm(n, *args, **kwargs):
        assert n == order.numel(), (n, order.numel())
        return order.clone()

    return randperm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_equals_verl_with_the_draw_forced_equal(seed, monkeypatch):
    """verl's clip_cov has no dual clip: ours is run with dual_clip=None. verl's clip_cov_ratio is a
    fraction, as ours; both pick max(⌊r·N⌋, 1) of the eligible tokens (lb < c < ub, not clipped)."""
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.2, policy_loss={"clip_cov_ratio": 0.05})
    old, logp, adv, mask = random_batch(seed, B=8, T=32, off_policy=0.3, adv_scale=3.0)
    ours_fn = ev.VerlPolicyLoss("clip_cov", {"dual_clip": None}, seed=100 + seed)
    params = ours_fn.resolve_params(cfg)
    assert params.clip_ratio == 0.05 and params.lb == 1.0 and params.ub == 5.0
    # the selection our loss will make (same seed, fresh generator)
    batch = _token_batch(old, logp, adv, mask)
    terms = get_method("clip_cov")(batch, params, MethodContext(generator=torch.Generator().manual_seed(100 + seed)))
    chosen = mask & (terms.weight == 0)
    n_eligible = int(terms.stats["n_eligible"])
    n_pick = max(int(0.05 * int(mask.sum())), 1)
    assert n_eligible > n_pick >= 1  # a real random draw among the eligible tokens
    assert int(chosen.sum()) == n_pick

    ours, g_ours, m_ours = loss_and_grad(ours_fn, old, logp, adv, mask, loss_agg_mode="token-mean", config=cfg)
    # verl's candidate set, recomputed as verl does, must equal ours
    ratio = torch.exp(logp.detach() - old)
    clipped = (-adv * torch.clamp(ratio, 0.8, 1.2) > -adv * ratio) & mask
    m = mask.float()
    cov = (adv - (adv * m).sum() / m.sum()) * (logp.detach() - (logp.detach() * m).sum() / m.sum())
    eligible = mask & ~clipped & (cov > 1.0) & (cov < 5.0)
    assert int(eligible.sum()) == n_eligible
    monkeypatch.setattr(torch, "randperm", _forced_randperm(eligible, chosen))
    ref, g_ref, m_ref = loss_and_grad(get_policy_loss_fn("clip_cov"), old, logp, adv, mask, loss_agg_mode="token-mean", config=cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)
    assert m_ours["entropy_lens/clip_cov/n_selected"] == n_pick


def test_clip_cov_equals_verl_when_every_eligible_token_is_picked():
    """No forcing needed when r·N covers every eligible token: both selections are then the same."""
    cfg = actor_config(policy_loss={"clip_cov_ratio": 0.9})
    for seed in range(3):
        old, logp, adv, mask = random_batch(seed, adv_scale=3.0)
        kw = dict(loss_agg_mode="token-mean", config=cfg)
        ref, g_ref, _ = loss_and_grad(get_policy_loss_fn("clip_cov"), old, logp, adv, mask, **kw)
        ours_fn = ev.VerlPolicyLoss("clip_cov", {"dual_clip": None})
        ours, g_ours, m = loss_and_grad(ours_fn, old, logp, adv, mask, **kw)
        assert m["entropy_lens/clip_cov/n_selected"] == m["entropy_lens/clip_cov/n_eligible"] > 0
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_kl_cov_equals_verl(agg):
    """el_kl_cov reads verl's kl_cov_ratio (a fraction) and ppo_kl_coef; no PPO clip in either."""
    cfg = actor_config(policy_loss={"kl_cov_ratio": 0.05, "ppo_kl_coef": 1.0})
    for seed in range(4):
        old, logp, adv, mask = random_batch(seed, off_policy=0.5)
        kw = dict(loss_agg_mode=agg, config=cfg)
        ref, g_ref, m_ref = loss_and_grad(get_policy_loss_fn("kl_cov"), old, logp, adv, mask, **kw)
        ours, g_ours, m = loss_and_grad(get_policy_loss_fn("el_kl_cov"), old, logp, adv, mask, **kw)
        assert m["entropy_lens/kl_cov/n_selected"] == max(int(0.05 * int(mask.sum())), 1)
        assert m["entropy_lens/kl_cov/abs_logratio_mean_selected"] > 0.0  # the penalty is live
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------- STEER


def _token_batch(old, logp, adv, mask, entropy=None):
    z = torch.zeros_like(old)
    B = mask.shape[0]
    return TokenBatch(
        token_ids=torch.zeros(mask.shape, dtype=torch.long), mask=mask, logp=logp.detach(), old_logp=old,
        entropy=z if entropy is None else entropy, sum_p2=z, sum_p2_logp=z, adv=adv,
        group_id=torch.zeros(B, dtype=torch.long), reward=torch.zeros(B),
    )


def test_steer_runs_through_get_policy_loss_fn():
    cfg = actor_config(clip_ratio_c=10.0)
    old, logp, adv, mask = random_batch(0, off_policy=0.1)
    g = torch.Generator().manual_seed(5)
    h_old = torch.rand(mask.shape, generator=g) * 3.0
    h_cur = (h_old + 0.5 * torch.rand(mask.shape, generator=g)).requires_grad_()
    fn = get_policy_loss_fn("el_steer")
    with ev.entropy_scope(current=h_cur, old=h_old):
        loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                           loss_agg_mode="token-mean", config=cfg, rollout_is_weights=None)
    assert ev.current_entropy() is None  # the scope is gone after the block
    assert loss.requires_grad and torch.isfinite(loss)
    # code-form ω reads H_old; the result is the registry's own STEER loss
    params = fn.resolve_params(cfg)
    assert params.dual_clip == 10.0 and params.omega == "code"
    terms = apply_method("steer", _token_batch(old, logp, adv, mask, h_old), params)
    expected = method_loss(terms, logp, old, adv, mask)
    torch.testing.assert_close(loss, expected)
    assert metrics["entropy_lens/entropy_source"] == 2.0
    assert metrics["entropy_lens/weight_min"] == pytest.approx(0.8, abs=1e-6)
    assert 0.8 <= metrics["entropy_lens/weight_mean"] < 1.0
    assert sum(metrics[f"entropy_lens/q{k}_share"] for k in range(1, 5)) == pytest.approx(1.0)
    assert metrics["entropy_lens/entropy_mean"] == pytest.approx(float(h_old[mask].mean()), rel=1e-5)
    # the gradient flows through log p only (weights carry none)
    loss.backward()
    assert logp.grad is not None and h_cur.grad is None


def test_steer_entropy_sources():
    cfg = actor_config()
    old, logp, adv, mask = random_batch(1)
    h = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 2.0
    fn = get_policy_loss_fn("el_steer")
    kw = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg)
    # only the current entropy: code form falls back to it (exact on the first mini-batch of a step)
    _, m = fn(**kw, entropy=h)
    assert m["entropy_lens/entropy_source"] == 1.0
    # paper form prefers the current entropy
    paper = ev.register_verl_loss("el_steer_paper", "steer", {"omega": "paper", "entropy": "current"})
    _, m = paper(**kw, entropy=h, old_entropy=h * 0.5)
    assert m["entropy_lens/entropy_source"] == 1.0
    # a narrower entropy (nested or shorter) is padded to log_prob's width
    nested = torch.nested.nested_tensor([h[b, : int(mask[b].sum())] for b in range(mask.shape[0])], layout=torch.jagged)
    l1, _ = fn(**kw, old_entropy=nested)
    l2, _ = fn(**kw, old_entropy=h)
    torch.testing.assert_close(l1, l2)
    # none at all: a one-line error saying what to set
    with pytest.raises(RuntimeError, match="calculate_entropy=True"):
        fn(**kw)
    # entropy_bonus needs the current entropy with its gradient
    hc = h.clone().requires_grad_()
    loss, _ = get_policy_loss_fn("el_entropy_bonus")(**kw, entropy=hc)
    loss.backward()
    assert hc.grad is not None and float(hc.grad[mask].abs().sum()) > 0
    with pytest.raises(RuntimeError, match="current entropy"):
        get_policy_loss_fn("el_entropy_bonus")(**kw, old_entropy=h)


# ------------------------------------------------------------------------ actor hook (ppo_loss)


def _engine_micro_batch(old, logp, adv, mask, old_entropy, cur_entropy, prompt_len=3, old_key="old_entropy"):
    """A padded micro-batch TensorDict and a flat model output, laid out as verl's engine does."""
    from verl.utils import tensordict_utils as tu

    B, T = mask.shape
    lengths = mask.sum(-1)
    prompts = torch.full((B, prompt_len), 7, dtype=torch.long)
    responses = torch.where(mask, torch.full((B, T), 9), torch.zeros(()).long())
    attn = torch.cat([torch.ones(B, prompt_len, dtype=torch.long), mask.long()], dim=1)
    flat_lp, flat_h = [], []
    for b in range(B):  # test fixture: verl's flat (total_nnz,) layout, shifted by one token
        n = prompt_len + int(lengths[b])
        lp_row = torch.zeros(n)
        h_row = torch.zeros(n)
        lp_row[prompt_len - 1 : n - 1] = logp.detach()[b, : int(lengths[b])]
        h_row[prompt_len - 1 : n - 1] = cur_entropy[b, : int(lengths[b])]
        flat_lp.append(lp_row)
        flat_h.append(h_row)
    model_output = {"log_probs": torch.cat(flat_lp).requires_grad_(), "entropy": torch.cat(flat_h)}
    data = tu.get_tensordict(
        {"prompts": prompts, "responses": responses, "attention_mask": attn, "response_mask": mask.long(),
         "old_log_probs": old, "advantages": adv, old_key: old_entropy},
        non_tensor_dict={"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None},
    )
    return model_output, data


def test_wrapped_ppo_loss_hands_the_entropies_to_steer():
    from verl.workers.utils import losses

    assert getattr(losses.ppo_loss, "_entropy_lens_wrapped", False)
    old, logp, adv, mask = random_batch(3, B=4, T=10)
    g = torch.Generator().manual_seed(3)
    h_old = torch.rand(mask.shape, generator=g) * 2.0
    h_cur = torch.rand(mask.shape, generator=g) * 2.0
    cfg = actor_config(calculate_entropy=True, policy_loss={"loss_mode": "el_steer"})
    model_output, data = _engine_micro_batch(old, logp, adv, mask, h_old, h_cur)
    loss, metrics = losses.ppo_loss(cfg, model_output, data)
    direct, _ = get_policy_loss_fn("el_steer")(old_log_prob=old, log_prob=logp.detach(), advantages=adv,
                                               response_mask=mask, config=cfg, old_entropy=h_old)
    torch.testing.assert_close(loss.detach(), direct)
    assert metrics["entropy_lens/entropy_source"].values == [2.0]  # verl wraps our floats in its Metric
    # verl's v1 trainer keeps H_old under "entropy", as a nested (jagged) per-response tensor
    jagged = torch.nested.nested_tensor([h_old[b, : int(mask[b].sum())] for b in range(mask.shape[0])], layout=torch.jagged)
    model_output, data = _engine_micro_batch(old, logp, adv, mask, jagged, h_cur, old_key="entropy")
    loss_v1, _ = losses.ppo_loss(cfg, model_output, data)
    torch.testing.assert_close(loss_v1.detach(), direct)
    # paper form inside the same wrapper reads the forward's current entropy
    cfg2 = actor_config(calculate_entropy=True, policy_loss={"loss_mode": "el_steer_paper2"})
    ev.register_verl_loss("el_steer_paper2", "steer", {"omega": "paper", "entropy": "current"})
    model_output, data = _engine_micro_batch(old, logp, adv, mask, h_old, h_cur)
    loss2, _ = losses.ppo_loss(cfg2, model_output, data)
    direct2, _ = get_policy_loss_fn("el_steer_paper2")(old_log_prob=old, log_prob=logp.detach(), advantages=adv,
                                                       response_mask=mask, config=cfg2, entropy=h_cur)
    torch.testing.assert_close(loss2.detach(), direct2)
    # a verl loss mode passes straight through (no scope published)
    cfg3 = actor_config()
    model_output, data = _engine_micro_batch(old, logp, adv, mask, h_old, h_cur)
    loss3, _ = losses.ppo_loss(cfg3, model_output, data)
    ref3, _ = get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=logp.detach(), advantages=adv,
                                            response_mask=mask, config=cfg3)
    torch.testing.assert_close(loss3.detach(), ref3)


# --------------------------------------------------------------------------- trainer hooks, dump


def _legacy_batch(tokenizer):
    """A DataProto as the legacy trainer holds it after the actor update (left-padded prompts)."""
    prompts_txt = [["what", "is", "1", "+", "2", "?"], ["what", "is", "3", "?"]]
    resp_txt = [["so", "3"], ["3", "+", "1", "is", "4"]]
    B, P, T = 4, 6, 5
    vocab = tokenizer.get_vocab()
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    for b in range(B):
        p = [vocab[w] for w in prompts_txt[b // 2]]
        r = [vocab[w] for w in resp_txt[b % 2]]
        prompts[b, P - len(p):] = torch.tensor(p)
        responses[b, : len(r)] = torch.tensor(r)
        attn[b, P - len(p): P] = 1
        attn[b, P: P + len(r)] = 1
    r_mask = attn[:, P:]
    g = torch.Generator().manual_seed(0)
    old = torch.where(r_mask.bool(), -torch.rand(B, T, generator=g), torch.zeros(()))
    ent = torch.where(r_mask.bool(), torch.rand(B, T, generator=g) * 2, torch.zeros(()))
    scores = torch.zeros(B, T)
    scores[torch.arange(B), r_mask.sum(-1) - 1] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None] * r_mask
    batch = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attn, "response_mask": r_mask,
                 "old_log_probs": old, "advantages": adv, "token_level_scores": scores},
        non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)},
    )
    return batch, ent


def _fake_legacy_trainer_class():
    class FakeRayPPOTrainer:
        def __init__(self, tokenizer, loss_mode, rollout_dir, entropys):
            self.tokenizer = tokenizer
            self.global_steps = 7
            self.logged = []
            self._entropys = entropys
            self.config = {"actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": loss_mode}}},
                           "trainer": {"rollout_data_dir": rollout_dir}}

        def _compute_old_log_prob(self, batch):
            out = DataProto.from_dict(tensors={"old_log_probs": batch.batch["old_log_probs"].clone(),
                                               "entropys": self._entropys.clone()})
            return out, 0.5

        def _log_rollout_data(self, batch, reward_extra_infos_dict, timing_raw, rollout_data_dir):
            self.logged.append(rollout_data_dir)

    return FakeRayPPOTrainer


def test_legacy_trainer_hook_keeps_old_entropy_and_dumps_token_rollouts(tmp_path):
    tok = make_tokenizer()
    batch, ent = _legacy_batch(tok)
    cls = ev.patch_trainer_class(_fake_legacy_trainer_class())
    assert ev.patch_trainer_class(cls) is cls and cls._entropy_lens_patched  # idempotent
    trainer = cls(tok, "el_steer", None, ent)
    out, mfu = trainer._compute_old_log_prob(batch)
    assert mfu == 0.5
    torch.testing.assert_close(out.batch["old_entropy"], ent)  # H_old survives verl's pop("entropys")
    # a verl loss mode without a dump folder: nothing added
    plain = cls(tok, "vanilla", None, ent)
    assert "old_entropy" not in plain._compute_old_log_prob(batch)[0].batch.keys()

    batch = batch.union(out)
    trainer._log_rollout_data(batch, {}, {}, str(tmp_path))
    assert trainer.logged == [str(tmp_path)]  # verl's own dump still runs
    path = tmp_path / "entropy_lens" / "7.parquet"
    assert path.exists()
    df = load_rollouts(path)  # entropy_lens' reader accepts it as is
    tokd = tokenize_rollouts(df, tok, path)
    assert not tokd.retokenized  # exact ids, no re-tokenisation
    r_mask = batch.batch["attention_mask"][:, 6:].bool()
    for b in range(4):
        assert tokd.response_ids[b] == batch.batch["responses"][b][r_mask[b]].tolist()
        assert tokd.prompt_ids[b] == batch.batch["prompts"][b][batch.batch["attention_mask"][b, :6].bool()].tolist()
        np.testing.assert_allclose(df["entropy"].iloc[b], ent[b][r_mask[b]].numpy(), rtol=1e-6)
        np.testing.assert_allclose(df["adv"].iloc[b], batch.batch["advantages"][b][r_mask[b]].numpy())
    grid = old_logp_grid(df, [len(r) for r in tokd.response_ids], path)
    torch.testing.assert_close(grid[r_mask[:, : grid.shape[1]]], batch.batch["old_log_probs"][r_mask].float())
    assert df["reward"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert df["group"].tolist() == ["a", "a", "b", "b"] and df["group_id"].tolist() == [0, 0, 1, 1]
    assert df["prompt"].iloc[0] == "what is 1 + 2 ?" and df["response"].iloc[1] == "3 + 1 is 4"
    assert set(df["step"]) == {7}


def test_v1_trainer_dump_reads_transfer_queue(tmp_path, monkeypatch):
    tok = make_tokenizer()
    nt = lambda rows, dtype: torch.nested.nested_tensor([torch.tensor(r, dtype=dtype) for r in rows], layout=torch.jagged)  # noqa: E731
    fields = {
        "uid": np.array(["g0", "g0"], dtype=object),
        "prompts": nt([[9, 10, 12], [9, 11]], torch.long),
        "responses": nt([[13, 14], [15, 16, 17]], torch.long),
        "rm_scores": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        "old_log_probs": nt([[-0.1, -0.2], [-0.3, -0.4, -0.5]], torch.float32),
        "advantages": torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]),
        "entropy": nt([[1.0, 2.0], [0.5, 0.25, 0.125]], torch.float32),
    }
    calls = []

    def kv_batch_get(keys, partition_id, select_fields):
        calls.append((tuple(keys), partition_id, tuple(select_fields)))
        return {k: fields[k] for k in select_fields}

    monkeypatch.setitem(sys.modules, "transfer_queue", types.SimpleNamespace(kv_batch_get=kv_batch_get))

    class FakePPOTrainer:
        tokenizer = tok
        global_steps = 3

        def _log_rollout_data(self, batch, timing_raw, rollout_data_dir):
            pass

    ev.patch_trainer_class(FakePPOTrainer)
    FakePPOTrainer()._log_rollout_data(types.SimpleNamespace(keys=["k0", "k1"], partition_id="train"), {}, str(tmp_path))
    assert calls and calls[0][:2] == (("k0", "k1"), "train")
    df = load_rollouts(tmp_path / "entropy_lens" / "3.parquet")
    assert [list(x) for x in df["response_ids"]] == [[13, 14], [15, 16, 17]]
    assert [list(x) for x in df["adv"]] == [[1.0, 1.0], [-1.0, -1.0, -1.0]]
    np.testing.assert_allclose(df["entropy"].iloc[1], [0.5, 0.25, 0.125])
    assert df["reward"].tolist() == [1.0, 0.0]


def test_rollout_frame_rejects_misaligned_rows():
    with pytest.raises(ValueError, match="row 1: old_logp does not match the response length"):
        ev.rollout_frame([[1], [2]], [[3, 4], [5]], [[0.0, 0.0], [0.0, 0.0]], [[1, 1], [1]], [1, 0], ["a", "a"])
    with pytest.raises(ValueError, match="reward has 2 rows, response_ids has 1"):
        ev.rollout_frame([[1]], [[3]], [[0.0]], [[1.0]], [1, 0], ["a"])


def test_trainer_hook_patches_a_trainer_module_on_import(tmp_path, monkeypatch):
    (tmp_path / "el_fake_ray_trainer.py").write_text(textwrap.dedent("""
        class RayPPOTrainer:
            def _compute_old_log_prob(self, batch):
                return batch, None

            def _log_rollout_data(self, batch, reward_extra_infos_dict, timing_raw, rollout_data_dir):
                return None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ev.TRAINER_TARGETS, "el_fake_ray_trainer", "RayPPOTrainer")
    ev.install_trainer_hooks()
    import el_fake_ray_trainer  # noqa: F401  (patched by the import hook)

    assert el_fake_ray_trainer.RayPPOTrainer.__dict__.get("_entropy_lens_patched") is True
    sys.modules.pop("el_fake_ray_trainer", None)


def test_real_legacy_trainer_is_patched_when_importable():
    try:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    except ImportError as exc:  # verl without its serving extras (uvicorn, cachetools, ...)
        pytest.skip(f"verl.trainer.ppo.ray_trainer not importable here: {exc}")
    assert RayPPOTrainer.__dict__.get("_entropy_lens_patched") is True


# ------------------------------------------------------------------------ loading and isolation


def test_verl_loads_the_adapter_in_every_process_via_its_env_var():
    code = textwrap.dedent("""
        import verl
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        from verl.workers.utils import losses
        fn = get_policy_loss_fn("el_steer")
        assert type(fn).__name__ == "VerlPolicyLoss", fn
        assert fn.resolve_params(None).lambda_min == 0.7
        assert losses.ppo_loss._entropy_lens_wrapped
        print("OK")
    """)
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="entropy_lens.integrations.verl",
               ENTROPY_LENS_VERL_PARAMS='{"steer": {"lambda_min": 0.7}}')
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_core_import_pulls_neither_verl_nor_trl():
    code = (
        "import sys, entropy_lens, entropy_lens.methods, entropy_lens.integrations\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('verl', 'trl'))\n"
        "assert not bad, bad\nprint('OK')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_verl_aggregate_matches_agg_loss_directly():
    per_tok = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[2] = False
    for agg, info in [(a, i) for a, i in AGG_CASES if verl_has(a)]:
        ours = ev.verl_aggregate(per_tok, mask, agg, info)
        ref = core_algos.agg_loss(per_tok, mask.float(), agg, **info)
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        ev.verl_aggregate(per_tok, mask, "token-mean", {"dp_size": 2})
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        ev.verl_aggregate(per_tok, mask, "token-median")
    assert math.isfinite(float(ev.verl_aggregate(per_tok, torch.zeros_like(mask), "seq-mean-token-sum-norm")))


# ------------------------------------------------------------------ recipes (examples/verl/)

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "verl")
RECIPES = ("grpo", "steer", "clip_cov", "kl_cov")
RECIPE_VARIABLES = {"RECIPE_DIR": RECIPE_DIR, "MODEL_PATH": "Qwen/Qwen2.5-Math-7B", "DATA_DIR": "/data/steer",
                    "RUN_DIR": "/runs/verl/x", "N_GPUS": "8", "N_NODES": "1", "ROLLOUT_TP": "2"}


def recipe(method: str) -> tuple[list[str], dict[str, str]]:
    """``(Hydra overrides, environment)`` of a recipe, read as run.sh reads its files."""
    import re

    variables = {**RECIPE_VARIABLES, "METHOD": method}
    overrides, env = [], {}
    for name in ("common", method):
        with open(os.path.join(RECIPE_DIR, f"{name}.overrides"), encoding="utf-8") as f:
            for line in (raw.strip() for raw in f):
                if not line or line.startswith("#"):
                    continue
                for var, value in variables.items():
                    line = line.replace(f"@{var}@", value)
                assert not re.search(r"@[A-Z_]+@", line), f"{name}.overrides: unknown variable in {line}"
                if line.startswith("env "):
                    key, _, value = line[4:].partition("=")
                    env[key] = value
                else:
                    overrides.append(line)
    return overrides, env


def compose_trainer_config(overrides: list[str]):
    """verl's own trainer config (the ppo_trainer.yaml it ships) with ``overrides``, composed by Hydra
    offline exactly as ``python -m verl.trainer.main_ppo`` composes it."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


#: what each recipe's loss must resolve to (the STEER paper's setting; Cui et al.'s 7B Clip-/KL-Cov)
RECIPE_PARAMS = {
    "grpo": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 10.0},
    "steer": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 10.0, "lambda_min": 0.8, "mapping": "exp",
              "omega": "code", "scope": "micro"},
    "clip_cov": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 10.0, "clip_ratio": 2e-4, "lb": 1.0, "ub": 5.0},
    "kl_cov": {"k": 2e-3, "beta": 1.0},
}


@pytest.mark.parametrize("method", RECIPES)
def test_recipe_composes_with_verls_config_and_builds_our_loss(method):
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    overrides, env = recipe(method)
    cfg = compose_trainer_config(overrides)  # a misspelt key fails here (see the test below)
    validate_config(cfg, use_reference_policy=False, use_critic=False)  # verl's own batch-size checks
    # the paper's setting, as verl will read it
    actor = cfg.actor_rollout_ref.actor
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n) == (512, 8)
    assert (actor.ppo_mini_batch_size, actor.ppo_micro_batch_size_per_gpu, actor.use_dynamic_bsz) == (32, 8, False)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 3072)
    assert (actor.optim.lr, actor.use_kl_loss, actor.entropy_coeff, actor.loss_agg_mode) == (1e-6, False, 0, "token-mean")
    assert (cfg.actor_rollout_ref.rollout.temperature, cfg.trainer.total_training_steps) == (1.0, 200)
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.use_kl_in_reward is False
    assert cfg.trainer.rollout_data_dir == "/runs/verl/x/rollouts"
    assert env["VERL_USE_EXTERNAL_MODULES"] == "entropy_lens.integrations.verl"
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "entropy_lens.integrations.verl"
    assert os.path.isfile(cfg.reward.custom_reward_function.path)
    # the actor config verl's workers build, and our loss from it
    actor_cfg = omega_conf_to_dataclass(actor)
    loss_mode = actor_cfg.policy_loss.loss_mode
    assert loss_mode == f"el_{method}"
    registered = get_policy_loss_fn(loss_mode)
    assert isinstance(registered, ev.VerlPolicyLoss) and registered.method == method
    loss = ev.VerlPolicyLoss(method, ev.params_from_env(env).get(method))  # as install() registers it
    params = loss.resolve_params(actor_cfg).to_dict()
    for key, value in RECIPE_PARAMS[method].items():
        assert params[key] == pytest.approx(value) if isinstance(value, float) else params[key] == value, key
    old, logp, adv, mask = random_batch(3, off_policy=0.1)
    h_old = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) * 3.0
    with ev.entropy_scope(old=h_old):
        value, metrics = loss(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                              loss_agg_mode=actor_cfg.loss_agg_mode, config=actor_cfg, rollout_is_weights=None)
    assert torch.isfinite(value) and value.requires_grad
    if method == "steer":
        assert metrics["entropy_lens/weight_min"] == pytest.approx(0.8, abs=1e-6)


def test_recipe_key_typo_fails_composition():
    from hydra.errors import ConfigCompositionException

    overrides, _ = recipe("steer")
    with pytest.raises(ConfigCompositionException, match="clip_ratio_hgh"):
        compose_trainer_config([*overrides, "actor_rollout_ref.actor.clip_ratio_hgh=0.28"])


def test_recipe_run_script_passes_exactly_the_parsed_overrides():
    import shlex

    env = dict(os.environ, DRY_RUN="1", **{k: v for k, v in RECIPE_VARIABLES.items() if k != "RECIPE_DIR"})
    res = subprocess.run(["bash", os.path.join(RECIPE_DIR, "run.sh"), "steer", "trainer.total_training_steps=2"],
                         check=False, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    *env_lines, command = res.stdout.strip().splitlines()
    overrides, recipe_env = recipe("steer")
    assert shlex.split(command) == ["python3", "-m", "verl.trainer.main_ppo", *overrides, "trainer.total_training_steps=2"]
    assert dict(line.split("=", 1) for line in env_lines) == recipe_env
    bad = subprocess.run(["bash", os.path.join(RECIPE_DIR, "run.sh"), "stear"], check=False, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_recipe_reward_grades_train_and_eval_answers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_reward", os.path.join(RECIPE_DIR, "reward.py"))
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    assert reward.compute_score("math_dapo", "so the sum is \\boxed{34}", "34") == 1.0
    assert reward.compute_score("math_dapo", "Answer: 35", "34") == -1.0
    assert reward.compute_score("math500", "so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert reward.compute_score("aime_2024_dapo_boxed", "Answer: 7", "8") == -1.0


# ----------------------------------------------------------------- methods added after the first set


@pytest.mark.parametrize("method", ["gspo", "gppo", "adaptive_entropy", "psr_only", "kl_ref"])
def test_new_methods_through_verl_equal_the_registry_loss_or_refuse(method):
    cfg = actor_config(clip_ratio_c=10.0)
    old, logp, adv, mask = random_batch(7, off_policy=0.3)
    h = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(7)) * 2.0).requires_grad_()
    ref = (old + 0.2).detach()
    fn = get_policy_loss_fn(f"el_{method}")
    kw = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg, entropy=h)
    if method == "psr_only":  # verl passes no rewards to policy losses
        with pytest.raises(RuntimeError, match="needs per-response rewards"):
            fn(**kw)
        return
    if method == "kl_ref":  # nor reference log-probs: refused unless a direct caller passes them
        with pytest.raises(RuntimeError, match=r"needs reference log-probs \(ref_logp\).*use_kl_loss"):
            fn(**kw)
        kw["ref_log_prob"] = ref
    loss, metrics = fn(**kw)
    params = fn.resolve_params(cfg)
    batch = _token_batch(old, logp, adv, mask, h.detach()).replace(ref_logp=ref if method == "kl_ref" else None)
    terms = apply_method(method, batch, params)
    expected = method_loss(terms, logp, old, adv, mask, h)
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())


def test_w_reinforce_under_verl_needs_the_grpo_advantage_mode():
    cfg = actor_config()
    old, logp, adv, mask = random_batch(8)
    kw = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg)
    with pytest.raises(RuntimeError, match="w_reinforce.advantage=grpo"):
        get_policy_loss_fn("el_w_reinforce")(**kw)
    loss, _ = ev.VerlPolicyLoss("w_reinforce", {"advantage": "grpo"})(**kw)
    assert torch.isfinite(loss)


def test_steer_current_entropy_option_reads_the_current_entropy():
    cfg = actor_config()
    old, logp, adv, mask = random_batch(9)
    h = torch.rand(mask.shape, generator=torch.Generator().manual_seed(9)) * 2.0
    kw = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg)
    cur = ev.VerlPolicyLoss("steer", {"entropy": "current"})
    _, m = cur(**kw, entropy=h, old_entropy=h * 0.5)
    assert m["entropy_lens/entropy_source"] == 1.0
    _, m = get_policy_loss_fn("el_steer")(**kw, entropy=h, old_entropy=h * 0.5)
    assert m["entropy_lens/entropy_source"] == 2.0  # the default: H_old, whichever ω form


@pytest.mark.parametrize("omega", ["lm_head", "lm_head_source"])
def test_steer_with_the_lm_head_score_is_refused_under_verl(omega):
    old, logp, adv, mask = random_batch(8)
    kw = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=actor_config())
    with pytest.raises(RuntimeError, match=f"omega={omega} needs the LM-head kernel score"):
        ev.VerlPolicyLoss("steer", {"omega": omega})(**kw)
    h = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) * 2.0
    loss, _ = ev.VerlPolicyLoss("steer", {"omega": "paper"})(**kw, entropy=h)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# Checkpoints: verl's own FSDPCheckpointManager writes the sharded actor; entropy_lens loads it
# ---------------------------------------------------------------------------------------------


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=47, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def _save_with_verl(rank: int, root: str, port: int) -> None:
    """One of 2 gloo ranks: wrap the tiny model in FSDP1 (with a device mesh, as verl does) and in
    FSDP2, and save each with verl's FSDPCheckpointManager (model, optimizer and extra state) under
    ``root/fsdp{1,2}/global_step_1/actor``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
        for fsdp in (1, 2):
            model = _tiny_llama(7)
            if fsdp == 2:
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
            else:
                model = FSDP(model, device_mesh=mesh, use_orig_params=True, device_id=torch.device("cpu"))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            mgr = FSDPCheckpointManager(model=model, optimizer=opt, lr_scheduler=None, processing_class=make_tokenizer(),
                                        checkpoint_config={"save_contents": ["model", "optimizer", "extra"]})
            mgr.save_checkpoint(os.path.join(root, f"fsdp{fsdp}", "global_step_1", "actor"), global_step=1)
    finally:
        dist.destroy_process_group()


def test_sharded_actor_saved_by_verl_loads_exactly(tmp_path):
    """verl's default checkpoint (no hf_model), FSDP1 and FSDP2: the shards merge into the original
    weights, without --allow-pickle (the DTensor files load with weights_only=True)."""
    import socket

    import torch.multiprocessing as mp

    from entropy_lens.model.load import load_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.path.insert(0, os.path.dirname(__file__))  # the spawned ranks import this module
    mp.spawn(_save_with_verl, args=(str(tmp_path), port), nprocs=2, join=True)
    ref = _tiny_llama(7)
    ids = torch.tensor([[1, 5, 9, 30, 46]])
    for fsdp in (1, 2):
        step = tmp_path / f"fsdp{fsdp}" / "global_step_1"
        actor = step / "actor"
        assert json.loads((actor / "fsdp_config.json").read_text()) == {"FSDP_version": fsdp, "world_size": 2}
        assert not list((actor / "huggingface").glob("*.safetensors"))
        model, _ = load_model(step, attn_implementation="eager")
        got, want = model.state_dict(), ref.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), fsdp
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits), fsdp
