"""The reference GRPO trainer: one readable loop.

Each RL step (:func:`rl_step`):

1. draw ``P`` training prompts and sample ``n`` responses each (full softmax at τ, Hugging Face
   ``generate``: :func:`generate_ids`);
2. score them with the verifiable reward; group-normalised advantages
   (:func:`entropy_lens.advantages.compute_advantages`);
3. old log-probs and entropies of every response token, no grad (:func:`entropy_lens.model.forward.response_stats`);
4. ``ppo_epochs`` × ``mini_batches`` updates (:func:`update_minibatch`): the current statistics of
   the mini-batch → the chosen registry method's terms (:func:`entropy_lens.methods.apply_method`)
   → the one objective (:func:`entropy_lens.methods.method_loss`) → one optimizer step;
5. re-forward the same batch: measured ΔH = H(after) − H(before) per token; the closed-form
   predictions (:func:`entropy_lens.estimators.closed_form_columns`, made at each update with the
   method's effective coefficient, η and that mini-batch's L) and the parameter-space
   ∇_θH·Δθ of the whole step (:func:`entropy_lens.model.jvp.jvp_prediction`);
6. one line of ``metrics.jsonl``, the rollouts, a checkpoint every k steps.

:func:`train` runs SFT warm-up (arithmetic task), then the RL steps, with resume from the last
checkpoint. No printing: progress goes through the ``progress(event, info)`` callback.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from entropy_lens import estimators as est
from entropy_lens.advantages import broadcast_to_tokens, compute_advantages
from entropy_lens.io.writers import (
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_yaml,
    temp_dir,
    versions,
)
from entropy_lens.methods import (
    apply_method,
    make_context,
    method_loss,
    params_from_dict,
)
from entropy_lens.model.forward import (
    PackedBatch,
    pack,
    response_logp_entropy,
    response_stats,
)
from entropy_lens.model.generate import generate
from entropy_lens.model.jvp import jvp_prediction
from entropy_lens.model.update import make_optimizer, snapshot, trainable_params
from entropy_lens.tokens import TokenBatch
from entropy_lens.train import checkpoint as ckpt
from entropy_lens.train import metrics as mx
from entropy_lens.train.config import (
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    parse_value,
)
from entropy_lens.train.tasks import (
    ArithmeticTask,
    GSM8KTask,
    Problem,
    resolve_reward,
    score_responses,
    sft_batch,
)

Progress = Callable[[str, dict[str, Any]], None]

#: Independent random streams; each is a torch.Generator seeded from (seed, stream).
STREAMS = {"prompts": 1, "sampling": 2, "method": 3, "sft": 4, "eval": 5}


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stopped before the bad update; checkpoints are kept."""


def stream_seed(seed: int, stream: str) -> int:
    return (int(seed) * 1_000_003 + STREAMS[stream] * 7_919) % (2**62)


def make_generators(seed: int) -> dict[str, torch.Generator]:
    return {name: torch.Generator().manual_seed(stream_seed(seed, name)) for name in STREAMS}


# ---------------------------------------------------------------------------------------------
# Model and task
# ---------------------------------------------------------------------------------------------


def build_tiny_model(cfg: TrainConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """A Llama-shaped causal LM from the ``model`` section, random init seeded by ``cfg.seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_positions, tie_word_embeddings=True, pad_token_id=pad_id,
        bos_token_id=bos_id, eos_token_id=eos_id, attn_implementation=m.attn,
    )
    torch.manual_seed(stream_seed(cfg.seed, "sft") + 1)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    return model.eval()


def build_task(cfg: TrainConfig, tokenizer=None):
    """The task of the ``task`` section (``tokenizer``: the model's, for GSM8K prompts)."""
    t = cfg.task
    if t.name == "arithmetic":
        correct, incorrect = (1.0, -1.0) if t.convention == "pm1" else (1.0, 0.0)
        return ArithmeticTask(digits=t.digits, n_operands=t.n_operands, ops=t.ops, eval_size=t.eval_size,
                              split_seed=t.split_seed, correct=correct, incorrect=incorrect)
    return GSM8KTask(tokenizer, path=t.path, eval_size=t.eval_size, reward=t.grader, convention=t.convention,
                     max_new_tokens=t.max_new_tokens or 128)


def load_model_and_task(cfg: TrainConfig, from_checkpoint: Path | None = None):
    """``(model, tokenizer to save with checkpoints, task)``; from a checkpoint folder if given."""
    src = cfg.model.source
    if cfg.task.name == "arithmetic":
        if src != "tiny":
            raise ValueError("task.name=arithmetic needs model.source=tiny (its own character vocabulary)")
        task = build_task(cfg)
        tok = task.tokenizer
        if from_checkpoint is not None:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(from_checkpoint, attn_implementation=cfg.model.attn).eval()
        else:
            model = build_tiny_model(cfg, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        return model, tok.to_hf(), task
    if src == "tiny":
        raise ValueError(f"task.name={cfg.task.name} needs a pretrained model (model.source=bundled or a folder)")
    from entropy_lens.model.load import load_model

    path = from_checkpoint if from_checkpoint is not None else (None if src == "bundled" else src)
    model, tok = load_model(path, attn_implementation=cfg.model.attn)
    return model, tok, build_task(cfg, tok)


# ---------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------


def generate_ids(
    model, tok, prompts: list[list[int]], n: int, max_new_tokens: int, batch_size: int,
    temperature: float | None = None, seed: int = 0,
) -> list[tuple[int, list[int]]]:
    """``n`` responses per prompt, prompt-major: ``(prompt index, response ids up to and including
    the first EOS)``; :func:`entropy_lens.model.generate.generate` without the per-sample log-prob
    pass (the trainer recomputes ``old_logp`` for the whole batch; measured on ``arithmetic-tiny``
    the per-sample pass cost as much as ``generate`` itself). ``temperature=None``: greedy."""
    outs = generate(model, tok, prompts, n, max_new_tokens, batch_size, temperature, seed)
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
    ], dtype=torch.float64).reshape(len(problems), n)
    return mx.pass_at_k_table(torch.full((len(problems),), float(n)), correct.sum(-1), ks)


# ---------------------------------------------------------------------------------------------
# SFT warm-up
# ---------------------------------------------------------------------------------------------


def dev_accuracy(model, task, problems: list[Problem], batch_size: int) -> float:
    """Greedy accuracy on ``problems`` (the task's own verifier)."""
    resp = generate_ids(model, task.tokenizer, [task.prompt_ids(p) for p in problems], 1, task.max_new_tokens,
                        batch_size)
    ok = [task.reward(task.decode(r), p.answer) == task.correct for (_, r), p in zip(resp, problems)]
    return sum(ok) / max(len(ok), 1)


def sft_warmup(model, task: ArithmeticTask, cfg: TrainConfig, gen: torch.Generator,
               progress: Progress | None = None) -> dict[str, Any]:
    """Cross-entropy on answer + EOS, AdamW, ``sft.batch_size`` problems per step, for ``sft.steps``
    steps or, with ``sft.target_accuracy``, until the greedy accuracy on the first ``sft.dev_size``
    training problems reaches it (checked every ``sft.check_every`` steps)."""
    sc = cfg.sft
    opt = make_optimizer(list(trainable_params(model).values()), "adamw", sc.lr)
    dev = task.train_problems[: sc.dev_size]
    losses: list[float] = []
    dev_acc = None
    for s in range(sc.steps):
        idx = torch.randint(len(task.train_problems), (cfg.sft.batch_size,), generator=gen)
        prompts, targets = sft_batch(task, idx)
        packed = pack(prompts, targets, task.tokenizer.pad_token_id)
        logp, _ = response_logp_entropy(model, packed)
        loss = -logp[packed.mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress("sft", {"step": s + 1, "total": sc.steps, "loss": losses[-1]})
        if sc.target_accuracy is not None and (s + 1) % sc.check_every == 0:
            dev_acc = dev_accuracy(model, task, dev, cfg.rollout.gen_batch)
            if dev_acc >= sc.target_accuracy:
                break
    return {"steps": sc.steps, "steps_run": len(losses), "target_accuracy": sc.target_accuracy,
            "dev_accuracy": dev_acc, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


def sft_cache_key(cfg: TrainConfig) -> str:
    """Hash of everything the warmed-up weights depend on: model, task, SFT settings, seed."""
    import hashlib
    import json

    d = config_to_dict(cfg)
    key = {"model": d["model"], "task": d["task"], "sft": {k: v for k, v in d["sft"].items() if k != "cache_dir"},
           "seed": cfg.seed, "eval": bool(cfg.log.eval_every), "gen_batch": cfg.rollout.gen_batch, "v": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def warm_start(model, task, cfg: TrainConfig, gen: torch.Generator, progress: Progress | None = None) -> dict[str, Any]:
    """SFT warm-up (when ``sft.steps`` > 0) and the greedy eval accuracy of the starting model
    (when ``log.eval_every`` > 0). With ``sft.cache_dir`` the result is stored/reused there
    (weights as safetensors, bit-identical to running the warm-up again)."""
    import json

    from safetensors.torch import load_model as st_load
    from safetensors.torch import save_model as st_save

    cache = None
    if cfg.sft.steps and cfg.sft.cache_dir:
        cache = Path(cfg.sft.cache_dir) / f"sft-{sft_cache_key(cfg)}"
        if (cache / "info.json").is_file():
            st_load(model, str(cache / "model.safetensors"))
            return {**json.loads((cache / "info.json").read_text()), "sft_cache": str(cache)}
    info: dict[str, Any] = {}
    if cfg.sft.steps:
        info["sft"] = sft_warmup(model, task, cfg, gen, progress)
    if cfg.log.eval_every:
        info["eval_accuracy_step0"] = eval_accuracy(model, task, cfg.rollout.gen_batch)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(cache.parent, prefix=f".{cache.name}.")
        st_save(model, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "info.json", info)
        try:
            tmp.rename(cache)
        except OSError:  # another run filled the cache first: same content
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return info


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


def _micro_share(mode: str, mask: torch.Tensor, rows: slice) -> float:
    """Factor that turns the aggregated loss of sequences ``rows`` into its share of the
    mini-batch loss (so micro-batch losses sum to the mini-batch loss for every agg mode)."""
    sub = mask[rows]
    if mode == "token-mean":
        return float(sub.sum()) / max(float(mask.sum()), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return sub.shape[0] / mask.shape[0]
    return float(sub.any(-1).sum()) / max(float(mask.any(-1).sum()), 1.0)


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
) -> UpdateOut:
    """One optimizer step on one mini-batch through the chosen method and the one objective.

    The method sees the mini-batch's current statistics (log p, H, Σp², Σp² log p at θ before this
    update; no grad) with the recorded ``old_logp`` and advantages; micro-batches of
    ``optim.micro_batch`` sequences accumulate gradients. Raises :class:`TrainingDiverged` on a
    non-finite loss or gradient norm (before the optimizer step).
    """
    o, T = cfg.optim, cfg.rollout.temperature
    B = packed.mask.shape[0]
    micro = o.micro_batch or B
    mask = packed.mask
    stats = response_stats(model, packed, T, micro_batch=micro)
    batch = TokenBatch(
        token_ids=packed.response_ids, mask=mask, logp=stats["logp"], old_logp=old_logp, entropy=stats["entropy"],
        sum_p2=stats["sum_p2"], sum_p2_logp=stats["sum_p2_logp"], adv=adv, group_id=group_id, reward=reward,
        meta={"temperature": T},
    )
    ctx = replace(make_context(0, o.lr, batch_size=B, micro_batch_size=micro), generator=method_gen)
    terms = apply_method(cfg.method, batch, method_params, ctx)

    # closed-form predictions of this update (token-mean: L = this mini-batch's valid tokens)
    a = terms.adv if terms.adv is not None else adv
    g = terms.penalty.dlogp(batch.logp, batch.old_logp) if terms.penalty is not None else None
    coef = est.effective_coefficient(terms.weight, a, mask, batch.ratio, g)
    cols = est.closed_form_columns(batch.replace(adv=coef), o.lr, terms.eps_low, terms.eps_high, terms.dual_clip)
    preds = {k: cols[k] for k in ("omega_paper", "dh_all_logit", "dh_cov")}
    r = batch.ratio
    clip_hi = mask & (a > 0) & (r > 1 + torch.as_tensor(terms.eps_high))
    clip_lo = mask & (a < 0) & (r < 1 - torch.as_tensor(terms.eps_low))

    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, B, micro):  # loop over micro-batches
        rows = slice(i, min(i + micro, B))
        sub = packed.select(rows)
        logp, ent = response_logp_entropy(model, sub, T)
        loss = method_loss(terms.rows(rows), logp, old_logp[rows], adv[rows], mask[rows], ent, o.agg_mode,
                           norm_len=mask.shape[1]) * _micro_share(o.agg_mode, mask, rows)
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


def rl_step(step: int, model, task, cfg: TrainConfig, optimizer, gens: dict[str, torch.Generator],
            reward: tuple[str, Callable[[str, str], float]], method_params: Any) -> StepResult:
    """Sample → reward → advantages → old statistics → updates → measured and predicted ΔH."""
    T, n, o = cfg.rollout.temperature, cfg.rollout.n, cfg.optim
    tok = task.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 1. prompts and n responses each
    pick = torch.randperm(len(task.train_problems), generator=gens["prompts"])[: cfg.prompts_per_step]
    problems = [task.train_problems[int(i)] for i in pick]
    prompt_ids = [task.prompt_ids(p) for p in problems]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gens["sampling"]))
    samples = generate_ids(model, tok, prompt_ids, n, task.max_new_tokens, cfg.rollout.gen_batch, T, seed=seed)
    group = torch.tensor([i for i, _ in samples], dtype=torch.long)
    sample_problems = [problems[i] for i, _ in samples]
    sample_prompt_ids = [prompt_ids[i] for i, _ in samples]
    response_ids = [r for _, r in samples]
    texts = [task.decode(r) for r in response_ids]

    # 2. verifiable reward, accuracy (the task's own verifier), advantages
    reward_name, reward_fn = reward
    rewards = torch.tensor(score_responses(reward_fn, reward_name, texts, sample_problems), dtype=torch.float32)
    correct = torch.tensor([task.reward(t, p.answer) == task.correct for t, p in zip(texts, sample_problems)])
    packed = pack(sample_prompt_ids, response_ids, pad)
    mask = packed.mask
    seq_adv = compute_advantages(o.advantage, rewards, group, lengths=mask.sum(-1))
    adv = broadcast_to_tokens(seq_adv, mask).float()

    # 3. old log-probs and entropies (no grad)
    old = response_stats(model, packed, T, micro_batch=o.micro_batch or mask.shape[0])
    old_logp = old["logp"]
    quadrant = est.quadrant(old["logp"], old["entropy"], adv)

    # 4. updates: ppo_epochs × mini_batches optimizer steps
    theta = snapshot(model)
    B = mask.shape[0]
    mb = B // o.mini_batches
    preds = {k: torch.zeros_like(old_logp, dtype=torch.float64) for k in ("omega_paper", "dh_all_logit", "dh_cov")}
    weights, losses = [], []
    n_hi = n_lo = n_tok = 0
    for epoch in range(o.ppo_epochs):
        for j in range(o.mini_batches):
            rows = slice(j * mb, (j + 1) * mb)
            u = update_minibatch(model, optimizer, packed.select(rows), old_logp[rows], adv[rows], group[rows],
                                 rewards[rows], cfg, method_params, gens["method"],
                                 where=f"step {step}, epoch {epoch + 1}, mini-batch {j + 1}")
            for k in preds:
                preds[k][rows] += u.preds[k].double()
            weights.append(u.weights)
            losses.append(u.loss)
            n_hi, n_lo, n_tok = n_hi + u.n_clip_high, n_lo + u.n_clip_low, n_tok + u.n_tokens

    # 5. measured ΔH on the same batch, and the parameter-space prediction of the whole step
    after = response_stats(model, packed, T, micro_batch=o.micro_batch or B)
    dh_measured = torch.where(mask, after["entropy"] - old["entropy"], 0.0).double()
    dh_jvp = None
    if cfg.log.jvp_every and step % cfg.log.jvp_every == 0:
        with torch.no_grad():
            delta = {k: p.detach() - theta[k] for k, p in trainable_params(model).items()}
        dh_jvp = float(jvp_prediction(model, packed, theta, delta, T, o.micro_batch or B)[mask].double().sum())
    del theta

    record = dict(
        step=step, method=cfg.method, seed=cfg.seed,
        reward_mean=float(rewards.double().mean()), accuracy=float(correct.double().mean()),
        entropy_mean=float(old["entropy"][mask].double().mean()),
        clip_frac_high=n_hi / max(n_tok, 1), clip_frac_low=n_lo / max(n_tok, 1),
        **mx.weight_stats(torch.cat(weights)),
        quadrant=mx.quadrant_table(quadrant, mask, preds["omega_paper"], dh_measured),
        dh_pred={**{k: float(v[mask].sum()) for k, v in preds.items()}, "dh_jvp": dh_jvp},
        dh_measured=float(dh_measured[mask].sum()), loss=sum(losses) / len(losses),
    )
    lengths = mask.sum(-1).tolist()
    rollouts = pd.DataFrame({
        "prompt": [p.text for p in sample_problems],
        "response": texts,
        "reward": rewards.double().numpy(),
        "group": group.numpy() + (step - 1) * cfg.prompts_per_step,
        "prompt_ids": sample_prompt_ids,
        "response_ids": response_ids,
        "old_logp": [old_logp[b, :n_b].double().tolist() for b, n_b in enumerate(lengths)],
        "ground_truth": [p.answer for p in sample_problems],
        "correct": correct.numpy(),
        "step": step,
    })
    return StepResult(record=record, rollouts=rollouts)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@contextmanager
def _torch_settings(cfg: TrainConfig) -> Iterator[None]:
    """Threads and deterministic algorithms for the run; restored afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def load_run_config(out_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, set overrides)`` of an existing run folder, from its ``config.yaml``."""
    import yaml

    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (nothing to resume in {out_dir})")
    try:
        data = yaml.safe_load(path.read_text())["config"]
        data = dict(data)
        given = dict(data.pop("set", {}) or {})
        return config_from_dict(data), given
    except (KeyError, TypeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: malformed run config ({type(exc).__name__}: {exc})") from None


def _write_config(out: Path, cfg: TrainConfig, set_items: dict[str, Any]) -> None:
    """config.yaml: ``config`` (the resolved config plus ``set``, the overrides as given, values
    parsed to numbers/booleans where they are ones) and ``versions``."""
    typed = {k: parse_value(v) if isinstance(v, str) else v for k, v in set_items.items()}
    atomic_write_yaml(out / "config.yaml", {"config": {**config_to_dict(cfg), "set": typed},
                                           "versions": versions()})


def _check_task_size(cfg: TrainConfig, task) -> None:
    if len(task.train_problems) < cfg.prompts_per_step:
        raise ValueError(
            f"the task has {len(task.train_problems)} training problems but a step needs "
            f"{cfg.prompts_per_step} prompts (rollout.batch_size / rollout.n); lower rollout.batch_size"
        )


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    set_items: dict[str, Any] | None = None,
    progress: Progress | None = None,
    reward_fn: Callable[[str, str], float] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run into ``out_dir``; returns the summary (also ``summary.json``).

    Files: ``config.yaml``, ``metrics.jsonl`` (one line per RL step, :mod:`.metrics`),
    ``rollouts/step_NNNNNN.parquet``, ``checkpoints/step_NNNNNN/`` (step 0 = after SFT),
    ``summary.json``. ``reward_fn(response_text, answer) -> float`` replaces the configured reward.
    ``on_step(step)`` is called after each step is fully written (metrics, rollouts, checkpoint).
    ``resume``: continue from the newest checkpoint; the config must match the saved one (``steps``
    may grow). Raises ``ValueError`` on bad input and :class:`TrainingDiverged` on a non-finite loss.
    """
    out = Path(out_dir)
    metrics_path = out / "metrics.jsonl"
    set_items = dict(set_items or {})
    if resume:
        saved, saved_set = load_run_config(out)
        diff = config_diff(saved, cfg, ignore=("steps",))
        if diff:
            raise ValueError(f"{out}: config differs from the run being resumed: {'; '.join(diff[:3])}")
        set_items = {**saved_set, **set_items}
        last = ckpt.latest_checkpoint(out)
        if last is None:
            raise ValueError(f"{out}: no complete checkpoint to resume from (start the run again without --resume)")
    else:
        if metrics_path.exists() or ckpt.latest_checkpoint(out) is not None:
            raise ValueError(f"{out}: already holds a run; pass --resume to continue it or choose another -o")
        last = None
    method_params = params_from_dict(cfg.method, cfg.method_param_dict())

    with _torch_settings(cfg):
        t_start = time.perf_counter()
        gens = make_generators(cfg.seed)
        if last is None:
            model, tok, task = load_model_and_task(cfg)
            _check_task_size(cfg, task)
            reward = (reward_fn.__name__, reward_fn) if reward_fn else resolve_reward(cfg.task.reward, task)
            out.mkdir(parents=True, exist_ok=True)
            _write_config(out, cfg, set_items)
            info: dict[str, Any] = {"n_params": sum(p.numel() for p in model.parameters())}
            info.update(warm_start(model, task, cfg, gens["sft"], progress))
            optimizer = make_optimizer(list(trainable_params(model).values()), cfg.optim.name, cfg.optim.lr,
                                       cfg.optim.weight_decay)
            info["setup_wall_s"] = time.perf_counter() - t_start
            ckpt.save_checkpoint(out, 0, model, tok, optimizer, gens, {"info": info}, cfg.checkpoint.keep_last)
            start = 0
        else:
            start, path = last
            model, tok, task = load_model_and_task(cfg, from_checkpoint=path)
            _check_task_size(cfg, task)
            reward = (reward_fn.__name__, reward_fn) if reward_fn else resolve_reward(cfg.task.reward, task)
            optimizer = make_optimizer(list(trainable_params(model).values()), cfg.optim.name, cfg.optim.lr,
                                       cfg.optim.weight_decay)
            info = ckpt.load_training_state(path, optimizer, gens)["info"]
            mx.truncate_metrics(metrics_path, start)
            _write_config(out, cfg, set_items)
        if progress:
            progress("start", {"start": start, "total": cfg.steps, "info": info})

        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            try:
                res = rl_step(step, model, task, cfg, optimizer, gens, reward, method_params)
            except TrainingDiverged as exc:
                good = ckpt.latest_checkpoint(out)
                where = good[1] if good else "none"
                msg = f"{exc}; the run stopped, the last good checkpoint is {where}"
                atomic_write_json(out / "summary.json", {"status": "diverged", "message": msg,
                                                         "last_checkpoint": str(where)})
                raise TrainingDiverged(msg) from None
            extra: dict[str, Any] = {}
            if cfg.log.eval_every and (step % cfg.log.eval_every == 0 or step == cfg.steps):
                extra["eval_accuracy"] = eval_accuracy(model, task, cfg.rollout.gen_batch)
            if step == cfg.steps and cfg.log.pass_k:
                extra["pass_at_k"] = eval_pass_at_k(model, task, cfg)
            rec = mx.make_record(**res.record, **extra, wall_s=time.perf_counter() - t0)
            mx.append_record(metrics_path, rec)
            if cfg.log.save_rollouts:
                atomic_write_parquet(out / "rollouts" / f"step_{step:06d}.parquet", res.rollouts)
            if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                ckpt.save_checkpoint(out, step, model, tok, optimizer, gens, {"info": info}, cfg.checkpoint.keep_last)
            if progress:
                progress("step", {"step": step, "total": cfg.steps, "record": rec})
            if on_step:
                on_step(step)

        summary = summarize_run(cfg, out, info, time.perf_counter() - t_start)
        atomic_write_json(out / "summary.json", summary)
        return summary


def summarize_run(cfg: TrainConfig, out: Path, info: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """summary.json: status, first/last records, entropy drop, final accuracies, setup info."""
    recs = mx.read_metrics(out / "metrics.jsonl")
    first, last = recs[0], recs[-1]
    evals = [r["eval_accuracy"] for r in recs if "eval_accuracy" in r]
    return {
        "status": "completed",
        "preset": cfg.preset,
        "method": cfg.method,
        "method_params": params_from_dict(cfg.method, cfg.method_param_dict()).to_dict(),
        "seed": cfg.seed,
        "steps": len(recs),
        "entropy_first": first["entropy_mean"],
        "entropy_last": last["entropy_mean"],
        "entropy_drop": first["entropy_mean"] - last["entropy_mean"],
        "accuracy_first": first["accuracy"],
        "accuracy_last": last["accuracy"],
        "eval_accuracy_step0": info.get("eval_accuracy_step0"),
        "eval_accuracy_last": evals[-1] if evals else None,
        "pass_at_k": last.get("pass_at_k"),
        "wall_s_steps": sum(r["wall_s"] for r in recs),
        "wall_s_this_process": wall_s,
        "info": info,
        "closed_form_note": (
            "dh_pred closed forms are first-order SGD predictions (step = lr * gradient of the token-mean "
            "loss, L = the mini-batch's valid tokens), made at each mini-batch update and summed; with "
            "AdamW or grad clipping the real step differs in scale and direction. dh_jvp is the exact "
            "first order of the real update of the whole step."
        ),
    }
