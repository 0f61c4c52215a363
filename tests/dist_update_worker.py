"""The data-parallel update and the collectives on a tiny model, for tests/test_dist_validate.py:
run under torchrun (each rank writes ``OUT/rank<R>.pt``) or called in one process
(:func:`results`), and the two compared there.

Cases: AdamW and SGD steps of an fp32 model, an SGD step of a bf16 model (fp32 master), and a
step on one sequence with two ranks (rank 1 idle: no gradient at all), each on the same batch;
under torchrun also the gradient sum with gradients missing on some ranks, the bucketed in-place
sum over mixed dtypes, and the merge of per-rank rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_model

from entropy_lens import dist
from entropy_lens.collectives import gather_rows, grad_sum, sum_grads, sum_in_place
from entropy_lens.model.forward import pack, response_stats
from entropy_lens.model.update import grpo_token_mean_loss, one_step_update
from entropy_lens.pipelines.validate import rank_rows


def batch(n: int = 6):
    """A packed batch of ``n`` sequences on the tiny vocabulary, its behaviour log-probs (the
    model's own, shifted so that some ratios leave the clip range) and advantages."""
    g = torch.Generator().manual_seed(0)
    prompts = [[2, 4] + torch.randint(7, 37, (3,), generator=g).tolist() + [3] for _ in range(n)]
    responses = [torch.randint(7, 37, (int(k),), generator=g).tolist() for k in (5, 3, 6, 4, 2, 5)[:n]]
    packed = pack(prompts, responses, pad_id=0)
    adv = torch.where(packed.mask, torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])[:n, None], 0.0)
    shift = 0.3 * torch.randn(packed.mask.shape, generator=g)
    return packed, adv, shift


def step(ranks: dist.Ranks, optimizer: str, dtype: torch.dtype = torch.float32, n: int = 6) -> tuple[dict, float]:
    """``(delta, loss)`` of one step on this rank's share of the batch, gradients summed over the
    ranks (the whole batch for one process)."""
    model = make_model().to(dtype)
    packed, adv, shift = batch(n)
    old = response_stats(model, packed)["logp"] + shift
    rows = rank_rows(n, ranks.rank, ranks.world_size)
    loss_fn = grpo_token_mean_loss(old[rows], adv[rows], packed.mask[rows], n_tokens=int(packed.mask.sum()))
    return one_step_update(model, packed.select(rows), loss_fn, 1e-3, optimizer, micro_batch=2,
                           reduce=grad_sum(ranks), first_row=rows.start)


def results(ranks: dist.Ranks = dist.SINGLE) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name, args in {"adamw": ("adamw",), "sgd": ("sgd",), "bf16": ("sgd", torch.bfloat16),
                       "one_sequence": ("sgd", torch.float32, 1)}.items():
        delta, loss = step(ranks, *args)
        out[name] = {"delta": delta, "loss": loss}
    if ranks.distributed:
        r = ranks.rank
        like = {k: torch.zeros(2, 3) for k in "abc"}
        grads = {"a": torch.full((2, 3), float(r + 1)), "b": torch.full((2, 3), 3.0) if r == 1 else None, "c": None}
        out["sum_grads"] = sum_grads(grads, 0.5 + r, like, ranks)
        mixed = [torch.arange(5.0) * (r + 1), torch.arange(3, dtype=torch.float64) * (r + 1),
                 torch.arange(6.0).reshape(2, 3).t() * (r + 1), torch.ones(700) * (r + 1)]
        sum_in_place(mixed, bucket_bytes=64)
        out["sum_in_place"] = mixed
        rows = rank_rows(5, r, ranks.world_size)
        own = {"x": torch.arange(5.0)[rows, None].expand(-1, 2) + 0.25}
        out["gather_rows"] = gather_rows(own, rows, 5, ranks)["x"]
    return out


if __name__ == "__main__":
    with dist.session() as ranks:
        torch.save(results(ranks), Path(sys.argv[1]) / f"rank{ranks.rank}.pt")
