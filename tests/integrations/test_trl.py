"""TRL adapter: GRPO steps of EntropyLensGRPOTrainer on a tiny model built from a config (CPU, no
download). Skipped when TRL is not installed (CI runs it in a separate environment: .ci/extras)."""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from entropy_lens.integrations.trl import (  # noqa: E402
    LOSS_TYPE_AGG,
    EntropyLensGRPOTrainer,
    trl_config_params,
)

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
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=max_steps, learning_rate=5e-3, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, seed=0, temperature=1.0, dataloader_num_workers=0,
    )
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
