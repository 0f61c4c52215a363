"""Kernel tuning on CUDA only: copy bandwidth, then every (block_v, block_r, num_warps) of
the one-pass Triton kernel on 8192 × 151,936 bf16 logits (the ``kernel-tune`` section of
``benchmarks.logits_bench`` with the full grid, without the other sections).

    python -m benchmarks.tune_cuda [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import logits_bench as lb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    n, v, dt = 8192, 151_936, torch.bfloat16
    copy = lb.copy_bandwidth_gbs("cuda", n * v * 2, reps=5)
    rows = lb.bench_kernel_tune(n, v, dt, copy, a.reps, quick=False)
    rows.sort(key=lambda r: r.ms if r.ms == r.ms else float("inf"))
    text = f"{lb.device_name('cuda')}, copy {copy:.0f} GB/s, torch {torch.__version__}\n\n" + lb.markdown_table(rows)
    print(text, flush=True)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
