"""Live tensor bytes of ``validate``'s step per model parameter, fp32 and bf16.

    python -m benchmarks.validate_memory [--hidden 512] [--layers 4] [--seqs 4]

A Llama-shaped model built from a config (``--hidden``, ``--layers``, untied head; the test
tokenizer's 48-word vocabulary, so the parameters dominate the activations) and ``--seqs``
arithmetic rollouts of the test suite. One call of
:func:`entropy_lens.pipelines.validate.run_validate` (SGD, η = 1e-4, no JVP: forward-mode AD
cannot be tracked) under :class:`entropy_lens.testing.memtrack.LiveTensorBytes`: the peak bytes of
tensors created during the call, above the model's own weights, divided by the parameter count.
This is the regime of ``model/budget.py``'s parameter term. Deterministic (no allocator, no
machine); nothing is asserted here (tests/test_budget.py bounds it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from entropy_lens.io.rollouts import validate_rollouts
from entropy_lens.pipelines.validate import ValidateSettings, run_validate
from entropy_lens.testing.memtrack import live_peak_bytes


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=4)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import (  # the suite's rollouts and tokenizer
        arithmetic_rows,
        make_tokenizer,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    frame = validate_rollouts(pd.DataFrame(arithmetic_rows()[: args.seqs]), "arithmetic rows")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          num_key_value_heads=max(1, args.hidden // 64), tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).to(dtype).eval()
        P = sum(p.numel() for p in model.parameters())
        peak = live_peak_bytes(lambda: run_validate(model, tok, frame, ValidateSettings(lr=1e-4, optimizer="sgd", jvp=False)))
        rows.append({"dtype": str(dtype).replace("torch.", ""), "params": P, "peak_mib": peak / 2**20,
                     "bytes_per_param": peak / P})
        print(f"{rows[-1]['dtype']:9s} {P / 1e6:6.1f} M parameters  peak {peak / 2**20:7.1f} MiB above the weights "
              f"= {peak / P:5.2f} B/parameter", flush=True)
    return rows


if __name__ == "__main__":
    main()
