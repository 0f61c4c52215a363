"""verl's sharded FSDP actor checkpoint, merged in memory into one full state dict.

By default verl saves ``global_step_N/actor/`` as one file per rank, ``model_world_size_{W}_rank_{R}.pt``
(with ``optim_…`` and ``extra_state_…`` files beside it), each a ``torch.save`` of that rank's
sharded ``model.state_dict()``; ``actor/huggingface/`` holds the config and tokenizer (full weights
only when ``checkpoint.save_contents`` includes ``hf_model``), and newer versions add
``actor/fsdp_config.json`` (``{"FSDP_version": 1|2, "world_size": W}``). Under FSDP1
(``SHARDED_STATE_DICT`` with a device mesh) and FSDP2 alike, every value is a DTensor: the rank's
local tensor plus its placement on the device mesh — ``Shard(d)`` (the full tensor is the
concatenation of the ranks' local tensors along ``d``, in mesh order) or ``Replicate()`` (every
rank holds all of it); hybrid sharding uses a 2-D ``(ddp, fsdp)`` mesh, ``(Replicate(), Shard(0))``.
These layout facts come from verl (github.com/volcengine/verl): ``verl/utils/checkpoint/
fsdp_checkpoint_manager.py`` writes the files and ``verl/model_merger/fsdp_model_merger.py`` merges them.

The merge here is general over the mesh: for each mesh dimension a ``Replicate`` placement takes
coordinate 0 and a ``Shard(d)`` placement concatenates the coordinates along ``d``. Dtypes are kept.
Anything else (``Partial``, strided shards of FSDP + tensor parallelism, ShardedTensor values) is
refused with verl's own merger command, which writes a Hugging Face folder.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

from entropy_lens.model.load import ModelLoadError, _first_line

SHARD_RE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
# wrapper prefixes that FSDP1 / activation checkpointing / torch.compile may leave in keys
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def merger_command(actor: Path) -> str:
    """verl's command that turns the sharded ``actor`` folder into a Hugging Face folder."""
    target = actor.parent / f"{actor.name}_hf"
    return (f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {target}, "
            f"then pass --model {target}")


def shard_files(actor: Path) -> list[Path]:
    """The ``model_world_size_W_rank_R.pt`` files in ``actor`` (sorted; empty when none)."""
    if not actor.is_dir():
        return []
    return sorted(p for p in actor.iterdir() if SHARD_RE.match(p.name))


def sharded_actor(folder: Path) -> Path | None:
    """The verl actor folder whose shards go with the config folder ``folder`` (``actor/huggingface``),
    or None when ``folder`` is not such a config folder."""
    parent = folder.parent
    if folder.name == "huggingface" and shard_files(parent):
        return parent
    return None


def world_size(actor: Path) -> int:
    """W: ``fsdp_config.json``'s ``world_size`` when present, else the one W in the file names."""
    cfg = actor / "fsdp_config.json"
    if cfg.is_file():
        try:
            w = json.loads(cfg.read_text()).get("world_size")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{cfg}: unreadable FSDP config ({_first_line(exc)})") from exc
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ModelLoadError(f"{cfg}: world_size must be a positive integer, got {w!r}")
        return w
    sizes = sorted({int(SHARD_RE.match(p.name).group(1)) for p in shard_files(actor)})
    if len(sizes) != 1:
        raise ModelLoadError(
            f"{actor}: model shards of several world sizes ({', '.join(map(str, sizes))}) and no fsdp_config.json "
            "to choose; keep one set"
        )
    return sizes[0]


def rank_files(actor: Path) -> list[Path]:
    """The W rank files in rank order; ModelLoadError naming the first missing one."""
    w = world_size(actor)
    files = [actor / f"model_world_size_{w}_rank_{r}.pt" for r in range(w)]
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: missing rank file (world size {w}; every rank 0..{w - 1} is needed)")
    return files


@contextmanager
def _quiet_device_mesh():
    """Silence torch's warning that a DeviceMesh is unpickled without process groups (expected here)."""
    log = logging.getLogger("torch.distributed.device_mesh")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _safe_classes() -> list:
    """torch's DTensor classes that ``weights_only`` loading does not allow yet (importing
    ``torch.distributed.tensor`` allows them in recent torch; the context that adds the others
    removes them again on exit, so only missing ones are passed)."""
    import torch

    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor.placement_types import Partial
    except ImportError:  # a torch without torch.distributed
        return []
    allowed = {g if not isinstance(g, tuple) else g[0] for g in torch.serialization.get_safe_globals()}
    return [c for c in (DTensor, DeviceMesh, Shard, Replicate, Partial) if c not in allowed]


def load_rank(path: Path, allow_pickle: bool) -> dict:
    """One rank's state dict ``{name: tensor or DTensor}``, memory-mapped on the CPU.

    ``torch.load(weights_only=True)`` first; full unpickling only with ``allow_pickle``.
    """
    import pickle

    import torch

    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: corrupt or truncated shard file (not a torch.save archive)")
    try:
        with _quiet_device_mesh(), torch.serialization.safe_globals(_safe_classes()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            what = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), "")
            raise ModelLoadError(
                f"{path.parent}: the shard files hold pickled objects beyond plain tensors"
                f"{f' ({what})' if what else ''}; loading them can run code — pass --allow-pickle to opt in"
            ) from exc
        try:
            with _quiet_device_mesh():
                state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc2:  # whatever the pickled objects raise while being rebuilt
            raise ModelLoadError(
                f"{path}: cannot read this shard file ({_first_line(exc2)}); "
                f"verl's merger converts the folder: {merger_command(path.parent)}"
            ) from exc2
    except Exception as exc:  # a damaged archive: RuntimeError / EOFError from the zip reader
        raise ModelLoadError(f"{path}: corrupt or truncated shard file ({_first_line(exc)})") from exc
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"{path}: not a model state dict (a {type(state).__name__})")
    return state


def _clean(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _merge_dtensor(key: str, values: list, files: list[Path]):
    """The full tensor of one DTensor from every rank's local part (general over the mesh)."""
    import torch
    from torch.distributed.tensor import Replicate, Shard

    first = values[0]
    mesh = first.device_mesh.mesh  # [mesh dims...] of global ranks
    placements = tuple(first.placements)
    for v, f in zip(values[1:], files[1:]):
        if tuple(v.placements) != placements or not torch.equal(v.device_mesh.mesh, mesh):
            raise ModelLoadError(f"{f}: tensor {key} is placed differently from rank 0's ({tuple(v.placements)!r} vs {placements!r})")
    for p in placements:
        if type(p) not in (Shard, Replicate):  # Partial, _StridedShard (FSDP + TP), custom placements
            actor = files[0].parent
            raise ModelLoadError(
                f"{files[0]}: tensor {key} has placement {p!r}, which is not merged here; "
                f"verl's merger converts the folder: {merger_command(actor)}"
            )
    n = len(values)

    def gather(dim: int, coord: tuple[int, ...]):
        if dim == mesh.ndim:
            rank = int(mesh[coord])
            if not 0 <= rank < n:
                raise ModelLoadError(f"{files[0]}: tensor {key} lives on rank {rank}, beyond the world size {n}")
            return values[rank].to_local()
        p = placements[dim]
        if isinstance(p, Replicate):
            return gather(dim + 1, coord + (0,))
        return torch.cat([gather(dim + 1, coord + (i,)) for i in range(mesh.shape[dim])], dim=p.dim)

    full = gather(0, ())
    if tuple(full.shape) != tuple(first.shape):
        raise ModelLoadError(
            f"{files[0]}: tensor {key} merges to shape {list(full.shape)} but its DTensor records "
            f"{list(first.shape)}; verl's merger converts the folder: {merger_command(files[0].parent)}"
        )
    return full.contiguous()


def merge_shards(actor: Path, expected: dict[str, tuple[int, ...]], allow_pickle: bool = False) -> dict:
    """The full state dict ``{name: tensor of the model's full shape}`` of the sharded actor folder.

    ``expected``: ``{name: shape}`` that the config builds; it decides how a plain (non-DTensor)
    tensor combines: kept from rank 0 when it already has the full shape (replicated), else
    concatenated along dim 0 across ranks (verl's merger does the same). Checks: every rank file
    present, the same names on every rank, one dtype per tensor (kept). The shapes against the
    config are the caller's check. ModelLoadError (one line) on any failure.
    """
    import torch
    from torch.distributed.tensor import DTensor

    files = rank_files(actor)
    states = [load_rank(f, allow_pickle) for f in files]
    names = list(states[0])
    ref = set(names)
    for f, s in zip(files[1:], states[1:]):
        if set(s) != ref:
            missing, extra = sorted(ref - set(s)), sorted(set(s) - ref)
            what = f"lacks {missing[0]}" if missing else f"has the extra tensor {extra[0]}"
            raise ModelLoadError(f"{f}: tensor names differ from rank 0's ({what})")
    merged: dict[str, torch.Tensor] = {}
    for key in names:
        values = [s[key] for s in states]
        if not all(isinstance(v, torch.Tensor) for v in values):
            bad = next(f for f, v in zip(files, values) if not isinstance(v, torch.Tensor))
            kind = type(next(v for v in values if not isinstance(v, torch.Tensor))).__name__
            raise ModelLoadError(
                f"{bad}: entry {key} is a {kind}, not a tensor; verl's merger converts the folder: {merger_command(actor)}"
            )
        dtypes = {v.dtype for v in values}
        if len(dtypes) > 1:
            raise ModelLoadError(f"{actor}: tensor {key} has different dtypes across ranks ({sorted(map(str, dtypes))})")
        name = _clean(key)
        if all(isinstance(v, DTensor) for v in values):
            merged[name] = _merge_dtensor(key, values, files)
        elif any(isinstance(v, DTensor) for v in values):
            raise ModelLoadError(f"{actor}: tensor {key} is a DTensor on some ranks and a plain tensor on others")
        else:
            full = expected.get(name)
            if full is not None and all(tuple(v.shape) == full for v in values):
                merged[name] = values[0].contiguous()
            else:
                merged[name] = torch.cat([v.reshape(v.shape or (1,)) for v in values], dim=0)
    return merged
