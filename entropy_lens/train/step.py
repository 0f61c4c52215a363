"""One RL step: sample, score, old statistics, the method's updates, measured and predicted ΔH."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from entropy_lens import estimators as est
from entropy_lens.advantages import broadcast_to_tokens, compute_advantages
from entropy_lens.methods import (
    apply_method,
    get_method,
    make_context,
    method_loss,
)
from entropy_lens.model.forward import (
    PackedBatch,
    pack,
    response_logp_entropy,
    response_stats,
)
from entropy_lens.model.head import SCORE_FIELDS, lm_head_score
from entropy_lens.model.jvp import jvp_prediction
from entropy_lens.model.load import model_device
from entropy_lens.model.update import snapshot, trainable_params
from entropy_lens.objective import aggregate
from entropy_lens.rewards import overlong_penalty
from entropy_lens.tokens import TokenBatch
from entropy_lens.train import metrics as mx
from entropy_lens.train.config import (
    TrainConfig,
)
from entropy_lens.train.evaluate import generate_ids
from entropy_lens.train.setup import TrainingDiverged, autocast
from entropy_lens.train.tasks import (
    score_responses,
)

# ---------------------------------------------------------------------------------------------
# One mini-batch update
# ---------------------------------------------------------------------------------------------


@dataclass
class UpdateOut:
    """What one mini-batch update reports: per-token closed-form predictions (``[b, T]``, nats),
    the valid tokens' weights, clip counts and the loss."""

    preds: dict[str, torch.Tensor]
    weights: torch.Tensor
    n_clip_high: int
    n_clip_low: int
    n_tokens: int
    loss: float


def _micro_share(mode: str, scope: str, mask: torch.Tensor, rows: slice, n_micro: int) -> float:
    """Factor applied to the aggregated loss of the micro-batch ``rows`` before accumulation.

    ``scope="micro"``: 1/n_micro (each micro-batch is aggregated over its own tokens and the
    gradients are averaged over the accumulation steps, verl 0.4.1). ``scope="mini"``: the share of
    the micro-batch in the mini-batch aggregate, so the micro-batch losses sum to the one
    mini-batch loss for every aggregation mode."""
    if scope == "micro":
        return 1.0 / n_micro
    sub = mask[rows]
    if mode == "token-mean":
        return float(sub.sum()) / max(float(mask.sum()), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return sub.shape[0] / mask.shape[0]
    return float(sub.any(-1).sum()) / max(float(mask.any(-1).sum()), 1.0)


def micro_rows(batch_size: int, micro: int) -> list[slice]:
    """Consecutive micro-batches of ``micro`` sequences covering ``batch_size`` sequences."""
    return [slice(i, min(i + micro, batch_size)) for i in range(0, batch_size, micro)]


def loss_token_weights(mask: torch.Tensor, mode: str, scope: str, micro: int, norm_len: int | None = None) -> torch.Tensor:
    """∂loss/∂ℓ_t of the mini-batch loss the trainer builds from per-token losses ℓ, ``[B, T]``
    float64 (0 on padding): Σ_micro share · aggregate(ℓ_micro). Token-mean over the mini-batch gives
    1/L everywhere; ``scope="micro"`` gives 1/(n_micro · L_micro) (differentiated through
    :func:`entropy_lens.objective.aggregate` itself, so it cannot drift from the loss)."""
    ell = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    parts = micro_rows(mask.shape[0], micro)
    total = sum(
        aggregate(ell[r], mask[r], mode, norm_len) * _micro_share(mode, scope, mask, r, len(parts)) for r in parts
    )
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        return torch.zeros(mask.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(total, ell)
    return g


def update_minibatch(
    model,
    optimizer: torch.optim.Optimizer,
    packed: PackedBatch,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    group_id: torch.Tensor,
    reward: torch.Tensor,
    cfg: TrainConfig,
    method_params: Any,
    method_gen: torch.Generator,
    where: str,
    old_entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    **scores: torch.Tensor | None,
) -> UpdateOut:
    """One optimizer step on one mini-batch through the chosen method and the one objective.

    The method sees the mini-batch's current statistics (log p, H, Σp², Σp² log p at θ before this
    update; no grad) with the recorded ``old_logp``, ``old_entropy`` (H_old, recorded with the old
    log-probs), ``ref_logp`` (the reference policy's, for KL methods), ``scores`` (the LM-head
    kernel scores at θ_old, :data:`entropy_lens.model.head.SCORE_FIELDS`, for STEER's
    ``omega=lm_head`` / ``lm_head_source``) and advantages; micro-batches of
    ``optim.micro_batch`` sequences accumulate gradients. Raises :class:`TrainingDiverged` on a
    non-finite loss or gradient norm (before the optimizer step).

    Every tensor argument lives on the model's device (``packed`` included); the forward passes
    run under the run's :func:`entropy_lens.train.setup.autocast`, the statistics and the loss
    are reduced in float32 and the update is applied to the float32 weights.
    """
    o, T = cfg.optim, cfg.rollout.temperature
    B = packed.mask.shape[0]
    micro = o.micro_batch or B
    mask = packed.mask
    device = mask.device
    with autocast(cfg):
        stats = {k: v.to(device) for k, v in response_stats(model, packed, T, micro_batch=micro).items()}
    batch = TokenBatch(
        token_ids=packed.response_ids, mask=mask, logp=stats["logp"], old_logp=old_logp, entropy=stats["entropy"],
        sum_p2=stats["sum_p2"], sum_p2_logp=stats["sum_p2_logp"], adv=adv, group_id=group_id, reward=reward,
        meta={"temperature": T}, old_entropy=old_entropy, ref_logp=ref_logp, **scores,
    )
    ctx = replace(make_context(0, o.lr, batch_size=B, micro_batch_size=micro), generator=method_gen)
    terms = apply_method(cfg.method, batch, method_params, ctx)

    # closed-form predictions of this update: the estimators divide by L (this mini-batch's valid
    # tokens), so the coefficient carries L·∂loss/∂ℓ_t of the aggregation actually used
    a = terms.adv if terms.adv is not None else adv
    g = terms.penalty.dlogp(batch.logp, batch.old_logp) if terms.penalty is not None else None
    coef = est.effective_coefficient(terms.weight, a, mask, batch.ratio, g)
    agg_w = loss_token_weights(mask.cpu(), o.agg_mode, o.agg_scope, micro, mask.shape[1]) * max(int(mask.sum()), 1)
    coef = coef * agg_w.to(device=device, dtype=coef.dtype)
    cols = est.closed_form_columns(batch.replace(adv=coef), o.lr, terms.eps_low, terms.eps_high, terms.dual_clip)
    preds = {k: cols[k] for k in ("omega_paper", "dh_all_logit", "dh_cov")}
    r = batch.ratio
    clip_hi = mask & (a > 0) & (r > 1 + torch.as_tensor(terms.eps_high))
    clip_lo = mask & (a < 0) & (r < 1 - torch.as_tensor(terms.eps_low))

    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    parts = micro_rows(B, micro)
    for rows in parts:  # loop over micro-batches
        sub = packed.select(rows)
        with autocast(cfg):
            logp, ent = response_logp_entropy(model, sub, T)
        loss = method_loss(terms.rows(rows), logp.float(), old_logp[rows], adv[rows], mask[rows], ent.float(),
                           o.agg_mode, norm_len=mask.shape[1]) * _micro_share(o.agg_mode, o.agg_scope, mask, rows,
                                                                              len(parts))
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss ({float(loss.detach())}) at {where}")
        loss.backward()
        total += float(loss.detach())
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip else math.inf)
    if not torch.isfinite(norm):
        raise TrainingDiverged(f"non-finite gradient norm ({float(norm)}) at {where}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateOut(preds=preds, weights=terms.weight[mask].detach().float(), n_clip_high=int(clip_hi.sum()),
                     n_clip_low=int(clip_lo.sum()), n_tokens=int(mask.sum()), loss=total)


# ---------------------------------------------------------------------------------------------
# One RL step
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    record: dict[str, Any]
    rollouts: pd.DataFrame


def _rollouts_frame(step: int, prompts_per_step: int, problems: list, texts: list[str], rewards: torch.Tensor,
                    group: torch.Tensor, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    old_logp: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> pd.DataFrame:
    """The step's rollouts in the rollout format (:mod:`entropy_lens.io.rollouts`), groups numbered
    across steps, with exact ids and the per-token ``old_logp`` (nats)."""
    lengths = mask.sum(-1).tolist()
    return pd.DataFrame({
        "prompt": [p.text for p in problems],
        "response": texts,
        "reward": rewards.double().numpy(),
        "group": group.numpy() + (step - 1) * prompts_per_step,
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "old_logp": [old_logp[b, :n_b].double().tolist() for b, n_b in enumerate(lengths)],
        "ground_truth": [p.answer for p in problems],
        "correct": correct.numpy(),
        "step": step,
    })


@dataclass
class Sampled:
    """The step's responses, prompt-major in groups of n: problems, ids, texts, the verifiable
    ``rewards`` [B] (after overlong shaping), ``correct`` [B] bool, ``group`` [B] (0..P−1), and
    the dynamic-sampling counts (``None`` when it is off)."""

    problems: list
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    rewards: torch.Tensor
    correct: torch.Tensor
    group: torch.Tensor
    sampling: dict[str, int] | None = None


def _sample_round(model, task, cfg: TrainConfig, gens: dict[str, torch.Generator],
                  reward: tuple[str, Callable[[str, str], float]]) -> Sampled:
    """Draw ``prompts_per_step`` prompts and ``n`` responses each; reward (with DAPO's overlong
    shaping when ``task.overlong_buffer`` > 0) and the task's own correctness."""
    n, tok = cfg.rollout.n, task.tokenizer
    pick = torch.randperm(len(task.train_problems), generator=gens["prompts"])[: cfg.prompts_per_step]
    problems = [task.train_problems[int(i)] for i in pick]
    prompt_ids = [task.prompt_ids(p) for p in problems]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gens["sampling"]))
    with autocast(cfg):
        samples = generate_ids(model, tok, prompt_ids, n, task.max_new_tokens, cfg.rollout.gen_batch,
                               cfg.rollout.temperature, seed=seed, top_p=cfg.rollout.top_p)
    group = torch.tensor([i for i, _ in samples], dtype=torch.long)
    sample_problems = [problems[i] for i, _ in samples]
    response_ids = [r for _, r in samples]
    texts = [task.decode(r) for r in response_ids]
    reward_name, reward_fn = reward
    scores = score_responses(reward_fn, reward_name, texts, sample_problems)
    if reward_fn == task.reward:  # the task's own verifier: its scores already say which are correct
        correct = torch.tensor([r == task.correct for r in scores])
    else:
        correct = torch.tensor([task.reward(t, p.answer) == task.correct for t, p in zip(texts, sample_problems)])
    rewards = torch.tensor(scores, dtype=torch.float64)
    if cfg.task.overlong_buffer > 0:
        shaping = overlong_penalty([len(r) for r in response_ids], task.max_new_tokens, cfg.task.overlong_buffer,
                                   cfg.task.overlong_penalty)
        rewards = rewards + torch.tensor(shaping, dtype=torch.float64)
    return Sampled(sample_problems, [prompt_ids[i] for i, _ in samples], response_ids, texts,
                   rewards.float(), correct, group)


def _take_groups(s: Sampled, groups: list[int], n: int, offset: int) -> Sampled:
    """The responses of ``groups`` (ids of ``s.group``), renumbered from ``offset``."""
    rows = [b for g in groups for b in range(g * n, (g + 1) * n)]
    new_group = torch.tensor([offset + i for i in range(len(groups)) for _ in range(n)], dtype=torch.long)
    return Sampled([s.problems[b] for b in rows], [s.prompt_ids[b] for b in rows], [s.response_ids[b] for b in rows],
                   [s.texts[b] for b in rows], s.rewards[rows], s.correct[rows], new_group)


def _concat(parts: list[Sampled]) -> Sampled:
    return Sampled(
        [p for s in parts for p in s.problems], [p for s in parts for p in s.prompt_ids],
        [r for s in parts for r in s.response_ids], [t for s in parts for t in s.texts],
        torch.cat([s.rewards for s in parts]), torch.cat([s.correct for s in parts]),
        torch.cat([s.group for s in parts]),
    )


def sample_batch(model, task, cfg: TrainConfig, gens: dict[str, torch.Generator],
                 reward: tuple[str, Callable[[str, str], float]]) -> Sampled:
    """The step's batch of ``prompts_per_step`` groups of ``n`` responses.

    With ``rollout.dynamic_sampling`` (DAPO, arXiv 2503.14476 §3.2) groups whose responses are all
    correct or all wrong (the task's verifier; they carry no group-relative advantage) are dropped
    and new prompts drawn, for at most ``rollout.max_sampling_rounds`` rounds; if the batch is still
    short, the dropped groups of the rounds fill it (``groups_filled`` in the counts)."""
    first = _sample_round(model, task, cfg, gens, reward)
    if not cfg.rollout.dynamic_sampling:
        return first
    P, n = cfg.prompts_per_step, cfg.rollout.n
    kept: list[Sampled] = []
    dropped: list[tuple[Sampled, int]] = []
    n_kept = rounds = 0
    current = first
    while True:
        rounds += 1
        ok = current.correct.reshape(P, n).float().mean(-1)
        informative = [g for g in range(P) if 0.0 < float(ok[g]) < 1.0]
        take = informative[: P - n_kept]
        kept.append(_take_groups(current, take, n, n_kept))
        n_kept += len(take)
        dropped.extend((current, g) for g in range(P) if g not in informative)
        if n_kept >= P or rounds >= cfg.rollout.max_sampling_rounds:
            break
        current = _sample_round(model, task, cfg, gens, reward)
    filled = P - n_kept
    for i, (src, g) in enumerate(dropped[:filled]):
        kept.append(_take_groups(src, [g], n, n_kept + i))
    out = _concat(kept)
    out.sampling = {"rounds": rounds, "groups_sampled": rounds * P, "groups_kept": n_kept, "groups_filled": filled}
    return out


def _packed_on(device: torch.device, sb: Sampled, pad: int, advantage: str) -> tuple[PackedBatch, torch.Tensor]:
    """The step's packed batch and per-token advantages ``[B, T]`` (fp32), built on the CPU and
    moved to ``device`` once: from there on every tensor of the step lives on the model's device,
    and CPU copies are made for the metrics record and the rollouts frame only."""
    packed = pack(sb.prompt_ids, sb.response_ids, pad)
    seq_adv = compute_advantages(advantage, sb.rewards, sb.group, lengths=packed.mask.sum(-1))
    return packed.to(device), broadcast_to_tokens(seq_adv, packed.mask).float().to(device)


def rl_step(step: int, model, task, cfg: TrainConfig, optimizer, gens: dict[str, torch.Generator],
            reward: tuple[str, Callable[[str, str], float]], method_params: Any, ref_model=None) -> StepResult:
    """Sample → reward → advantages → old statistics → updates → measured and predicted ΔH.
    ``ref_model``: the frozen reference policy, for methods that read ``ref_logp`` (else None)."""
    T, o = cfg.rollout.temperature, cfg.optim
    tok = task.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 1-2. prompts, n responses each, verifiable reward, accuracy, advantages
    sb = sample_batch(model, task, cfg, gens, reward)
    rewards, group, correct = sb.rewards, sb.group, sb.correct
    device = model_device(model)
    packed, adv = _packed_on(device, sb, pad, o.advantage)
    rewards_dev, group_dev = rewards.to(device), group.to(device)
    mask = packed.mask

    # 3. old log-probs and entropies (no grad)
    B = mask.shape[0]
    with autocast(cfg):
        old = {k: v.to(device) for k, v in response_stats(model, packed, T, micro_batch=o.micro_batch or B).items()}
    old_logp = old["logp"]
    quadrant = est.quadrant(old["logp"], old["entropy"], adv)
    ref_logp = None
    if ref_model is not None:
        with autocast(cfg):
            ref_logp = response_stats(ref_model, packed, T, micro_batch=o.micro_batch or B)["logp"].to(device)
    # the LM head's kernel scores of the whole batch at θ_old (r = 1, no clip: c_k = A_k), if read
    needed = [f for f in SCORE_FIELDS if f in get_method(cfg.method).required_inputs(method_params)]
    scores = {f: lm_head_score(model, packed, adv, T, o.micro_batch or B, role=SCORE_FIELDS[f]).to(device=device, dtype=old_logp.dtype)
              for f in needed}

    # 4. updates: ppo_epochs × mini_batches optimizer steps (sequences shuffled first with mix_groups)
    theta = snapshot(model)
    order = (torch.randperm(B, generator=gens["prompts"]) if o.mix_groups else torch.arange(B)).to(device)
    mb = B // o.mini_batches
    preds = {k: torch.zeros_like(old_logp, dtype=torch.float64) for k in ("omega_paper", "dh_all_logit", "dh_cov")}
    weights, losses = [], []
    n_hi = n_lo = n_tok = 0
    for epoch in range(o.ppo_epochs):
        for j in range(o.mini_batches):
            rows = order[j * mb:(j + 1) * mb]
            u = update_minibatch(model, optimizer, packed.select(rows), old_logp[rows], adv[rows], group_dev[rows],
                                 rewards_dev[rows], cfg, method_params, gens["method"],
                                 where=f"step {step}, epoch {epoch + 1}, mini-batch {j + 1}",
                                 old_entropy=old["entropy"][rows],
                                 ref_logp=None if ref_logp is None else ref_logp[rows],
                                 **{f: v[rows] for f, v in scores.items()})
            for k in preds:
                preds[k][rows] += u.preds[k].double()
            weights.append(u.weights)
            losses.append(u.loss)
            n_hi, n_lo, n_tok = n_hi + u.n_clip_high, n_lo + u.n_clip_low, n_tok + u.n_tokens

    # 5. measured ΔH on the same batch, and the parameter-space prediction of the whole step
    with autocast(cfg):
        after = {k: v.to(device) for k, v in response_stats(model, packed, T, micro_batch=o.micro_batch or B).items()}
    dh_measured = torch.where(mask, after["entropy"] - old["entropy"], 0.0).double()
    dh_jvp = None
    if cfg.log.jvp_every and step % cfg.log.jvp_every == 0:
        with torch.no_grad():
            delta = {k: p.detach() - theta[k] for k, p in trainable_params(model).items()}
        dh_jvp = float(jvp_prediction(model, packed, theta, delta, T, o.micro_batch or B)[mask].double().sum())
    del theta

    eos = tok.eos_token_id
    truncated = torch.tensor([not r or r[-1] != eos for r in sb.response_ids], dtype=torch.float64)
    record = dict(
        step=step, method=cfg.method, seed=cfg.seed,
        reward_mean=float(rewards.double().mean()), accuracy=float(correct.double().mean()),
        entropy_mean=float(old["entropy"][mask].double().mean()),
        clip_frac_high=n_hi / max(n_tok, 1), clip_frac_low=n_lo / max(n_tok, 1),
        **mx.weight_stats(torch.cat(weights).cpu()),
        quadrant=mx.quadrant_table(quadrant.cpu(), mask.cpu(), preds["omega_paper"].cpu(), dh_measured.cpu()),
        dh_pred={**{k: float(v[mask].sum()) for k, v in preds.items()}, "dh_jvp": dh_jvp},
        dh_measured=float(dh_measured[mask].sum()), loss=sum(losses) / len(losses),
        truncated_frac=float(truncated.mean()), sampling=sb.sampling,
    )
    rollouts = _rollouts_frame(step, cfg.prompts_per_step, sb.problems, sb.texts, rewards, group,
                               sb.prompt_ids, sb.response_ids, old_logp.cpu(), mask.cpu(), correct)
    return StepResult(record=record, rollouts=rollouts)
