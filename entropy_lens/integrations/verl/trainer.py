"""Trainer hooks (driver process): H_old kept for the loss, token-level rollout dump."""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import sys
from typing import Any

from entropy_lens.integrations.verl.config import _cfg, _loss_mode
from entropy_lens.integrations.verl.dump import (
    _frame_from_dataproto,
    _frame_from_v1,
    _write_dump,
)
from entropy_lens.integrations.verl.loss import VerlPolicyLoss
from entropy_lens.integrations.verl.registry import _registered


def _keep_old_entropy(trainer: Any) -> bool:
    cfg = getattr(trainer, "config", None)
    actor = _cfg(_cfg(cfg, "actor_rollout_ref"), "actor")
    ours = isinstance(_registered(_loss_mode(actor) or ""), VerlPolicyLoss)
    return ours or bool(_cfg(_cfg(cfg, "trainer"), "rollout_data_dir"))


def patch_trainer_class(cls: type) -> type:
    """Add the entropy_lens hooks to a verl trainer class (idempotent).

    Legacy ``RayPPOTrainer`` (``_log_rollout_data(batch, reward_extra_infos_dict, timing_raw,
    rollout_data_dir)``): ``_compute_old_log_prob`` also returns verl's ``entropys`` as
    ``old_entropy`` (verl drops ``entropys`` from the batch), so H_old reaches the actor's loss and
    the dump. v1 ``PPOTrainer`` (``_log_rollout_data(batch, timing_raw, rollout_data_dir)``) keeps
    H_old itself. Both: ``_log_rollout_data`` also writes the token-level parquet.
    """
    if cls.__dict__.get("_entropy_lens_patched", False):
        return cls
    log_fn = getattr(cls, "_log_rollout_data", None)
    legacy = log_fn is not None and "reward_extra_infos_dict" in inspect.signature(log_fn).parameters
    old_fn = getattr(cls, "_compute_old_log_prob", None)
    if legacy and old_fn is not None:

        @functools.wraps(old_fn)
        def _compute_old_log_prob(self, batch, *args, **kwargs):
            result = old_fn(self, batch, *args, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            store = getattr(out, "batch", None)
            if store is not None and "entropys" in store.keys() and _keep_old_entropy(self):
                store["old_entropy"] = store["entropys"].clone()
            return result

        cls._compute_old_log_prob = _compute_old_log_prob
    if log_fn is not None:
        to_frame = _frame_from_dataproto if legacy else _frame_from_v1

        @functools.wraps(log_fn)
        def _log_rollout_data(self, batch, *args, **kwargs):
            result = log_fn(self, batch, *args, **kwargs)
            bound = inspect.signature(log_fn).bind(self, batch, *args, **kwargs)
            frame = to_frame(batch, getattr(self, "tokenizer", None), getattr(self, "global_steps", None))
            _write_dump(self, frame, bound.arguments["rollout_data_dir"])
            return result

        cls._log_rollout_data = _log_rollout_data
    cls._entropy_lens_patched = True
    return cls


#: Trainer classes patched when their module is imported: module -> class name.
TRAINER_TARGETS = {
    "verl.trainer.ppo.ray_trainer": "RayPPOTrainer",
    "verl.trainer.ppo.v1.trainer_base": "PPOTrainer",
}


class _PatchedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then patches the trainer class of the executed module."""

    def __init__(self, loader: Any, class_name: str) -> None:
        self._loader = loader
        self._class_name = class_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        cls = getattr(module, self._class_name, None)
        if isinstance(cls, type):
            patch_trainer_class(cls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Patches a trainer module when it is first imported (the driver imports it after us)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TRAINER_TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchedLoader(spec.loader, TRAINER_TARGETS[fullname])
                return spec
        return None


def install_trainer_hooks() -> None:
    """Patch the trainer classes now if imported, else as soon as they are imported."""
    for module_name, class_name in TRAINER_TARGETS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, class_name, None), type):
            patch_trainer_class(getattr(module, class_name))
    if not any(isinstance(f, _TrainerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportHook())
