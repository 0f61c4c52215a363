"""The trainer's update and sampling against plain references: loss aggregation per micro-batch
(gradient accumulation), H_old in the method's batch, groups mixed across micro-batches, DAPO's
dynamic sampling and overlong shaping, top-p passed to the sampler."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from entropy_lens.methods import (
    apply_method,
    make_context,
    method_loss,
    params_from_dict,
)
from entropy_lens.model.forward import pack, response_logp_entropy, response_stats
from entropy_lens.objective import AGG_MODES, aggregate
from entropy_lens.tokens import TokenBatch
from entropy_lens.train import build_config
from entropy_lens.train import step as train_step
from entropy_lens.train.step import (
    Sampled,
    _micro_share,
    loss_token_weights,
    micro_rows,
    sample_batch,
    update_minibatch,
)

# ---------------------------------------------------------------------------------------------
# aggregation weights: the loss is Σ_t w_t ℓ_t for the w of loss_token_weights
# ---------------------------------------------------------------------------------------------


def _ragged_mask(B: int = 6, T: int = 7) -> torch.Tensor:
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])[:B]
    return torch.arange(T)[None, :] < lengths[:, None]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("scope", ["micro", "mini"])
@pytest.mark.parametrize("micro", [1, 2, 4, 6])
def test_loss_token_weights_reproduce_the_accumulated_loss(mode, scope, micro):
    mask = _ragged_mask()
    ell = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    parts = micro_rows(mask.shape[0], micro)
    accumulated = sum(
        float(aggregate(ell[r], mask[r], mode, mask.shape[1])) * _micro_share(mode, scope, mask, r, len(parts))
        for r in parts
    )
    w = loss_token_weights(mask, mode, scope, micro, mask.shape[1])
    assert float((w * ell).sum()) == pytest.approx(accumulated, rel=1e-12)
    assert bool((w[~mask] == 0).all())


def test_micro_scope_weights_are_one_over_n_micro_times_the_micro_token_count():
    mask = _ragged_mask()
    w = loss_token_weights(mask, "token-mean", "micro", 2, None)
    lengths = mask.sum(-1).double()
    for b in range(6):
        micro_tokens = float(lengths[(b // 2) * 2:(b // 2) * 2 + 2].sum())
        expected = 1.0 / (3 * micro_tokens)
        assert torch.allclose(w[b][mask[b]], torch.full((int(lengths[b]),), expected, dtype=torch.float64))
    # mini scope: one global token mean, 1/L everywhere
    w_mini = loss_token_weights(mask, "token-mean", "mini", 2, None)
    assert torch.allclose(w_mini[mask], torch.full((int(mask.sum()),), 1.0 / float(mask.sum()), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# update_minibatch against a hand-written accumulation loop
# ---------------------------------------------------------------------------------------------


def _tiny_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg).double().eval()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [2, 2], [3, 1, 4], [5, 9]]
    lengths = [4, 2, 5, 3, 1, 4]
    responses = [torch.randint(3, 23, (n,), generator=g).tolist() for n in lengths]
    packed = pack(prompts, responses, 0)
    adv = torch.where(packed.mask, torch.randn(packed.mask.shape, generator=g, dtype=torch.float64), 0.0)
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    reward = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    return packed, adv, group, reward


@pytest.mark.parametrize("scope", ["micro", "mini"])
@pytest.mark.parametrize("method", ["grpo", "steer"])
def test_update_equals_a_plain_accumulation_loop(scope, method):
    packed, adv, group, reward = _batch()
    model = _tiny_lm()
    ref_model = _tiny_lm()
    with torch.no_grad():  # behaviour policy = a slightly different model, so ratios are not all 1
        old = response_stats(_tiny_lm(seed=5), packed, 1.0, micro_batch=6)
    old_logp, old_entropy = old["logp"].double(), old["entropy"].double()
    cfg = build_config("arithmetic-tiny", method, [
        "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=0", "optim.grad_clip=none", "optim.micro_batch=2",
        f"optim.agg_scope={scope}", "optim.mini_batches=1", "rollout.batch_size=8", "rollout.n=2",
    ])
    params = params_from_dict(method, cfg.method_param_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    update_minibatch(model, opt, packed, old_logp, adv, group, reward, cfg, params, torch.Generator().manual_seed(0),
                     where="test", old_entropy=old_entropy)

    # reference: terms from the statistics at θ with H_old, loss per micro-batch, plain SGD
    mask = packed.mask
    with torch.no_grad():
        now = response_stats(ref_model, packed, 1.0, micro_batch=6)
    batch = TokenBatch(token_ids=packed.response_ids, mask=mask, logp=now["logp"].double(), old_logp=old_logp,
                       entropy=now["entropy"].double(), sum_p2=now["sum_p2"].double(),
                       sum_p2_logp=now["sum_p2_logp"].double(), adv=adv, group_id=group, reward=reward,
                       old_entropy=old_entropy)
    terms = apply_method(method, batch, params, make_context(0, 0.5, batch_size=6, micro_batch_size=2))
    total = 0.0
    for i in range(0, 6, 2):
        rows = slice(i, i + 2)
        logp, ent = response_logp_entropy(ref_model, packed.select(rows), 1.0)
        part = method_loss(terms.rows(rows), logp, old_logp[rows], adv[rows], mask[rows], ent, "token-mean")
        if scope == "micro":
            total = total + part / 3
        else:
            total = total + part * float(mask[rows].sum()) / float(mask.sum())
    total.backward()
    with torch.no_grad():
        for p_ref in ref_model.parameters():
            p_ref -= 0.5 * p_ref.grad
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, p_ref, rtol=1e-10, atol=1e-12), name


def test_steer_in_the_trainer_reads_h_old_not_the_current_entropy(monkeypatch):
    packed, adv, group, reward = _batch()
    model = _tiny_lm()
    old_entropy = torch.where(packed.mask, torch.rand(packed.mask.shape, dtype=torch.float64) * 3, 0.0)
    seen = {}
    real = train_step.apply_method

    def spy(name, batch, params, ctx):
        seen["batch"] = batch
        return real(name, batch, params, ctx)

    monkeypatch.setattr(train_step, "apply_method", spy)
    cfg = build_config("arithmetic-tiny", "steer", ["optim.name=sgd", "optim.lr=1e-3", "optim.micro_batch=2",
                                                    "rollout.batch_size=8", "rollout.n=2", "optim.mini_batches=1"])
    with torch.no_grad():
        old_logp = response_stats(model, packed, 1.0, micro_batch=6)["logp"].double()
    params = params_from_dict("steer", {})
    out = update_minibatch(model, torch.optim.SGD(model.parameters(), lr=1e-3), packed, old_logp, adv, group, reward,
                           cfg, params, torch.Generator().manual_seed(0), where="test", old_entropy=old_entropy)
    assert torch.equal(seen["batch"].old_entropy, old_entropy)
    # the weights the update used are those of the H_old batch, not of the current-entropy batch
    b = seen["batch"]
    ctx = make_context(0, 1e-3, batch_size=6, micro_batch_size=2)
    with_old = apply_method("steer", b, params, ctx).weight[packed.mask]
    with_cur = apply_method("steer", b, replace(params, entropy="current"), ctx).weight[packed.mask]
    assert torch.allclose(out.weights.double(), with_old.double())
    assert not torch.allclose(with_old, with_cur)


# ---------------------------------------------------------------------------------------------
# mixing groups across micro-batches
# ---------------------------------------------------------------------------------------------


def test_mix_groups_shuffles_sequences_across_mini_batches(monkeypatch):
    from test_train import TINY

    seen: list[list[int]] = []
    real = train_step.update_minibatch

    def spy(model, optimizer, packed, old_logp, adv, group_id, *args, **kw):
        seen.append(group_id.tolist())
        return real(model, optimizer, packed, old_logp, adv, group_id, *args, **kw)

    monkeypatch.setattr(train_step, "update_minibatch", spy)
    from entropy_lens.train import train

    for mix in (False, True):
        seen.clear()
        cfg = build_config("arithmetic-tiny", "grpo", TINY + ["sft.steps=0", "log.jvp_every=0",
                                                              f"optim.mix_groups={str(mix).lower()}"], steps=1)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            train(cfg, d)
        flat = sorted(g for mb in seen for g in mb)
        assert flat == sorted(list(range(8)) * 4)  # every sequence once
        contiguous = all(mb == sorted(mb) and mb[-1] - mb[0] == 3 for mb in seen)
        assert contiguous is (not mix)


# ---------------------------------------------------------------------------------------------
# dynamic sampling
# ---------------------------------------------------------------------------------------------


def _fake_round(pattern: list[list[bool]], tag: str) -> Sampled:
    n = len(pattern[0])
    problems = [f"{tag}{g}" for g in range(len(pattern)) for _ in range(n)]
    correct = torch.tensor([c for grp in pattern for c in grp])
    return Sampled(problems=problems, prompt_ids=[[g] for g in range(len(pattern)) for _ in range(n)],
                   response_ids=[[1]] * len(problems), texts=[f"{tag}{i}" for i in range(len(problems))],
                   rewards=torch.where(correct, 1.0, -1.0), correct=correct,
                   group=torch.tensor([g for g in range(len(pattern)) for _ in range(n)]))


def _dyn_cfg(rounds: int):
    return build_config("arithmetic-tiny", "grpo", ["rollout.batch_size=8", "rollout.n=2", "optim.mini_batches=1",
                                                    "rollout.dynamic_sampling=true",
                                                    f"rollout.max_sampling_rounds={rounds}"])


def test_dynamic_sampling_drops_all_equal_groups_and_refills(monkeypatch):
    rounds = iter([
        _fake_round([[True, False], [True, True], [False, True], [False, False]], "a"),
        _fake_round([[False, False], [True, False], [True, True], [False, True]], "b"),
    ])
    monkeypatch.setattr(train_step, "_sample_round", lambda *a, **k: next(rounds))
    out = sample_batch(None, None, _dyn_cfg(3), {}, ("r", None))
    assert [p for p in out.problems[::2]] == ["a0", "a2", "b1", "b3"]
    assert out.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out.sampling == {"rounds": 2, "groups_sampled": 8, "groups_kept": 4, "groups_filled": 0}
    assert out.correct.reshape(4, 2).float().mean(-1).tolist() == [0.5] * 4


def test_dynamic_sampling_fills_with_dropped_groups_after_the_last_round(monkeypatch):
    rounds = iter([
        _fake_round([[True, True], [True, False], [False, False], [True, True]], "a"),
        _fake_round([[False, False], [False, False], [True, True], [True, True]], "b"),
    ])
    monkeypatch.setattr(train_step, "_sample_round", lambda *a, **k: next(rounds))
    out = sample_batch(None, None, _dyn_cfg(2), {}, ("r", None))
    assert out.sampling == {"rounds": 2, "groups_sampled": 8, "groups_kept": 1, "groups_filled": 3}
    assert [p for p in out.problems[::2]] == ["a1", "a0", "a2", "a3"]
    assert len(out.texts) == 8 and out.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_without_dynamic_sampling_one_round_is_used_as_is(monkeypatch):
    first = _fake_round([[True, True], [True, False], [False, False], [True, True]], "a")
    monkeypatch.setattr(train_step, "_sample_round", lambda *a, **k: first)
    cfg = build_config("arithmetic-tiny", "grpo", ["rollout.batch_size=8", "rollout.n=2", "optim.mini_batches=1"])
    out = sample_batch(None, None, cfg, {}, ("r", None))
    assert out is first and out.sampling is None


# ---------------------------------------------------------------------------------------------
# top-p and overlong shaping reach the sampler and the rewards
# ---------------------------------------------------------------------------------------------


def test_sample_round_passes_top_p_and_adds_the_overlong_penalty(monkeypatch):
    from entropy_lens.train.tasks import Problem

    calls = {}

    def fake_generate_ids(model, tok, prompts, n, max_new_tokens, batch_size, temperature=None, seed=0, top_p=1.0):
        calls["top_p"] = top_p
        lengths = [2, 7, 9, 10]  # max_new_tokens 10, buffer 4: 0, -1/4, -3/4, -1
        return [(i, [5] * lengths[i * n + j]) for i in range(len(prompts)) for j in range(n)]

    class Task:
        train_problems = (Problem(text="p0", answer="1"), Problem(text="p1", answer="2"))
        tokenizer = None
        max_new_tokens = 10
        correct = 1.0

        def prompt_ids(self, p):
            return [1]

        def decode(self, ids):
            return "x"

        def reward(self, text, answer):
            return 1.0

    monkeypatch.setattr(train_step, "generate_ids", fake_generate_ids)
    cfg = build_config("arithmetic-tiny", "grpo", ["rollout.batch_size=4", "rollout.n=2", "optim.mini_batches=1",
                                                   "rollout.top_p=0.7", "task.overlong_buffer=4",
                                                   "task.overlong_penalty=1.0"])
    gens = {"prompts": torch.Generator().manual_seed(0), "sampling": torch.Generator().manual_seed(1)}
    out = train_step._sample_round(None, Task(), cfg, gens, ("one", lambda r, a: 1.0))
    assert calls["top_p"] == 0.7
    assert out.rewards.tolist() == pytest.approx([1.0, 0.75, 0.25, 0.0])


# ---------------------------------------------------------------------------------------------
# KL to the reference policy: the step-0 model, saved with the run and reloaded on resume
# ---------------------------------------------------------------------------------------------


def test_kl_ref_trains_against_the_step_0_policy_and_resumes(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from test_train import TINY

    from entropy_lens.train import train

    seen = []
    real = train_step.update_minibatch

    def spy(*args, **kw):
        seen.append((kw.get("ref_logp"), args[3], args[2].mask))
        return real(*args, **kw)

    monkeypatch.setattr(train_step, "update_minibatch", spy)
    items = TINY + ["sft.steps=0", "log.jvp_every=0"]
    run = tmp_path / "run"
    train(build_config("arithmetic-tiny", "kl_ref", items, steps=1), run)
    ref = load_file(str(run / "reference" / "model.safetensors"))
    step0 = load_file(str(run / "checkpoints" / "step_000000" / "model.safetensors"))
    assert ref.keys() == step0.keys() and all(torch.equal(ref[k], step0[k]) for k in ref)
    # step 1 samples from the reference itself: ref_logp equals the recorded old_logp
    assert len(seen) == 2
    for ref_logp, old_logp, mask in seen:
        assert torch.allclose(ref_logp[mask], old_logp[mask], atol=1e-6)
    # after resume the reference is reloaded from disk; the policy has moved, so they differ
    train(build_config("arithmetic-tiny", "kl_ref", items, steps=2), run, resume=True)
    assert len(seen) == 4
    ref_logp, old_logp, mask = seen[2]
    assert torch.isfinite(ref_logp[mask]).all() and not torch.allclose(ref_logp[mask], old_logp[mask], atol=1e-6)


def test_methods_without_a_reference_write_none(tmp_path):
    from test_train import TINY

    from entropy_lens.train import train

    train(build_config("arithmetic-tiny", "grpo", TINY + ["sft.steps=0", "log.jvp_every=0"], steps=1), tmp_path / "r")
    assert not (tmp_path / "r" / "reference").exists()
