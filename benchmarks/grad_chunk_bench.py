"""The differentiable loss path, one pass against chunk by chunk, in the same process.

    python -m benchmarks.grad_chunk_bench [--rows 1024] [--vocab 49152] [--hidden 576] [--chunk 128] [--reps 5]
        [--device cpu] [--dtype float32] [--out benchmarks/results/grad_head_<device>.json]

One call = :func:`entropy_lens.model.forward.response_logp_entropy` on a one-layer Llama-shaped
model with the given hidden size and vocabulary (SmolLM2-135M's by default), ``--rows`` response
tokens, then ``backward`` of Σ log p + Σ H. Compared: the one-pass path (``chunk_rows`` ≥ rows) and
the checkpointed chunked path (``--chunk`` rows per chunk), both ``head="autograd"``, and
``head="closed-form"`` (:mod:`entropy_lens.kernels.head_grad`: one statistics read per chunk, closed-form
backward) with its default chunk (two fp32 ``[rows, V]`` buffers in 128 MiB) and with ``--chunk`` rows;
on CUDA also with the Triton backward kernel (``ENTROPY_LENS_HEAD_BACKWARD=triton``). Columns: median wall ms over ``--reps``
round-robin repetitions, the ratio to the one-pass path, and the peak bytes of live tensors of
vocabulary width during forward + backward (:mod:`entropy_lens.testing.memtrack`, exact, allocator
independent; CPU only) or the CUDA allocator's peak above the start (CUDA). The rows also go to a JSON
file (device, shape, ms, ratio, MiB). Nothing is asserted; the equality of values and gradients is
tested in tests/test_forward.py and tests/test_head_grad.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from entropy_lens.model.forward import pack, response_logp_entropy
from entropy_lens.testing.memtrack import live_peak_bytes


def build(hidden: int, vocab: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    model = build(a.hidden, a.vocab, a.device, getattr(torch, a.dtype))
    g = torch.Generator().manual_seed(0)
    n_seq, per = 4, a.rows // 4
    packed = pack([torch.randint(0, a.vocab, (8,), generator=g).tolist() for _ in range(n_seq)],
                  [torch.randint(0, a.vocab, (per,), generator=g).tolist() for _ in range(n_seq)], 0)
    if cuda:
        packed = packed.to(a.device)

    def call(path: tuple) -> None:
        head, rows, *backward = path
        os.environ["ENTROPY_LENS_HEAD_BACKWARD"] = backward[0] if backward else "torch"
        model.zero_grad(set_to_none=True)
        logp, ent = response_logp_entropy(model, packed, 1.0, chunk_rows=rows, head=head)
        (logp.sum() + ent.sum()).backward()
        if cuda:
            torch.cuda.synchronize()

    def peak_mib(path: tuple) -> float:
        if not cuda:
            return live_peak_bytes(lambda: call(path), wide) / 2**20
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(path)
        return (torch.cuda.max_memory_allocated() - start) / 2**20

    wide = lambda t: t.dim() >= 1 and t.shape[-1] == a.vocab  # noqa: E731
    call(("closed-form", None))  # warm-up (allocator, kernels)
    paths = {"one pass": ("autograd", 10**9), f"chunked ({a.chunk} rows)": ("autograd", a.chunk),
             "closed-form head (default chunk)": ("closed-form", None), f"closed-form head ({a.chunk} rows)": ("closed-form", a.chunk)}
    if cuda:  # the Triton tile kernel for ∂L/∂z (kernels/triton_head_grad.py; opt-in until measured)
        paths["closed-form head, Triton backward (default chunk)"] = ("closed-form", None, "triton")
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(a.reps):  # round-robin so load changes hit both paths alike
        for name, path in paths.items():
            t0 = time.perf_counter()
            call(path)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["one pass"])
    what = "peak vocab-width MiB" if not cuda else "peak allocated MiB above start"
    print(f"| path ({a.rows} rows, V = {a.vocab}, hidden {a.hidden}, {a.dtype}, {a.device}) | median ms | ratio | {what} |")
    print("|---|---|---|---|")
    rows = []
    for name, path in paths.items():
        med = statistics.median(times[name])
        rows.append({"path": name, "ms": round(1e3 * med, 2), "vs_one_pass": round(med / base, 3),
                     "peak_mib": round(peak_mib(path), 1)})
        print(f"| {name} | {rows[-1]['ms']:.1f} | {med / base:.2f} | {rows[-1]['peak_mib']:.0f} |")
    out = a.out or Path(f"benchmarks/results/grad_head_{a.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = {"rows": a.rows, "vocab": a.vocab, "hidden": a.hidden, "chunk": a.chunk, "dtype": a.dtype}
    out.write_text(json.dumps({"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "peak": what, "shape": shape, "reps": a.reps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
