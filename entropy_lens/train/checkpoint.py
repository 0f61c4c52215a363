"""Checkpoints of the reference trainer: Hugging Face model folders plus optimizer and RNG state.

``<run>/checkpoints/step_NNNNNN/`` holds

- ``config.json``, ``model.safetensors`` (+ generation config), tokenizer files — a plain Hugging
  Face folder that ``entropy-lens analyze --model`` and ``from_pretrained`` read;
- ``optimizer.pt``: the optimizer's ``state_dict`` (tensors and numbers only), read back with
  ``torch.load(..., weights_only=True)`` — never unpickled with code;
- ``rng.safetensors``: torch's global RNG state and every named ``torch.Generator`` state
  (sampling, prompts, the method generator); ``rng.json``: numpy's and Python's ``random`` states;
- ``trainer_state.json``: step and bookkeeping, written last.

A checkpoint is written into a temporary folder and renamed into place, so a kill -9 leaves either
the complete folder or none.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from entropy_lens.io.writers import atomic_folder, atomic_write_json

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{6,})$")


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """No transformers progress bars while saving (the library never prints)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON-able dict) of every RNG state: torch's global RNG, the named
    generators, numpy's global RNG and Python's ``random``."""
    tensors = {"torch_global": torch.get_rng_state()}
    for name, g in generators.items():
        tensors[f"gen.{name}"] = g.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_rng` (generators are updated in place)."""
    torch.set_rng_state(tensors["torch_global"])
    for name, g in generators.items():
        key = f"gen.{name}"
        if key not in tensors:
            raise ValueError(f"checkpoint has no state for generator {name!r}")
        g.set_state(tensors[key])
    npm = meta["numpy"]
    np.random.set_state((npm["kind"], np.asarray(npm["keys"], dtype=np.uint32), npm["pos"], npm["has_gauss"],
                         npm["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step_NNNNNN`` atomically and prune older ones beyond ``keep_last``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    with atomic_folder(final) as tmp:
        with _quiet_hf():
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        tensors, meta = capture_rng(generators)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "rng.json", meta)
        atomic_write_json(tmp / "trainer_state.json", {"step": int(step), **state})
    prune_checkpoints(run_dir, keep_last)
    return final


#: Folder of the frozen reference policy (the model at step 0) for methods that need ``ref_logp``.
REFERENCE_DIR = "reference"


def save_reference(run_dir: str | Path, model, tokenizer) -> Path:
    """Write the reference policy (weights and tokenizer) to ``<run>/reference`` atomically."""
    final = Path(run_dir) / REFERENCE_DIR
    with atomic_folder(final) as tmp:
        with _quiet_hf():
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return final


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)``, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    ck = list_checkpoints(run_dir)
    return ck[-1] if ck else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and leftover temporary folders."""
    ck = list_checkpoints(run_dir)
    for _, p in ck[: max(len(ck) - keep_last, 0)]:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / CKPT_DIR
    for p in root.glob(".step_*"):
        shutil.rmtree(p, ignore_errors=True)


def load_training_state(
    path: str | Path, optimizer: torch.optim.Optimizer | None, generators: dict[str, torch.Generator]
) -> dict[str, Any]:
    """Restore optimizer and RNG state from checkpoint ``path``; returns ``trainer_state.json``.
    (The model is loaded from the same folder with ``from_pretrained``.)"""
    path = Path(path)
    if optimizer is not None:
        opt_file = path / "optimizer.pt"
        if not opt_file.is_file():
            raise ValueError(f"{path}: checkpoint has no optimizer.pt")
        optimizer.load_state_dict(torch.load(opt_file, weights_only=True, map_location="cpu"))
    restore_rng(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()), generators)
    return json.loads((path / "trainer_state.json").read_text())
