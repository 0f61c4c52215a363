"""Generation for the trainer and the accuracy / pass@k evaluations."""

from __future__ import annotations

import torch

from entropy_lens.model.generate import generate
from entropy_lens.passk import pass_at_k_table
from entropy_lens.train.config import (
    TrainConfig,
)
from entropy_lens.train.setup import stream_seed
from entropy_lens.train.tasks import (
    Problem,
)

# ---------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------


def generate_ids(
    model, tok, prompts: list[list[int]], n: int, max_new_tokens: int, batch_size: int,
    temperature: float | None = None, seed: int = 0, top_p: float = 1.0,
) -> list[tuple[int, list[int]]]:
    """``n`` responses per prompt, prompt-major: ``(prompt index, response ids up to and including
    the first EOS)``; :func:`entropy_lens.model.generate.generate` without the per-sample log-prob
    pass (the trainer recomputes ``old_logp`` for the whole batch; measured on ``arithmetic-tiny``
    the per-sample pass cost as much as ``generate`` itself). ``temperature=None``: greedy;
    ``top_p``: nucleus sampling (1: the full softmax)."""
    outs = generate(model, tok, prompts, n, max_new_tokens, batch_size, temperature, seed, top_p=top_p)
    return [(o["prompt_index"], o["response_ids"]) for o in outs]


def eval_accuracy(model, task, batch_size: int) -> float:
    """Greedy accuracy on the task's held-out eval set (the task's own verifier)."""
    return dev_accuracy(model, task, task.eval_problems, batch_size)


def eval_pass_at_k(model, task, cfg: TrainConfig) -> dict[str, float]:
    """Unbiased pass@k on the eval set, n = max(k) samples per problem at the rollout temperature."""
    ks = sorted(set(cfg.log.pass_k))
    n = ks[-1]
    problems = task.eval_problems
    samples = generate_ids(model, task.tokenizer, [task.prompt_ids(p) for p in problems], n, task.max_new_tokens,
                           cfg.rollout.gen_batch, cfg.rollout.temperature, seed=stream_seed(cfg.seed, "eval"))
    correct = torch.tensor([
        task.reward(task.decode(r), problems[i].answer) == task.correct for i, r in samples
    ], dtype=torch.int64).reshape(len(problems), n)
    return pass_at_k_table([n] * len(problems), correct.sum(-1).numpy(), ks)


def dev_accuracy(model, task, problems: list[Problem], batch_size: int) -> float:
    """Greedy accuracy on ``problems`` (the task's own verifier)."""
    resp = generate_ids(model, task.tokenizer, [task.prompt_ids(p) for p in problems], 1, task.max_new_tokens,
                        batch_size)
    ok = [task.reward(task.decode(r), p.answer) == task.correct for (_, r), p in zip(resp, problems)]
    return sum(ok) / max(len(ok), 1)


