"""SFT warm-up on the arithmetic task (cached by configuration), before the RL steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from entropy_lens.io.writers import atomic_folder, atomic_write_json
from entropy_lens.model.forward import (
    pack,
    response_logp_entropy,
)
from entropy_lens.model.update import make_optimizer, trainable_params
from entropy_lens.train.config import (
    TrainConfig,
    config_to_dict,
)
from entropy_lens.train.evaluate import dev_accuracy, eval_accuracy
from entropy_lens.train.setup import Progress
from entropy_lens.train.tasks import (
    ArithmeticTask,
    sft_batch,
)

# ---------------------------------------------------------------------------------------------
# SFT warm-up
# ---------------------------------------------------------------------------------------------


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
        with atomic_folder(cache, replace=False) as tmp:  # another run may fill it first: same content
            st_save(model, str(tmp / "model.safetensors"))
            atomic_write_json(tmp / "info.json", info)
    return info


