"""Does ``torch.compile`` fuse a method's loss? Each named method's terms + loss + backward (the
``benchmarks.method_loss_bench`` batch, 16 × 2,048 tokens), eager against
``torch.compile(dynamic=True)`` of the same function in the same process: first-call (compile)
seconds, median ms of 7 round-robin repetitions after it, and whether loss and gradients agree
within rtol 1e-5.

    python -m benchmarks.method_loss_compile_probe [METHOD ...]   # default: every registered method

Nothing is asserted; the results are in benchmarks/RESULTS.md ("Method loss cost").
"""

import statistics
import sys
import time

import torch

from benchmarks.method_loss_bench import make_batch
from entropy_lens.methods import apply_method, list_methods, make_context, method_loss
from entropy_lens.tokens import TokenBatch


def loss_of(name: str, logp: torch.Tensor, ent: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Method ``name``'s terms and loss on ``batch`` with ``logp``/``ent`` as the differentiable inputs."""
    b = TokenBatch(**{**batch.__dict__, "logp": logp, "entropy": ent})
    ctx = make_context(0, lr=1e-6, batch_size=batch.mask.shape[0], micro_batch_size=4)
    terms = apply_method(name, b, None, ctx)
    return method_loss(terms, logp, batch.old_logp, batch.adv, batch.mask, ent)


def call(fn, name: str, batch: TokenBatch):
    """``fn``'s loss and the gradients to fresh log-prob and entropy leaves."""
    logp = batch.logp.clone().requires_grad_(True)
    ent = batch.entropy.clone().requires_grad_(True)
    loss = fn(name, logp, ent, batch)
    loss.backward()
    return loss.detach(), logp.grad, ent.grad


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    batch = make_batch(16, 2048)
    names = [n for n in list_methods() if n in argv] or list_methods()
    for name in names:
        comp = torch.compile(loss_of, dynamic=True)
        t = time.perf_counter()
        c = call(comp, name, batch)
        first = time.perf_counter() - t
        e = call(loss_of, name, batch)
        equal = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(e, c) if a is not None)
        eager, compiled = [], []
        for _ in range(7):
            t = time.perf_counter()
            call(loss_of, name, batch)
            eager.append(time.perf_counter() - t)
            t = time.perf_counter()
            call(comp, name, batch)
            compiled.append(time.perf_counter() - t)
        me, mc = statistics.median(eager), statistics.median(compiled)
        print(f"{name:16s} first call {first:6.1f} s  eager {1e3 * me:7.2f} ms  compiled {1e3 * mc:7.2f} ms  "
              f"x{me / mc:.2f}  equal={equal}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
