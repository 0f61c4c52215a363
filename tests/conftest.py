"""Shared fixtures: tiny models and tokenizers built from a config (no downloads); a run that
collects the kernel tests where the test extra installs triton fails, not skips, without it."""

from __future__ import annotations

import importlib
import json
import platform
from pathlib import Path

import pytest
import torch

WORDS = [str(i) for i in range(20)] + ["+", "-", "=", "Answer:", "the", "is", "what", "?", "so", "and"]


def make_tokenizer():
    """A word-level fast tokenizer with a ChatML-like template (vocabulary < 48 tokens): the
    specials, a newline, then :data:`WORDS`."""
    from entropy_lens.testing.tokenizers import word_level_tokenizer

    return word_level_tokenizer(["\n", *WORDS])


def make_model(vocab: int = 48, seed: int = 0, layers: int = 2, attn: str = "eager"):
    """A tiny Llama-shaped causal LM built from a config, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init so distributions are not flat
        model.model.embed_tokens.weight.mul_(5.0)
    return model


#: Test files whose tests need triton (they run the kernels in its interpreter without CUDA).
TRITON_TEST_FILES = ("test_kernels.py", "test_triton_head_grad.py")


def triton_problem(test_files: set[str], system: str, machine: str, importer=importlib.import_module) -> str | None:
    """Why the kernel tests (any of ``TRITON_TEST_FILES`` among ``test_files``) would skip where they must
    run, or ``None``. On Linux x86-64 the test extra installs triton (pyproject.toml), so a missing
    or broken triton there is an install to fix, not a row of silent skips. Other platforms, and runs that
    do not collect the kernel tests (the verl/TRL extras run only tests/integrations/), are not checked."""
    needing = [f for f in TRITON_TEST_FILES if f in test_files]
    if not needing or (system, machine) != ("Linux", "x86_64"):
        return None
    try:
        importer("triton")
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        return (f"tests/{needing[0]} needs triton on Linux x86-64, where the test extra installs it "
                f"(pip install -e \".[test]\"), but `import triton` failed ({type(exc).__name__}: {exc}); "
                f"install it, or leave the kernel tests out explicitly with --ignore=tests/{needing[0]}")
    return None


def pytest_collection_modifyitems(config, items):
    """Runs after the test modules are imported (test_kernels.py sets TRITON_INTERPRET first)."""
    problem = triton_problem({item.path.name for item in items}, platform.system(), platform.machine())
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_model():
    return make_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny HF model folder (safetensors + tokenizer)."""
    d = tmp_path_factory.mktemp("tiny_model")
    model = make_model(attn="sdpa")
    model.save_pretrained(d, safe_serialization=True)
    make_tokenizer().save_pretrained(d)
    return d


def write_rollouts(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSONL or parquet by suffix."""
    import pandas as pd

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def arithmetic_rows(n_groups: int = 3, n: int = 4) -> list[dict]:
    """Rollout rows on the tiny vocabulary with mixed rewards in every group."""
    rows = []
    for g in range(n_groups):
        for k in range(n):
            rows.append({
                "prompt": f"what is {g} + {g} ?",
                "response": " ".join(["so", str(g), "+", str(k), "is"] + [str((g + k + j) % 20) for j in range(k + 1)]),
                "reward": 1.0 if (g + k) % 2 == 0 else -1.0,
            })
    return rows


@pytest.fixture(autouse=True)
def _eager_cpu_statistics(monkeypatch):
    """Every test sees the eager CPU statistics path, even where a developer has built the CPU
    kernel into the real cache (``entropy-lens kernels build``); tests/test_cpu_aot.py switches
    the kernel on with its own temporary cache."""
    monkeypatch.setenv("ENTROPY_LENS_CPU_KERNEL", "0")
