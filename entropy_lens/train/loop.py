"""The reference GRPO trainer: one readable loop.

Each RL step (:func:`entropy_lens.train.step.rl_step`):

1. draw ``P`` training prompts and sample ``n`` responses each (full softmax at τ, Hugging Face
   ``generate``: :func:`entropy_lens.train.evaluate.generate_ids`);
2. score them with the verifiable reward; group-normalised advantages
   (:func:`entropy_lens.advantages.compute_advantages`);
3. old log-probs and entropies of every response token, no grad (:func:`entropy_lens.model.forward.response_stats`);
4. ``ppo_epochs`` × ``mini_batches`` updates (:func:`entropy_lens.train.step.update_minibatch`): the current statistics of
   the mini-batch → the chosen registry method's terms (:func:`entropy_lens.methods.apply_method`)
   → the one objective (:func:`entropy_lens.methods.method_loss`) → one optimizer step;
5. re-forward the same batch: measured ΔH = H(after) − H(before) per token; the closed-form
   predictions (:func:`entropy_lens.estimators.closed_form_columns`, made at each update with the
   method's effective coefficient, η and that mini-batch's L) and the parameter-space
   ∇_θH·Δθ of the whole step (:func:`entropy_lens.model.jvp.jvp_prediction`);
6. one line of ``metrics.jsonl``, the rollouts, a checkpoint every k steps.

:func:`train` (this module) runs SFT warm-up (arithmetic task, :mod:`~entropy_lens.train.warmup`),
then the RL steps, with resume from the last checkpoint. No printing: progress goes through the
``progress(event, info)`` callback. Building blocks: :mod:`~entropy_lens.train.setup` (random streams,
model, task), :mod:`~entropy_lens.train.evaluate` (generation, accuracy, pass@k),
:mod:`~entropy_lens.train.step` (one RL step), :mod:`~entropy_lens.train.checkpoint`,
:mod:`~entropy_lens.train.metrics`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from entropy_lens.io.writers import (
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_yaml,
    versions,
)
from entropy_lens.methods import (
    get_method,
    params_from_dict,
)
from entropy_lens.model.head import SCORE_FIELDS, check_linear_head
from entropy_lens.model.update import make_optimizer, trainable_params
from entropy_lens.tensorboard import TensorBoardLog
from entropy_lens.train import checkpoint as ckpt
from entropy_lens.train import metrics as mx
from entropy_lens.train.config import (
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    parse_value,
)
from entropy_lens.train.evaluate import eval_accuracy, eval_pass_at_k
from entropy_lens.train.setup import (
    Progress,
    TrainingDiverged,
    autocast,
    load_model_and_task,
    make_generators,
    place,
    resolve_placement,
)
from entropy_lens.train.step import rl_step
from entropy_lens.train.tasks import (
    resolve_reward,
)
from entropy_lens.train.warmup import warm_start

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
    cfg = resolve_placement(cfg)
    if resume:
        saved, saved_set = load_run_config(out)
        saved = resolve_placement(saved)  # a run recorded before device/dtype existed: this machine's
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
    needs_reference = "ref_logp" in get_method(cfg.method).required_inputs(method_params)

    with _torch_settings(cfg):
        t_start = time.perf_counter()
        gens = make_generators(cfg.seed)
        if last is None:
            model, tok, task = load_model_and_task(cfg)
            _check_task_size(cfg, task)
            if set(SCORE_FIELDS) & set(get_method(cfg.method).required_inputs(method_params)):
                check_linear_head(model, f"{cfg.method} with omega={method_params.omega}")
            reward = (reward_fn.__name__, reward_fn) if reward_fn else resolve_reward(cfg.task.reward, task)
            out.mkdir(parents=True, exist_ok=True)
            _write_config(out, cfg, set_items)
            info: dict[str, Any] = {"n_params": sum(p.numel() for p in model.parameters())}
            info.update(warm_start(model, task, cfg, gens["sft"], progress))  # arithmetic only: on the CPU, fp32
            place(model, cfg)
            optimizer = make_optimizer(list(trainable_params(model).values()), cfg.optim.name, cfg.optim.lr,
                                       cfg.optim.weight_decay)
            info["setup_wall_s"] = time.perf_counter() - t_start
            if needs_reference:
                ckpt.save_reference(out, model, tok)
            ckpt.save_checkpoint(out, 0, model, tok, optimizer, gens, {"info": info}, cfg.checkpoint.keep_last)
            start = 0
        else:
            start, path = last
            model, tok, task = load_model_and_task(cfg, from_checkpoint=path)
            place(model, cfg)
            _check_task_size(cfg, task)
            reward = (reward_fn.__name__, reward_fn) if reward_fn else resolve_reward(cfg.task.reward, task)
            optimizer = make_optimizer(list(trainable_params(model).values()), cfg.optim.name, cfg.optim.lr,
                                       cfg.optim.weight_decay)
            info = ckpt.load_training_state(path, optimizer, gens)["info"]
            mx.truncate_metrics(metrics_path, start)
            _write_config(out, cfg, set_items)
        if progress:
            progress("start", {"start": start, "total": cfg.steps, "info": info})
        tb = TensorBoardLog(out / "tensorboard", purge_step=start + 1) if cfg.log.tensorboard else None
        ref_model = load_reference(cfg, out) if needs_reference else None
        try:
            _steps(cfg, out, start, (model, tok, task, optimizer, ref_model), gens, reward, method_params, info,
                   progress, on_step, tb)
        finally:
            if tb is not None:
                tb.close()
        summary = summarize_run(cfg, out, info, time.perf_counter() - t_start)
        atomic_write_json(out / "summary.json", summary)
        return summary


def load_reference(cfg: TrainConfig, out: Path):
    """The frozen reference policy of the run (``<run>/reference``, written at step 0)."""
    path = out / ckpt.REFERENCE_DIR
    if not path.is_dir():
        raise ValueError(f"{path}: missing; method {cfg.method} needs the reference policy saved at step 0")
    model = place(load_model_and_task(cfg, from_checkpoint=path)[0], cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _steps(cfg: TrainConfig, out: Path, start: int, state: tuple, gens, reward, method_params,
           info: dict[str, Any], progress: Progress | None, on_step: Callable[[int], None] | None,
           tb: TensorBoardLog | None) -> None:
    """RL steps ``start + 1 .. cfg.steps``: each step's record, rollouts and checkpoint.
    ``state`` = (model, tokenizer, task, optimizer, reference model or None)."""
    model, tok, task, optimizer, ref_model = state
    metrics_path = out / "metrics.jsonl"
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        try:
            res = rl_step(step, model, task, cfg, optimizer, gens, reward, method_params, ref_model=ref_model)
        except TrainingDiverged as exc:
            good = ckpt.latest_checkpoint(out)
            where = good[1] if good else "none"
            msg = f"{exc}; the run stopped, the last good checkpoint is {where}"
            atomic_write_json(out / "summary.json", {"status": "diverged", "message": msg,
                                                     "last_checkpoint": str(where)})
            raise TrainingDiverged(msg) from None
        extra: dict[str, Any] = {}
        with autocast(cfg):
            if cfg.log.eval_every and (step % cfg.log.eval_every == 0 or step == cfg.steps):
                extra["eval_accuracy"] = eval_accuracy(model, task, cfg.rollout.gen_batch)
            if step == cfg.steps and cfg.log.pass_k:
                extra["pass_at_k"] = eval_pass_at_k(model, task, cfg)
        rec = mx.make_record(**res.record, **extra, wall_s=time.perf_counter() - t0)
        mx.append_record(metrics_path, rec)
        if tb is not None:
            tb.log(rec)
        if cfg.log.save_rollouts:
            atomic_write_parquet(out / "rollouts" / f"step_{step:06d}.parquet", res.rollouts)
        if step % cfg.checkpoint.every == 0 or step == cfg.steps:
            ckpt.save_checkpoint(out, step, model, tok, optimizer, gens, {"info": info}, cfg.checkpoint.keep_last)
        if progress:
            progress("step", {"step": step, "total": cfg.steps, "record": rec})
        if on_step:
            on_step(step)


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
