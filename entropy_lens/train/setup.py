"""The trainer's building blocks: random streams, the model and the task."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from entropy_lens.placement import resolve_placement as resolve
from entropy_lens.train.config import (
    TrainConfig,
)
from entropy_lens.train.tasks import (
    ArithmeticTask,
    GSM8KTask,
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
# Device and dtype
# ---------------------------------------------------------------------------------------------


def resolve_placement(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``device`` and ``dtype`` resolved and checked: ``auto`` becomes ``cuda:I`` and
    ``bfloat16`` where a GPU is visible, else ``cpu`` and ``float32``; ``cuda`` without a GPU or
    ``cuda:N`` beyond the visible ones raise ``ValueError`` (one line). The rules and messages are
    those of every command's ``--device``/``--dtype`` (:func:`entropy_lens.placement.resolve_placement`).
    Idempotent: a resolved config comes back unchanged."""
    device, dtype = resolve(cfg.device, cfg.dtype)
    return replace(cfg, device=device, dtype=dtype)


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The torch dtype the forward passes compute in (``cfg.dtype`` resolved)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def autocast(cfg: TrainConfig, enabled: bool = True):
    """The mixed-precision context of the run's forward passes: ``torch.autocast`` to bfloat16 on
    the run's device type when ``cfg.dtype`` is ``bfloat16`` (the weights, gradients and optimizer
    state stay float32), nothing for float32 (or with ``enabled`` false: the exact-first-order JVP
    runs in float32)."""
    if not enabled or cfg.dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=compute_dtype(cfg))


def place(model, cfg: TrainConfig):
    """Move ``model`` (float32 weights) to ``cfg.device`` once; returns it."""
    if torch.device(cfg.device) != torch.device("cpu"):
        model.to(cfg.device)
    return model


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
                     max_new_tokens=t.max_new_tokens or 128, name=t.name)


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


