"""Rollouts → one prepared batch: token ids, packed tensors, behaviour log-probs, rewards, groups.

Every pipeline that runs a model on recorded rollouts (``analyze``, ``validate``,
``compare --measure``) starts here, once; and every one that turns per-token statistics into a
:class:`~entropy_lens.tokens.TokenBatch` goes through :func:`token_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from entropy_lens.advantages import compute_advantages
from entropy_lens.io.rollouts import Tokenized, old_logp_grid, tokenize_rollouts
from entropy_lens.methods.base import GRPO_DUAL_CLIP, GRPO_EPS_HIGH, GRPO_EPS_LOW
from entropy_lens.model.forward import PackedBatch, pack
from entropy_lens.tokens import TokenBatch


@dataclass(frozen=True)
class BatchSettings:
    """What every pipeline on a recorded batch needs (flat values): ``lr`` η of the closed-form
    predictions (nats per step), ``temperature`` τ of the statistics, the clip bounds
    ``eps_low``/``eps_high``/``dual_clip`` of I_clip (GRPO's: 0.2/0.2, c = 10 as in the STEER
    reference's runs), the ``advantage`` estimator (:data:`entropy_lens.advantages.ADVANTAGES`) and
    ``micro_batch`` sequences per forward."""

    lr: float = 1e-6
    temperature: float = 1.0
    eps_low: float = GRPO_EPS_LOW
    eps_high: float = GRPO_EPS_HIGH
    dual_clip: float | None = GRPO_DUAL_CLIP
    advantage: str = "grpo"
    micro_batch: int = 4


@dataclass(frozen=True)
class Prepared:
    """A validated rollouts frame made ready for a forward pass.

    ``tok``: token ids (and whether they were re-tokenised); ``old_logp``: ``[B, T]`` float32
    behaviour log-probs (nats) or None when the rollouts carry none; ``reward`` ``[B]`` float64;
    ``group_id`` ``[B]`` int64; ``lengths``: response tokens per sequence; ``pad_id``: the
    tokenizer's padding id.
    """

    tok: Tokenized
    old_logp: torch.Tensor | None
    reward: torch.Tensor
    group_id: torch.Tensor
    lengths: list[int]
    pad_id: int

    @property
    def n_sequences(self) -> int:
        return len(self.lengths)

    def packed(self, start: int = 0, stop: int | None = None) -> PackedBatch:
        """Sequences ``start:stop`` packed as prompt + response (right-padded)."""
        stop = self.n_sequences if stop is None else stop
        return pack(self.tok.prompt_ids[start:stop], self.tok.response_ids[start:stop], self.pad_id)


def truncate(tok: Tokenized, old_logp: torch.Tensor | None, max_len: int) -> tuple[Tokenized, torch.Tensor | None]:
    """Responses cut to their first ``max_len`` tokens (``old_logp`` ``[B, T]`` to ``[B, ≤max_len]``),
    with a note in ``tok.notes`` when any was longer. Prompts are kept whole."""
    if not (isinstance(max_len, int) and not isinstance(max_len, bool) and max_len >= 1):
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    longest = max((len(r) for r in tok.response_ids), default=0)
    n_cut = sum(len(r) > max_len for r in tok.response_ids)
    if n_cut == 0:
        return tok, old_logp
    note = (f"{n_cut} of {len(tok.response_ids)} responses truncated to max_len={max_len} response tokens "
            f"(longest had {longest}); their rewards are those of the whole responses")
    cut = Tokenized(tok.prompt_ids, [r[:max_len] for r in tok.response_ids], tok.retokenized, [*tok.notes, note])
    return cut, (old_logp[:, :max_len] if old_logp is not None else None)


def prepare(rollouts: pd.DataFrame, tokenizer, source: str = "<rollouts>", max_len: int | None = None) -> Prepared:
    """Tokenize a validated rollouts frame (:func:`entropy_lens.io.rollouts.load_rollouts`) and read
    its behaviour log-probs, rewards and groups; errors name ``source``. ``max_len``: cut every
    response to its first ``max_len`` tokens (:func:`truncate`; None keeps them whole)."""
    tok = tokenize_rollouts(rollouts, tokenizer, source)
    old_logp = old_logp_grid(rollouts, [len(r) for r in tok.response_ids], source)
    if max_len is not None:
        tok, old_logp = truncate(tok, old_logp, max_len)
    lengths = [len(r) for r in tok.response_ids]
    return Prepared(
        tok=tok,
        old_logp=old_logp,
        reward=torch.tensor(rollouts["reward"].to_numpy(np.float64), dtype=torch.float64),
        group_id=torch.tensor(rollouts["group_id"].to_numpy(np.int64)),
        lengths=lengths,
        pad_id=tokenizer.pad_token_id,
    )


def token_texts(tokenizer, response_ids: list[list[int]]) -> list[list[str]]:
    """The decoded text of every response token, ``[b][t]`` (one token at a time)."""
    return [[tokenizer.decode([t]) for t in ids] for ids in response_ids]


def token_batch(
    stats: dict[str, torch.Tensor],
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    reward: torch.Tensor,
    group_id: torch.Tensor,
    advantage: str,
    temperature: float,
) -> TokenBatch:
    """A :class:`TokenBatch` from per-token statistics ``stats`` (``logp, entropy, sum_p2,
    sum_p2_logp``, each ``[B, T]``, nats) at temperature τ, with sequence advantages of the named
    estimator (``advantage``) broadcast over each response.

    ``old_logp`` None: on-policy (π_old = π, ratio 1). The float dtype of the batch is that of
    ``stats["logp"]``; ``reward`` is cast to it.
    """
    logp = stats["logp"]
    reward = reward.to(logp.dtype)
    seq_adv = compute_advantages(advantage, reward, group_id, lengths=mask.sum(-1)).to(logp.dtype)
    zero = torch.zeros((), dtype=logp.dtype)
    old = logp if old_logp is None else old_logp.to(logp.dtype)
    return TokenBatch(
        token_ids=token_ids,
        mask=mask,
        logp=logp,
        old_logp=torch.where(mask, old, zero),
        entropy=stats["entropy"],
        sum_p2=stats["sum_p2"],
        sum_p2_logp=stats["sum_p2_logp"],
        adv=torch.where(mask, seq_adv[:, None].expand_as(mask), zero),
        group_id=group_id,
        reward=reward,
        meta={"temperature": temperature},
    )
