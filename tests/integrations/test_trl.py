"""TRL adapter: GRPO steps of EntropyLensGRPOTrainer on a tiny model built from a config (CPU, no
download). Skipped when TRL is not installed (CI runs it in a separate environment: .ci/extras)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from entropy_lens.integrations.trl import (
    LOSS_TYPE_AGG,
    EntropyLensGRPOTrainer,
    trl_config_params,
)
from entropy_lens.methods import (
    apply_method,
    make_context,
    method_loss,
    params_from_dict,
)
from entropy_lens.tokens import TokenBatch

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


def make_model(vocab: int = 48, seed: int = 0):
    """A tiny Llama-shaped causal LM built from a config, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=3, bos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)
    return model


def alternating_reward(completions, **kwargs):
    """+1 / 0 alternating inside each group, so every group has a non-zero advantage."""
    return [float(i % 2) for i in range(len(completions))]


def make_trainer(tmp_path, method="steer", method_params=None, max_steps=2, **config):
    from trl import GRPOConfig

    prompts = [f"what is {a} + {b} ?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    base = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 4,
        "max_completion_length": 6, "max_steps": max_steps, "learning_rate": 5e-3, "logging_steps": 1,
        "report_to": "none", "save_strategy": "no", "use_cpu": True, "bf16": False, "seed": 0,
        "temperature": 1.0, "dataloader_num_workers": 0,
    }
    base.update(config)
    args = GRPOConfig(**base)
    return EntropyLensGRPOTrainer(
        model=make_model(), reward_funcs=alternating_reward, args=args, train_dataset=dataset,
        processing_class=make_tokenizer(), method=method, method_params=method_params,
    )


def test_two_steer_steps_log_entropy_lens_metrics(tmp_path):
    trainer = make_trainer(tmp_path, method="steer", method_params={"lambda_min": 0.8})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "entropy_lens/weight_mean" in h]
    assert len(logs) == 2, trainer.state.log_history
    for h in logs:
        assert 0.8 - 1e-6 <= h["entropy_lens/weight_min"] <= h["entropy_lens/weight_mean"] <= h["entropy_lens/weight_max"] <= 1.0 + 1e-6
        # rewards alternate inside every group, so |ω| reaches the 0.02 floor and the top token gets λ_min
        assert h["entropy_lens/weight_min"] == pytest.approx(0.8, abs=1e-5)
        assert 0.0 < h["entropy"] <= math.log(48) + 1e-4
        assert h["entropy_lens/entropy_mean"] == pytest.approx(h["entropy"], rel=1e-4)  # on-policy: H_old = H
        shares = [h[f"entropy_lens/q{k}_share"] for k in range(1, 5)]
        assert all(0.0 <= s <= 1.0 for s in shares) and 0.0 < sum(shares) <= 1.0 + 1e-6
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy_lens/frac_touched"):
            assert 0.0 <= h[key] <= 1.0
        assert "entropy_lens/steer/omega_abs_max" in h
    assert trainer.state.global_step == 2
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    assert changed, "two optimizer steps left every parameter unchanged"


def test_off_policy_steer_weights_from_old_entropy(tmp_path):
    """Two updates per generation: TRL keeps old log-probs, the trainer stores H_old beside them and
    code-form STEER reads it, so on the second update the entropy it reads is the first one's."""
    trainer = make_trainer(tmp_path, method="steer", num_iterations=2)
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "entropy_lens/entropy_mean" in h]
    assert first["entropy_lens/entropy_mean"] == pytest.approx(first["entropy"], rel=1e-5)
    assert second["entropy_lens/entropy_mean"] == pytest.approx(first["entropy"], rel=1e-5)  # H_old, same batch
    assert abs(second["entropy"] - second["entropy_lens/entropy_mean"]) > 1e-4  # the policy moved
    assert second["clip_ratio/region_mean"] > 0.0  # off-policy: the ratio left [1-ε, 1+ε] somewhere


def test_entropy_bonus_needs_differentiable_entropies(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, method="entropy_bonus", method_params={"beta": 0.01}, max_steps=1)
    trainer.train()  # TRL 1.16's forward returns entropies with their gradient
    assert any("entropy_lens/entropy_bonus/entropy_mean" in h for h in trainer.state.log_history)
    original = EntropyLensGRPOTrainer._get_per_token_logps_and_entropies

    def detached(self, *args, **kwargs):
        logps, ent, aux = original(self, *args, **kwargs)
        return logps, (None if ent is None else ent.detach()), aux

    monkeypatch.setattr(EntropyLensGRPOTrainer, "_get_per_token_logps_and_entropies", detached)
    trainer = make_trainer(tmp_path, method="entropy_bonus", max_steps=1)
    with pytest.raises(RuntimeError, match="entropies without a gradient"):
        trainer.train()


def test_method_params_and_trl_clip_settings(tmp_path):
    trainer = make_trainer(tmp_path, method="clip_higher", method_params={"dual_clip": None},
                           max_steps=1, epsilon=0.1, epsilon_high=0.5, loss_type="bnpo")
    # TRL's epsilon reaches the GRPO-default bound; clip_higher keeps its own ε_high = 0.28
    assert trainer.el_params.eps_low == pytest.approx(0.1)
    assert trainer.el_params.eps_high == pytest.approx(0.28)
    assert trainer.el_params.dual_clip is None
    assert trl_config_params("grpo", 0.1, 0.5) == {"eps_low": 0.1, "eps_high": 0.5}
    assert trl_config_params("kl_cov", 0.1, 0.5) == {}


def test_refused_combinations(tmp_path):
    with pytest.raises(ValueError, match="fork_tokens"):
        make_trainer(tmp_path, max_steps=1, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="loss_type='cispo'"):
        make_trainer(tmp_path, max_steps=1, loss_type="cispo")
    with pytest.raises(ValueError, match="scope must be 'micro'"):
        make_trainer(tmp_path, max_steps=1, method_params={"scope": "batch"})
    with pytest.raises(ValueError, match="unknown method"):
        make_trainer(tmp_path, method="nope", max_steps=1)
    assert set(LOSS_TYPE_AGG) == {"grpo", "bnpo", "dr_grpo", "dapo"}


def captured_inputs(trainer):
    """Train one step and return a copy of the first micro-batch ``_compute_loss`` received."""
    seen = {}
    original = trainer._compute_loss

    def spy(model, inputs):
        if not seen:
            seen.update({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
        return original(model, inputs)

    trainer._compute_loss = spy
    try:
        trainer.train()
    finally:
        del trainer._compute_loss
    assert seen, "the trainer never computed a loss"
    return seen


def reference_loss(trainer, inputs, method, method_params, agg_mode, norm_len, drop_penalty=False):
    """The loss of ``method`` on ``inputs`` built without the adapter: an independent forward of the
    model (log p and H from the logits), the registry's method and its one objective."""
    args = trainer.args
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].shape[1]
    logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -keep - 1:-1, :].float() / args.temperature
    logq = torch.log_softmax(logits, dim=-1)
    logp = logq.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    mask = inputs["completion_mask"].bool()
    adv = inputs["advantages"][:, None].expand_as(logp).to(logp.dtype)
    zeros = torch.zeros_like(logp)
    batch = TokenBatch(
        token_ids=inputs["completion_ids"], mask=mask, logp=logp.detach(), old_logp=logp.detach(),
        entropy=entropy.detach(), sum_p2=zeros, sum_p2_logp=zeros, adv=adv,
        group_id=torch.zeros(mask.shape[0], dtype=torch.long), reward=torch.zeros(mask.shape[0]),
    )
    # the adapter's precedence: method defaults < TRL's epsilon / epsilon_high < method_params
    params = params_from_dict(method, {**trl_config_params(method, args.epsilon, args.epsilon_high), **method_params})
    assert params == trainer.el_params
    terms = apply_method(method, batch, params, make_context(0, lr=args.learning_rate))
    if drop_penalty:
        terms = dataclasses.replace(terms, penalty=None)
    loss = method_loss(terms, logp, logp.detach(), adv, mask, entropy, agg_mode=agg_mode, norm_len=norm_len)
    return loss, terms


@pytest.mark.parametrize(
    "method,method_params,loss_type",
    [
        ("grpo", {}, "bnpo"),
        ("steer", {"lambda_min": 0.8}, "grpo"),
        ("entropy_bonus", {"beta": 0.05}, "dr_grpo"),
    ],
)
def test_adapter_loss_and_gradient_equal_method_loss(tmp_path, method, method_params, loss_type):
    """On a captured micro-batch, the adapter's loss and its gradient w.r.t. every parameter equal
    ``method_loss`` of the registry's terms, computed from an independent forward."""
    trainer = make_trainer(tmp_path, method=method, method_params=method_params, max_steps=1,
                           loss_type=loss_type, beta=0.0, gradient_accumulation_steps=1)
    inputs = captured_inputs(trainer)
    assert inputs.get("old_per_token_logps") is None  # on-policy: old log p = current log p
    assert trainer.current_gradient_accumulation_steps == 1
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    loss = trainer._compute_loss(model, inputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    agg = LOSS_TYPE_AGG[loss_type]
    norm_len = trainer.args.max_completion_length if agg == "seq-mean-token-sum-norm" else None
    ref, terms = reference_loss(trainer, inputs, method, method_params, agg, norm_len)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)

    assert torch.isfinite(ref) and float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)
    total = 0.0
    for p, g, r in zip(params, grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
        total += float(r.pow(2).sum())
    assert total > 1e-12  # the comparison is not between two zero gradients
    if method == "steer":  # the weights matter on this batch: some token is down-weighted
        assert float(terms.weight[inputs["completion_mask"].bool()].min()) < 1.0 - 1e-3
    if method == "entropy_bonus":  # and so does the penalty: without it the gradient is another one
        assert terms.penalty is not None
        bare, _ = reference_loss(trainer, inputs, method, method_params, agg, norm_len, drop_penalty=True)
        bare_grads = torch.autograd.grad(bare, params, allow_unused=True)
        gap = sum(float((r - b).abs().sum()) for r, b in zip(ref_grads, bare_grads) if r is not None and b is not None)
        assert gap > 1e-3 * math.sqrt(total)
