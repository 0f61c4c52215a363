"""Cost of each method's loss against the plain GRPO loss, in the same process.

    python -m benchmarks.method_loss_bench [--batch 16] [--len 2048] [--reps 20] [--threads N] [--markdown OUT.md]
        [--json OUT.json]

One call = the method's per-token terms (:func:`entropy_lens.methods.apply_method`: weights,
effective advantages, selections) + :func:`entropy_lens.methods.method_loss` + ``backward`` to
the per-token log-probs and entropies (leaf tensors, as they would arrive from the model's
forward). Inputs: a ``--batch`` × ``--len`` token grid with random lengths (≥ half the grid),
GRPO advantages over groups of 8, log-probs and entropies of random softmax rows (V = 64), the
behaviour log-probs perturbed by N(0, 0.05²) so that some ratios clip, the reference policy's
(``kl_ref``) by N(0, 0.03²). Scopes: 4 micro-batches, one
mini-batch. Columns: median ms over ``--reps`` repetitions, run round-robin over the methods, and
the ratio to ``grpo``, for the whole call and for its two parts: the terms (no gradient; the
trainer computes them once per mini-batch) and the loss + backward (once per micro-batch). The model's forward and backward, which a real step adds to both, are not
included: this is the loss alone, the strictest comparison. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
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
        adv=adv, group_id=group, reward=reward, ref_logp=logp + 0.03 * torch.randn(B, T, generator=g),
    )


def one_call(name: str, batch: TokenBatch, micro: int) -> tuple[float, float]:
    """Terms + loss + backward of method ``name`` on ``batch`` (fresh leaves each call); returns the
    seconds of (terms, loss + backward)."""
    logp = batch.logp.clone().requires_grad_(True)
    ent = batch.entropy.clone().requires_grad_(True)
    b = TokenBatch(**{**batch.__dict__, "logp": logp, "entropy": ent})
    t0 = time.perf_counter()
    ctx = make_context(0, lr=1e-6, batch_size=batch.mask.shape[0], micro_batch_size=micro)
    terms = apply_method(name, b, None, ctx)
    t1 = time.perf_counter()
    loss = method_loss(terms, logp, batch.old_logp, batch.adv, batch.mask, ent)
    loss.backward()
    return t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    batch = make_batch(a.batch, a.len)
    micro = max(1, a.batch // 4)
    names = ["grpo"] + [m for m in list_methods() if m != "grpo"]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
    for m in names:  # warm-up
        one_call(m, batch, micro)
    for _ in range(a.reps):
        for m in names:
            times[m].append(one_call(m, batch, micro))

    def med(m: str, part: int | None = None) -> float:
        return 1e3 * statistics.median(sum(t) if part is None else t[part] for t in times[m])

    base, base_terms, base_loss = med("grpo"), med("grpo", 0), med("grpo", 1)
    lines = [
        f"Method loss cost, {a.batch} × {a.len} tokens ({int(batch.mask.sum())} valid), terms + loss + backward, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}",
        "",
        "| method | ms (median) | × grpo | terms ms | × grpo | loss + backward ms | × grpo |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for m in names:
        r = {"method": m, "ms": round(med(m), 3), "vs_grpo": round(med(m) / base, 3),
             "terms_ms": round(med(m, 0), 3), "terms_vs_grpo": round(med(m, 0) / base_terms, 3),
             "loss_backward_ms": round(med(m, 1), 3), "loss_backward_vs_grpo": round(med(m, 1) / base_loss, 3)}
        rows.append(r)
        lines.append(f"| {m} | {r['ms']:.2f} | {r['vs_grpo']:.2f} | {r['terms_ms']:.2f} | {r['terms_vs_grpo']:.2f} | "
                     f"{r['loss_backward_ms']:.2f} | {r['loss_backward_vs_grpo']:.2f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                                      "shape": {"batch": a.batch, "len": a.len, "valid": int(batch.mask.sum())},
                                      "reps": a.reps, "rows": rows}, indent=2) + "\n")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
