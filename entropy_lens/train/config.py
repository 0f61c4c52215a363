"""Configuration of the reference trainer: frozen dataclasses, presets and dotted overrides.

A run is fully described by a :class:`TrainConfig` (sections ``model, task, sft, rollout, optim,
log, checkpoint`` plus ``preset, method, method_params, seed, steps``). Build one with
:func:`build_config`, which starts from a preset and applies ``--set`` overrides such as
``optim.lr=3e-4``, ``rollout.n=4`` or ``method.lambda_min=0.7`` (``method.*`` keys are the chosen
method's parameters, checked by the method registry). Unknown keys, unknown presets/methods and
out-of-range values raise ``ValueError`` with one line naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from entropy_lens.advantages import ADVANTAGES
from entropy_lens.methods import get_method, params_from_dict
from entropy_lens.objective import AGG_MODES
from entropy_lens.overrides import parse_set_items, parse_value, split_method_keys


@dataclass(frozen=True)
class ModelConfig:
    """``source``: ``tiny`` (a Llama-shaped model built from the sizes below, random init),
    ``bundled`` (SmolLM2-135M-Instruct) or a Hugging Face model folder."""

    source: str = "tiny"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 64
    attn: str = "sdpa"


@dataclass(frozen=True)
class TaskConfig:
    """``name``: ``arithmetic``, ``gsm8k`` or ``math``. Arithmetic: ``digits`` per operand, ``n_operands``,
    ``ops`` (subset of ``+-*``). GSM8K: ``path`` (None: shipped problems, else $ENTROPY_LENS_DATA);
    math: any math dataset file in ``path`` (verl schema, e.g. DAPO-Math-17k, or problem/answer); ``grader``
    (``math`` | ``dapo``). ``reward``: ``task`` (the task's verifier) or ``module:function``.
    ``convention``: ``pm1`` (+1/−1) or ``01``. ``max_new_tokens``: 0 = the task's default.
    ``overlong_buffer``: DAPO's overlong reward shaping (arXiv 2503.14476, eq. 13) over the last
    ``overlong_buffer`` tokens before ``max_new_tokens`` (0: off), scaled by ``overlong_penalty``
    (:func:`entropy_lens.rewards.overlong_penalty`)."""

    name: str = "arithmetic"
    digits: int = 2
    n_operands: int = 2
    ops: str = "+"
    eval_size: int = 256
    split_seed: int = 1234
    path: str | None = None
    grader: str = "math"
    reward: str = "task"
    convention: str = "pm1"
    max_new_tokens: int = 0
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass(frozen=True)
class SFTConfig:
    """Supervised warm-up on correct answers before RL (0 steps: none). With ``target_accuracy``
    it stops early, at the first check (every ``check_every`` steps) where the greedy accuracy on
    ``dev_size`` *training* problems reaches the target, so every seed starts RL from a comparable
    point (the held-out eval set is never used for this); ``steps`` is then the maximum.
    ``cache_dir``: reuse the warmed-up weights of an identical (model, task, sft, seed) setting from
    this folder (bit-identical to running the warm-up again)."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    target_accuracy: float | None = None
    check_every: int = 10
    dev_size: int = 256
    cache_dir: str | None = None


@dataclass(frozen=True)
class RolloutConfig:
    """``batch_size`` responses per step = prompts × ``n`` (the group size); sampled at
    ``temperature`` with nucleus ``top_p`` (1: the full softmax); ``gen_batch`` sequences per
    generate call. ``dynamic_sampling``: DAPO's dynamic sampling (arXiv 2503.14476 §3.2): groups
    whose rewards are all equal (no advantage signal) are dropped and new prompts sampled, for at
    most ``max_sampling_rounds`` rounds; a batch still short after the last round trains on the
    groups it has (recorded in the step's metrics)."""

    batch_size: int = 128
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    gen_batch: int = 128
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3


@dataclass(frozen=True)
class OptimConfig:
    """RL update: ``name`` adamw | sgd, learning rate ``lr`` (η), ``weight_decay`` (decoupled, AdamW),
    ``grad_clip`` (max global norm, None: off). Each step's batch is split into ``mini_batches``
    consecutive mini-batches (one optimizer step each) for ``ppo_epochs`` passes; ``micro_batch``
    sequences per forward/backward (None: the whole mini-batch) — it is also the "micro" scope of
    the methods. ``mix_groups``: shuffle the step's sequences (``prompts`` stream) before splitting,
    so micro-batches mix prompt groups as the reference's length balancing across GPUs does
    (False: consecutive sequences, each group together).
    ``agg_mode``: loss aggregation (:data:`entropy_lens.objective.AGG_MODES`). ``agg_scope``:
    ``micro`` aggregates each micro-batch over its own tokens and divides by the number of
    micro-batches (gradient accumulation as in verl 0.4.1, the STEER reference); ``mini``: one
    aggregate over the whole mini-batch. ``advantage``: estimator of :mod:`entropy_lens.advantages`.
    Defaults ``weight_decay`` 0.01, ``grad_clip`` 1.0, ``agg_scope`` micro: the STEER reference
    run script (docs/trainer.md)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 4
    micro_batch: int | None = None
    mix_groups: bool = False
    agg_mode: str = "token-mean"
    agg_scope: str = "micro"
    advantage: str = "grpo"


@dataclass(frozen=True)
class LogConfig:
    """``eval_every``: greedy accuracy on the held-out set every k steps (0: only at the end);
    ``jvp_every``: the parameter-space ΔH prediction every k steps (0: never);
    ``pass_k``: the k of pass@k on the eval set at the end (n = max k samples per prompt; empty:
    skip); ``save_rollouts``: write ``rollouts/step_NNNNNN.parquet``; ``tensorboard``: also write
    every step's scalars to ``tensorboard/`` (needs the ``tensorboard`` extra)."""

    eval_every: int = 10
    jvp_every: int = 1
    pass_k: tuple[int, ...] = (1, 2, 4, 8, 16)
    save_rollouts: bool = True
    tensorboard: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint every ``every`` steps (and after the last one); the newest ``keep_last`` are kept."""

    every: int = 10
    keep_last: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``profile``: the :data:`PROFILES` entry applied over the preset (None:
    none). ``method_params``: the method's parameter overrides as sorted pairs.
    ``threads``: torch CPU threads (None: leave as is); ``deterministic``: use
    ``torch.use_deterministic_algorithms`` (needed for bit-identical resume). ``device``: ``auto``
    (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``dtype``: the
    compute dtype, ``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32`` or ``bfloat16``
    (autocast over fp32 weights: docs/trainer.md, "Device and dtype"). A run records both resolved
    (``cpu``/``cuda:I``, ``float32``/``bfloat16``)."""

    preset: str
    profile: str | None = None
    method: str = "grpo"
    method_params: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    steps: int = 200
    threads: int | None = None
    deterministic: bool = True
    device: str = "auto"
    dtype: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def prompts_per_step(self) -> int:
        return self.rollout.batch_size // self.rollout.n

    def method_param_dict(self) -> dict[str, Any]:
        return dict(self.method_params)


SECTIONS = ("model", "task", "sft", "rollout", "optim", "log", "checkpoint")
#: Task names (:class:`TaskConfig`).
TASKS = ("arithmetic", "gsm8k", "math")
#: Where the loss is aggregated (:class:`OptimConfig`).
AGG_SCOPES = ("micro", "mini")
TOP_LEVEL = ("seed", "steps", "threads", "deterministic", "device", "dtype")
#: ``dtype`` values the trainer runs with (float16 would need loss scaling: not supported).
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def _arithmetic_tiny() -> TrainConfig:
    """Tiny Llama (2 layers, width 64, ~83k parameters) trained from scratch on 2-digit addition:
    SFT warm-up, then 200 RL steps of 16 prompts × 8 samples; minutes on 2 CPU cores. It runs on
    the CPU in float32 also where a GPU is visible (a model this small is faster there, and the
    documented results are the CPU's, bit for bit); ``--device``/``--set device=`` moves it."""
    return TrainConfig(
        preset="arithmetic-tiny",
        steps=200,
        device="cpu",
        dtype="float32",
        model=ModelConfig(),
        task=TaskConfig(name="arithmetic", digits=2, n_operands=2, ops="+", eval_size=256),
        sft=SFTConfig(steps=2000, batch_size=64, lr=3e-3, target_accuracy=0.4, check_every=10, dev_size=256),
        rollout=RolloutConfig(batch_size=128, n=8, temperature=1.0, gen_batch=128),
        optim=OptimConfig(name="adamw", lr=2e-4, mini_batches=4, ppo_epochs=1),
        log=LogConfig(eval_every=10, jvp_every=4, pass_k=(1, 2, 4, 8, 16)),
        checkpoint=CheckpointConfig(every=25, keep_last=2),
    )


def _gsm8k_smollm2() -> TrainConfig:
    """The bundled SmolLM2-135M-Instruct on GSM8K prompts (a few steps on CPU; same code on GPU)."""
    return TrainConfig(
        preset="gsm8k-smollm2",
        steps=2,
        model=ModelConfig(source="bundled"),
        task=TaskConfig(name="gsm8k", eval_size=0, grader="math", convention="pm1", max_new_tokens=160),
        sft=SFTConfig(steps=0),
        rollout=RolloutConfig(batch_size=8, n=4, temperature=1.0, gen_batch=8),
        optim=OptimConfig(name="adamw", lr=1e-6, mini_batches=1, micro_batch=2, grad_clip=1.0),
        log=LogConfig(eval_every=0, jvp_every=0, pass_k=()),
        checkpoint=CheckpointConfig(every=1, keep_last=1),
    )


PRESETS = {"arithmetic-tiny": _arithmetic_tiny, "gsm8k-smollm2": _gsm8k_smollm2}

#: Profiles: overrides applied on top of a preset, before ``--set``. ``paper`` is the STEER
#: reference setting (arXiv 2510.10150 §5 and its released run script, verl 0.4.1): 512 prompts ×
#: 8 responses per step, mini-batches of 32 prompts (16 optimizer steps per RL step), micro-batches
#: of 8 sequences mixed across groups, AdamW lr 1e-6, weight decay 0.01, gradient clipping 1.0,
#: token-mean per micro-batch over the gradient-accumulation steps, T = 1, top-p 1, responses of up
#: to 3,072 tokens, 200 steps. The method's own defaults (ε 0.2/0.28, dual-clip 10, log-ratio clamp
#: ±20, λ_min 0.8, H_old) already follow the reference. The model (Qwen2.5-Math-7B) and the data
#: (DAPO-Math-17k) are set with ``model.source`` and ``task.*``.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "steps": 200,
        "rollout.batch_size": 4096,
        "rollout.n": 8,
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "optim.name": "adamw",
        "optim.lr": 1e-6,
        "optim.weight_decay": 0.01,
        "optim.grad_clip": 1.0,
        "optim.mini_batches": 16,
        "optim.micro_batch": 8,
        "optim.mix_groups": True,
        "optim.agg_mode": "token-mean",
        "optim.agg_scope": "micro",
        "optim.ppo_epochs": 1,
        "optim.advantage": "grpo",
        "task.max_new_tokens": 3072,
    },
}


def list_presets() -> list[str]:
    return list(PRESETS)


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def _coerce(key: str, text: Any, hint: Any) -> Any:
    """Convert an override value to the field's annotated type (``X | None``, int, float, bool,
    str, tuple[int, ...])."""
    args = typing.get_args(hint)
    raw = parse_value(text) if isinstance(text, str) else text
    if type(None) in args:
        if raw is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"{key} must be true or false, got {text!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer())):
            raise ValueError(f"{key} must be an integer, got {text!r}")
        return int(raw)
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"{key} must be a number, got {text!r}")
        return float(raw)
    if hint is str:
        return str(text) if isinstance(text, str) else str(raw)
    if typing.get_origin(hint) is tuple:
        if isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            s = str(text).strip().strip("()[]")
            items = [x for x in s.replace(";", ",").split(",") if x.strip()] if s else []
        try:
            return tuple(int(x) for x in items)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a comma-separated list of integers, got {text!r}") from None
    return raw


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``{"optim.lr": "3e-4", "method.lambda_min": "0.7", "seed": 1}`` applied to ``cfg``.

    Keys (:mod:`entropy_lens.overrides`): ``<section>.<field>``, a top-level field
    (:data:`TOP_LEVEL`), or ``<method>.<param>`` / ``method.<param>`` for the run's own method.
    Values may be strings (parsed for the field's type) or already typed.
    """
    hints = typing.get_type_hints(TrainConfig)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    mparams = dict(cfg.method_params)
    by_method, overrides = split_method_keys(overrides, [cfg.method], own=cfg.method)
    mparams.update(by_method.get(cfg.method, {}))
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if not dot:
            if head not in TOP_LEVEL:
                raise ValueError(
                    f"unknown config key {key!r}; valid: {', '.join(TOP_LEVEL)}, "
                    f"method.<param> or <section>.<field> with section in {', '.join(SECTIONS)}"
                )
            top[head] = _coerce(key, value, hints[head])
        elif head in SECTIONS:
            sec_cls = type(getattr(cfg, head))
            sec_hints = typing.get_type_hints(sec_cls)
            if rest not in sec_hints:
                valid = ", ".join(f.name for f in fields(sec_cls))
                raise ValueError(f"unknown config key {key!r}; valid keys of {head}: {valid}")
            sections.setdefault(head, {})[rest] = _coerce(key, value, sec_hints[rest])
        else:
            raise ValueError(
                f"unknown config section {head!r} in {key!r}; valid: {cfg.method} (or method), {', '.join(SECTIONS)}"
            )
    new = replace(cfg, **top, **{s: replace(getattr(cfg, s), **v) for s, v in sections.items()})
    return replace(new, method_params=tuple(sorted(mparams.items())))


def build_config(
    preset: str,
    method: str = "grpo",
    overrides: dict[str, Any] | list[str] | None = None,
    seed: int | None = None,
    steps: int | None = None,
    profile: str | None = None,
) -> TrainConfig:
    """A validated config: ``preset`` defaults, the ``method``, the ``profile``'s overrides
    (:data:`PROFILES`), ``overrides`` (a dict or a list of ``"key=value"`` strings), then
    ``seed``/``steps`` when given."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; available: {', '.join(PROFILES)}")
    get_method(method)  # unknown method -> ValueError listing the registered ones
    cfg = replace(PRESETS[preset](), method=method)
    if profile is not None:
        cfg = replace(apply_overrides(cfg, PROFILES[profile]), profile=profile)
    cfg = apply_overrides(cfg, parse_set_items(overrides) if isinstance(overrides, list) else dict(overrides or {}))
    if seed is not None:
        cfg = replace(cfg, seed=int(seed))
    if steps is not None:
        cfg = replace(cfg, steps=int(steps))
    validate_config(cfg)
    return cfg


def check_placement(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` (one line) unless ``device`` is auto, cpu, cuda or cuda:N and ``dtype``
    one of :data:`TRAIN_DTYPES` (whether the GPU is there is checked when the run resolves them:
    :func:`entropy_lens.train.setup.resolve_placement`)."""
    if not _DEVICE.match(str(cfg.device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.dtype not in TRAIN_DTYPES:
        why = " (float16 needs loss scaling, which the trainer does not do; use bfloat16)" if cfg.dtype == "float16" else ""
        raise ValueError(f"dtype must be auto, float32 or bfloat16 for training, got {cfg.dtype!r}{why}")


def validate_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` (one line) on any value the trainer cannot run with."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    params_from_dict(cfg.method, cfg.method_param_dict())  # unknown/out-of-range method parameters
    o, r, t, m = cfg.optim, cfg.rollout, cfg.task, cfg.model
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    check_placement(cfg)
    need(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(o.name in ("adamw", "sgd"), f"optim.name must be adamw or sgd, got {o.name!r}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be > 0 or none, got {o.grad_clip}")
    need(o.ppo_epochs >= 1, f"optim.ppo_epochs must be >= 1, got {o.ppo_epochs}")
    need(o.mini_batches >= 1, f"optim.mini_batches must be >= 1, got {o.mini_batches}")
    need(o.micro_batch is None or o.micro_batch >= 1, f"optim.micro_batch must be >= 1, got {o.micro_batch}")
    need(o.agg_scope in AGG_SCOPES, f"optim.agg_scope must be one of {', '.join(AGG_SCOPES)}, got {o.agg_scope!r}")
    need(o.agg_mode in AGG_MODES, f"optim.agg_mode must be one of {', '.join(AGG_MODES)}, got {o.agg_mode!r}")
    need(o.advantage in ADVANTAGES, f"optim.advantage must be one of {', '.join(ADVANTAGES)}, got {o.advantage!r}")
    need(r.n >= 2, f"rollout.n (group size) must be >= 2, got {r.n}")
    need(r.batch_size >= r.n, f"rollout.batch_size must be >= rollout.n, got {r.batch_size} < {r.n}")
    need(
        r.batch_size % r.n == 0,
        f"rollout.batch_size={r.batch_size} is not divisible by the group size rollout.n={r.n}",
    )
    need(
        r.batch_size % o.mini_batches == 0,
        f"rollout.batch_size={r.batch_size} is not divisible by optim.mini_batches={o.mini_batches}",
    )
    need(math.isfinite(r.temperature) and r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    need(r.gen_batch >= 1, f"rollout.gen_batch must be >= 1, got {r.gen_batch}")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    need(r.max_sampling_rounds >= 1, f"rollout.max_sampling_rounds must be >= 1, got {r.max_sampling_rounds}")
    need(t.overlong_buffer >= 0, f"task.overlong_buffer must be >= 0, got {t.overlong_buffer}")
    need(
        t.max_new_tokens == 0 or t.overlong_buffer <= t.max_new_tokens,
        f"task.overlong_buffer={t.overlong_buffer} exceeds task.max_new_tokens={t.max_new_tokens}",
    )
    need(
        math.isfinite(t.overlong_penalty) and t.overlong_penalty >= 0,
        f"task.overlong_penalty must be >= 0, got {t.overlong_penalty}",
    )
    need(t.name in TASKS, f"task.name must be one of {', '.join(TASKS)}, got {t.name!r}")
    need(t.name != "math" or bool(t.path), "task.name=math needs task.path (a math dataset file, e.g. DAPO-Math-17k)")
    need(t.convention in ("pm1", "01"), f"task.convention must be pm1 or 01, got {t.convention!r}")
    need(t.grader in ("math", "dapo"), f"task.grader must be math or dapo, got {t.grader!r}")
    need(t.max_new_tokens >= 0, f"task.max_new_tokens must be >= 0, got {t.max_new_tokens}")
    need(m.attn in ("sdpa", "eager"), f"model.attn must be sdpa or eager, got {m.attn!r}")
    need(
        (t.name == "arithmetic") == (m.source == "tiny"),
        f"task.name={t.name} cannot run with model.source={m.source}: the arithmetic task needs the tiny "
        "model (its own character vocabulary), gsm8k a pretrained one (bundled or a folder)",
    )
    if m.source == "tiny":
        need(m.hidden_size % m.heads == 0, f"model.hidden_size={m.hidden_size} is not divisible by model.heads={m.heads}")
        need(m.heads % m.kv_heads == 0, f"model.heads={m.heads} is not divisible by model.kv_heads={m.kv_heads}")
        need(min(m.layers, m.hidden_size, m.intermediate_size) >= 1, "model sizes must be >= 1")
    need(cfg.sft.steps >= 0, f"sft.steps must be >= 0, got {cfg.sft.steps}")
    need(cfg.sft.steps == 0 or (cfg.sft.lr > 0 and cfg.sft.batch_size >= 1), "sft.lr must be > 0 and sft.batch_size >= 1")
    need(cfg.sft.steps == 0 or t.name == "arithmetic", "sft warm-up is only defined for the arithmetic task")
    need(
        cfg.sft.target_accuracy is None or 0 < cfg.sft.target_accuracy <= 1,
        f"sft.target_accuracy must be in (0, 1] or none, got {cfg.sft.target_accuracy}",
    )
    need(cfg.sft.check_every >= 1 and cfg.sft.dev_size >= 1, "sft.check_every and sft.dev_size must be >= 1")
    need(cfg.log.eval_every >= 0 and cfg.log.jvp_every >= 0, "log.eval_every and log.jvp_every must be >= 0")
    need(t.eval_size >= 0, f"task.eval_size must be >= 0, got {t.eval_size}")
    need(
        t.eval_size > 0 or (cfg.log.eval_every == 0 and not cfg.log.pass_k),
        "task.eval_size=0 (no held-out problems) needs log.eval_every=0 and an empty log.pass_k",
    )
    need(all(k >= 1 for k in cfg.log.pass_k), f"log.pass_k must hold integers >= 1, got {cfg.log.pass_k}")
    need(cfg.checkpoint.every >= 1, f"checkpoint.every must be >= 1, got {cfg.checkpoint.every}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")


# ---------------------------------------------------------------------------------------------
# To and from plain dicts (config.yaml)
# ---------------------------------------------------------------------------------------------


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists, method parameters as a dict)."""
    d = dataclasses.asdict(cfg)
    d["method_params"] = dict(cfg.method_params)
    d["log"]["pass_k"] = list(cfg.log.pass_k)
    return d


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict` (validated)."""
    d = dict(d)
    secs = {}
    for s in SECTIONS:
        cls = type(getattr(TrainConfig(preset="x"), s))
        vals = dict(d.pop(s, {}) or {})
        if s == "log" and "pass_k" in vals:
            vals["pass_k"] = tuple(vals["pass_k"])
        secs[s] = cls(**vals)
    mp = tuple(sorted((d.pop("method_params", {}) or {}).items()))
    cfg = TrainConfig(**d, method_params=mp, **secs)
    validate_config(cfg)
    return cfg


def config_diff(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (``ignore``: top-level keys to skip)."""
    da, db = config_to_dict(a), config_to_dict(b)
    out = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]} ({x!r} vs {y!r})")

    for k in sorted(set(da) | set(db)):
        if k not in ignore:
            walk(da.get(k), db.get(k), f"{k}.")
    return out
