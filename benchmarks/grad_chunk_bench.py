"""The differentiable loss path, one pass against chunk by chunk, in the same process.

    python -m benchmarks.grad_chunk_bench [--rows 1024] [--vocab 49152] [--hidden 576] [--chunk 128] [--reps 5]

One call = :func:`entropy_lens.model.forward.response_logp_entropy` on a one-layer Llama-shaped
model with the given hidden size and vocabulary (SmolLM2-135M's by default), ``--rows`` response
tokens, then ``backward`` of Σ log p + Σ H. Compared: the one-pass path (``chunk_rows`` ≥ rows) and
the checkpointed chunked path (``--chunk`` rows per chunk). Columns: median wall ms over ``--reps``
round-robin repetitions, the ratio to the one-pass path, and the peak bytes of live tensors of
vocabulary width during forward + backward (:mod:`entropy_lens.testing.memtrack`, exact, allocator
independent). Nothing is asserted; the equality of values and gradients is tested in
tests/test_forward.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from entropy_lens.model.forward import pack, response_logp_entropy
from entropy_lens.testing.memtrack import live_peak_bytes


def build(hidden: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    model = build(a.hidden, a.vocab)
    g = torch.Generator().manual_seed(0)
    n_seq, per = 4, a.rows // 4
    packed = pack([torch.randint(0, a.vocab, (8,), generator=g).tolist() for _ in range(n_seq)],
                  [torch.randint(0, a.vocab, (per,), generator=g).tolist() for _ in range(n_seq)], 0)

    def call(rows: int) -> None:
        model.zero_grad(set_to_none=True)
        logp, ent = response_logp_entropy(model, packed, 1.0, chunk_rows=rows)
        (logp.sum() + ent.sum()).backward()

    paths = {"one pass": 10**9, f"chunked ({a.chunk} rows)": a.chunk}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(a.reps):  # round-robin so load changes hit both paths alike
        for name, rows in paths.items():
            t0 = time.perf_counter()
            call(rows)
            times[name].append(time.perf_counter() - t0)
    wide = lambda t: t.dim() >= 1 and t.shape[-1] == a.vocab  # noqa: E731
    base = statistics.median(times["one pass"])
    print(f"| path ({a.rows} rows, V = {a.vocab}, hidden {a.hidden}) | median ms | ratio | peak vocab-width MiB |")
    print("|---|---|---|---|")
    for name, rows in paths.items():
        med = statistics.median(times[name])
        peak = live_peak_bytes(lambda r=rows: call(r), wide) / 2**20
        print(f"| {name} | {1e3 * med:.0f} | {med / base:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
