"""verl's sharded FSDP actor checkpoints (model/verl_shards.py through model/load.py).

Real sharded checkpoints are written once per module by 2 processes on the CPU (gloo), in verl's
layout (verl/utils/checkpoint/fsdp_checkpoint_manager.py: ``actor/model_world_size_2_rank_R.pt``,
each a ``torch.save`` of that rank's ``model.state_dict()``, config and tokenizer in
``actor/huggingface/``, ``actor/fsdp_config.json`` in newer versions). Layouts:

- ``fsdp2``: FSDP2 ``fully_shard`` of a tiny Llama (per layer and the root) on a 1-D mesh, fp32,
  vocabulary 47 so that the embedding's shards are uneven (24 + 23 rows); no fsdp_config.json
  (older verl: the world size comes from the file names);
- ``hsdp``: ``fully_shard`` on a 2-D ``(ddp, fsdp)`` mesh of shape (1, 2): ``(Replicate, Shard(0))``;
- ``dtensor``: ``distribute_tensor`` by hand, bf16, a mix of ``Shard(0)``, ``Shard(1)`` and
  ``Replicate`` on a 1-D mesh, with fsdp_config.json;
- ``ddp2``: ``distribute_tensor`` on a (2, 1) ``(ddp, fsdp)`` mesh: the replicas live on ranks 0 and 1;
- ``partial``: one ``Partial`` tensor (not mergeable here: the message names verl's merger).

Each is loaded in this single process and compared with the original full model exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # torch.load of DTensors needs it imported
from conftest import make_model, make_tokenizer
from typer.testing import CliRunner

from entropy_lens.model import verl_shards
from entropy_lens.model.load import ModelLoadError, load_model

VOCAB = 47  # odd: uneven Shard(0) chunks of the embedding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_rank(state: dict, actor: Path, rank: int, world: int, fsdp_config: dict | None) -> None:
    actor.mkdir(parents=True, exist_ok=True)
    torch.save(state, actor / f"model_world_size_{world}_rank_{rank}.pt")
    torch.save({"lr_scheduler": None}, actor / f"extra_state_world_size_{world}_rank_{rank}.pt")  # beside it, ignored
    if rank == 0 and fsdp_config is not None:
        (actor / "fsdp_config.json").write_text(json.dumps(fsdp_config, indent=4))


def _worker(rank: int, root: str, port: int) -> None:
    """One rank: writes every layout under ``root/<layout>/global_step_1/actor``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        base = Path(root)
        actor = lambda name: base / name / "global_step_1" / "actor"
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))

        for name, shape in (("fsdp2", None), ("hsdp", (1, 2))):
            model = make_model(vocab=VOCAB, seed=1)
            m = mesh if shape is None else init_device_mesh("cpu", shape, mesh_dim_names=("ddp", "fsdp"))
            for layer in model.model.layers:
                fully_shard(layer, mesh=m)
            fully_shard(model, mesh=m)
            _save_rank(model.state_dict(), actor(name), rank, 2, None if name == "fsdp2" else {"FSDP_version": 2, "world_size": 2})

        full = {k: v.to(torch.bfloat16) for k, v in make_model(vocab=VOCAB, seed=2).state_dict().items()}
        state = {}
        for i, (k, v) in enumerate(full.items()):
            placement = Replicate() if v.ndim == 1 else (Shard(1) if i % 3 == 1 else Shard(0))
            state[k] = distribute_tensor(v, mesh, [placement])
        _save_rank(state, actor("dtensor"), rank, 2, {"FSDP_version": 1, "world_size": 2})

        mesh2 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("ddp", "fsdp"))
        full = make_model(vocab=VOCAB, seed=3).state_dict()
        _save_rank({k: distribute_tensor(v, mesh2, [Replicate(), Shard(0)]) for k, v in full.items()},
                   actor("ddp2"), rank, 2, {"FSDP_version": 2, "world_size": 2})

        state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        key = next(iter(state))
        state[key] = DTensor.from_local(full[key] / 2, mesh, [Partial()], run_check=False)
        _save_rank(state, actor("partial"), rank, 2, {"FSDP_version": 2, "world_size": 2})
    finally:
        dist.destroy_process_group()


SEEDS = {"fsdp2": 1, "hsdp": 1, "dtensor": 2, "ddp2": 3, "partial": 3}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """``{layout: global_step_1 folder}``, written by 2 gloo processes."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("verl_ckpt")
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import this module
    mp.spawn(_worker, args=(str(root), _free_port()), nprocs=2, join=True)
    out = {}
    for name, seed in SEEDS.items():
        hf = root / name / "global_step_1" / "actor" / "huggingface"
        hf.mkdir()
        make_model(vocab=VOCAB, seed=seed).config.save_pretrained(hf)
        make_tokenizer().save_pretrained(hf)
        out[name] = hf.parent.parent
    return out


def _copy(layouts, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name / "global_step_1"
    shutil.copytree(layouts[name], dst)
    return dst


def _refused(path: Path, *needles: str, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("name,dtype", [("fsdp2", "float32"), ("hsdp", "float32"), ("dtensor", "bfloat16"),
                                        ("ddp2", "float32")])
def test_sharded_actor_equals_the_full_model(layouts, name, dtype):
    ref = make_model(vocab=VOCAB, seed=SEEDS[name]).to(getattr(torch, dtype))
    model, _ = load_model(layouts[name], dtype=dtype, attn_implementation="eager")  # weights_only: no opt-in
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    ids = torch.tensor([[2, 4, 5, 9, 11, 46]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_sharded_actor_loads_with_a_device_map(layouts, monkeypatch):
    """--device-map auto on merged shards: the same weights (without a GPU: all on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_model(layouts["fsdp2"], attn_implementation="eager", device_map="auto")
    want = make_model(vocab=VOCAB, seed=SEEDS["fsdp2"]).state_dict()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_keeps_the_dtype_and_every_name(layouts):
    actor = layouts["dtensor"] / "actor"
    merged = verl_shards.merge_shards(actor, {})
    want = make_model(vocab=VOCAB, seed=2).state_dict()
    assert set(merged) == set(want)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, want[k].to(torch.bfloat16)) for k, v in merged.items())


def test_actor_folder_itself_also_loads(layouts):
    model, _ = load_model(layouts["fsdp2"] / "actor")
    assert model.get_output_embeddings().weight.shape == (VOCAB, 32)


def test_missing_rank_file_is_named(layouts, tmp_path):
    step = _copy(layouts, "dtensor", tmp_path)
    missing = step / "actor" / "model_world_size_2_rank_1.pt"
    missing.unlink()
    msg = _refused(step, f"{missing}: missing rank file", "world size 2")
    assert msg.startswith(str(missing))


def test_world_size_from_fsdp_config_is_checked(layouts, tmp_path):
    step = _copy(layouts, "hsdp", tmp_path)
    (step / "actor" / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    _refused(step, "model_world_size_4_rank_0.pt: missing rank file")


def test_pickled_objects_need_allow_pickle(layouts, tmp_path):
    step = _copy(layouts, "fsdp2", tmp_path)
    actor = step / "actor"
    for r in (0, 1):
        f = actor / f"model_world_size_2_rank_{r}.pt"
        state = torch.load(f, weights_only=True)
        state["config_path"] = Path("somewhere")  # an object outside torch's weights-only allow-list
        torch.save(state, f)
    _refused(step, f"{actor}: the shard files hold pickled objects", "pass --allow-pickle")
    # opted in: unpickled, then refused as an entry that is not a tensor, with verl's merger command
    _refused(step, "entry config_path is a", "python -m verl.model_merger merge --backend fsdp",
             f"--local_dir {actor}", allow_pickle=True)


def test_shape_mismatch_names_the_tensor_and_the_config(layouts, tmp_path):
    step = _copy(layouts, "fsdp2", tmp_path)
    cfg_path = step / "actor" / "huggingface" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 96
    cfg_path.write_text(json.dumps(cfg))
    _refused(step, "model_world_size_2_rank_*.pt: tensor", "mlp", "has shape [64, 32]",
             f"{cfg_path} implies [96, 32]", "weights do not match the config")


def test_ranks_with_different_names_or_damaged_files(layouts, tmp_path):
    step = _copy(layouts, "fsdp2", tmp_path)
    r1 = step / "actor" / "model_world_size_2_rank_1.pt"
    state = torch.load(r1, weights_only=True)
    state.pop("model.norm.weight")
    torch.save(state, r1)
    _refused(step, f"{r1}: tensor names differ from rank 0's (lacks model.norm.weight)")
    r1.write_bytes(r1.read_bytes()[:1000])
    _refused(step, f"{r1}: corrupt or truncated shard file")


def test_unmergeable_placement_names_verls_merger(layouts):
    actor = layouts["partial"] / "actor"
    msg = _refused(layouts["partial"], "placement Partial",
                   f"python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir")
    assert msg.startswith(str(actor / "model_world_size_2_rank_0.pt"))


def test_cli_samples_from_a_sharded_actor_and_refuses_a_missing_rank(layouts, tmp_path):
    from entropy_lens_cli.app import app

    runner = CliRunner()
    out = tmp_path / "r.jsonl"
    args = ["sample", "--prompts", "1", "-n", "1", "--max-new-tokens", "2"]
    res = runner.invoke(app, [*args, "--model", str(layouts["fsdp2"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    step = _copy(layouts, "fsdp2", tmp_path)
    (step / "actor" / "model_world_size_2_rank_0.pt").unlink()
    bad = tmp_path / "bad.jsonl"
    res = runner.invoke(app, [*args, "--model", str(step), "-o", str(bad)])
    err = res.stderr.strip()
    assert res.exit_code == 2 and len(err.splitlines()) == 1 and "rank_0.pt: missing rank file" in err, res.output
    assert not bad.exists()
