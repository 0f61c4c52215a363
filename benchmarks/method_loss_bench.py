"""Cost of each method's loss against the plain GRPO loss, in the same process.

    python -m benchmarks.method_loss_bench [--batch 16] [--len 2048] [--reps 20] [--threads N] [--markdown OUT.md]

One call = the method's per-token terms (:func:`entropy_lens.methods.apply_method`: weights,
effective advantages, selections) + :func:`entropy_lens.methods.method_loss` + ``backward`` to
the per-token log-probs and entropies (leaf tensors, as they would arrive from the model's
forward). Inputs: a ``--batch`` × ``--len`` token grid with random lengths (≥ half the grid),
GRPO advantages over groups of 8, log-probs and entropies of random softmax rows (V = 64), the
behaviour log-probs perturbed by N(0, 0.05²) so that some ratios clip. Scopes: 4 micro-batches, one
mini-batch. Columns: median ms over ``--reps`` repetitions, run round-robin over the methods, and
the ratio to ``grpo``. The model's forward and backward, which a real step adds to both, are not
included: this is the loss alone, the strictest comparison. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from entropy_lens.advantages import broadcast_to_tokens, compute_advantages
from entropy_lens.methods import apply_method, list_methods, make_context, method_loss
from entropy_lens.tokens import TokenBatch


def make_batch(B: int, T: int, V: int = 64, seed: int = 0) -> TokenBatch:
    """A ``B × T`` batch with exact statistics of random softmax rows (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    logpi = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2.0, -1)
    pi = logpi.exp()
    tok = torch.multinomial(pi.reshape(-1, V), 1, generator=g).reshape(B, T)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    reward = (torch.rand(B, generator=g) > 0.5).float()
    group = torch.arange(B) // 8
    adv = broadcast_to_tokens(compute_advantages("grpo", reward, group), mask)
    logp = logpi.gather(-1, tok[..., None])[..., 0]
    return TokenBatch(
        token_ids=tok, mask=mask, logp=logp, old_logp=logp + 0.05 * torch.randn(B, T, generator=g),
        entropy=-(pi * logpi).sum(-1), sum_p2=(pi**2).sum(-1), sum_p2_logp=(pi**2 * logpi).sum(-1),
        adv=adv, group_id=group, reward=reward,
    )


def one_call(name: str, batch: TokenBatch, micro: int) -> None:
    """Terms + loss + backward of method ``name`` on ``batch`` (fresh leaves each call)."""
    logp = batch.logp.clone().requires_grad_(True)
    ent = batch.entropy.clone().requires_grad_(True)
    b = TokenBatch(**{**batch.__dict__, "logp": logp, "entropy": ent})
    ctx = make_context(0, lr=1e-6, batch_size=batch.mask.shape[0], micro_batch_size=micro)
    terms = apply_method(name, b, None, ctx)
    loss = method_loss(terms, logp, batch.old_logp, batch.adv, batch.mask, ent)
    loss.backward()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    batch = make_batch(a.batch, a.len)
    micro = max(1, a.batch // 4)
    names = ["grpo"] + [m for m in list_methods() if m != "grpo"]
    times: dict[str, list[float]] = {m: [] for m in names}
    for m in names:  # warm-up
        one_call(m, batch, micro)
    for _ in range(a.reps):
        for m in names:
            t0 = time.perf_counter()
            one_call(m, batch, micro)
            times[m].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["grpo"])
    lines = [
        f"Method loss cost, {a.batch} × {a.len} tokens ({int(batch.mask.sum())} valid), terms + loss + backward, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}",
        "",
        "| method | ms (median) | × grpo |",
        "|---|---|---|",
    ]
    for m in names:
        ms = statistics.median(times[m])
        lines.append(f"| {m} | {ms:.2f} | {ms / base:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
