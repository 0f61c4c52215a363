"""`dh_jvp` against one forward + backward of the same micro-batch, per attention path, in one process.

    python -m benchmarks.jvp_bench [--device cpu|cuda] [--dtype float32|bfloat16] [--hidden 256] \
        [--layers 4] [--vocab 8192] [--seqs 4] [--tokens 256] [--reps 3]

A randomly initialised Llama-shaped model built from a config (nothing downloaded), ``--seqs``
sequences of ``--tokens`` response tokens after an 8-token prompt. Timed, round-robin over
``--reps`` repetitions (median ms; CUDA synchronised):

- ``forward + backward``: :func:`entropy_lens.model.forward.response_logp_entropy` and the
  backward of Σ log p + Σ H (the loss path of validate and the trainer);
- ``jvp, eager attention``: :func:`entropy_lens.model.jvp.jvp_prediction` (``attention="eager"``,
  the default: the model switched to eager attention for the JVP);
- ``jvp, SDPA math backend``: the same with ``attention="sdpa-math"`` (the model stays on SDPA
  with only the math backend enabled; :func:`entropy_lens.model.jvp.forward_ad_attention`).

Prints each path's ratio to forward + backward and the JVPs' max difference; writes
``benchmarks/results/jvp_<device>.json``. Nothing is asserted (equality is tested in
tests/test_measure.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from entropy_lens.model.forward import pack, response_logp_entropy
from entropy_lens.model.jvp import jvp_prediction


def build(hidden: int, layers: int, vocab: int, device: str, dtype: str = "float32"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype)).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    model = build(a.hidden, a.layers, a.vocab, a.device, a.dtype)
    g = torch.Generator().manual_seed(0)
    packed = pack([torch.randint(0, a.vocab, (8,), generator=g).tolist() for _ in range(a.seqs)],
                  [torch.randint(0, a.vocab, (a.tokens,), generator=g).tolist() for _ in range(a.seqs)], 0)
    packed = packed.to(a.device)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in theta.items()}

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        logp, ent = response_logp_entropy(model, packed, 1.0)
        (logp.sum() + ent.sum()).backward()

    results: dict[str, torch.Tensor] = {}

    def jvp(attention: str):
        def call() -> None:
            results[attention] = jvp_prediction(model, packed, theta, delta, 1.0, a.seqs, attention=attention)
        return call

    paths = {"forward + backward": forward_backward, "jvp, eager attention": jvp("eager"),
             "jvp, SDPA math backend": jvp("sdpa-math")}
    for fn in paths.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(a.reps):
        for name, fn in paths.items():
            _sync(a.device)
            t0 = time.perf_counter()
            fn()
            _sync(a.device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["forward + backward"])
    diff = float((results["eager"] - results["sdpa-math"]).abs().max())
    rows = [{"path": k, "ms": round(statistics.median(v), 1), "vs_forward_backward": round(statistics.median(v) / base, 2)}
            for k, v in times.items()]
    shape = {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "seqs": a.seqs, "tokens": a.tokens,
             "dtype": a.dtype}
    out = a.out or Path(f"benchmarks/results/jvp_{a.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "shape": shape, "reps": a.reps, "rows": rows, "max_abs_diff_jvp": diff}, indent=2) + "\n")
    print("| path | ms (median) | × forward + backward |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['ms']} | {r['vs_forward_backward']} |")
    print(f"max |jvp eager − jvp sdpa-math| = {diff:.2e}")


if __name__ == "__main__":
    main()
