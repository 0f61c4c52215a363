"""Broken model folders (model/load.py): every one is a one-line ModelLoadError naming the folder or
file and the problem, never a SafetensorError / RuntimeError traceback; and the bundled model's
cache files get ordinary permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import make_model
from safetensors.torch import load_file, save_file

from entropy_lens.model import load as ld
from entropy_lens.model.load import ModelLoadError, load_model


def broken_copy(tiny_model_dir: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder)
    return folder


def assert_refused(folder: Path, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _truncate_half(st: Path) -> None:
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])


def _garbage_header(st: Path) -> None:
    st.write_bytes((40).to_bytes(8, "little") + b"{not json at all, but forty bytes long!}" + b"\0" * 64)


def _header_length_past_end(st: Path) -> None:
    st.write_bytes((10**9).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda st: st.write_bytes(b""), "empty weight file (0 bytes)"),
        (_truncate_half, "corrupt or truncated safetensors file"),
        (lambda st: st.write_bytes(st.read_bytes()[:5]), "corrupt or truncated safetensors file"),
        (_garbage_header, "corrupt or truncated safetensors file"),
        (_header_length_past_end, "corrupt or truncated safetensors file"),
    ],
    ids=["empty", "truncated", "five-bytes", "garbage-header", "header-past-end"],
)
def test_damaged_safetensors_name_the_file(tiny_model_dir, tmp_path, damage, needle):
    folder = broken_copy(tiny_model_dir, tmp_path, "m")
    damage(folder / "model.safetensors")
    msg = assert_refused(folder, needle)
    assert msg.startswith(f"{folder / 'model.safetensors'}:")


@pytest.mark.parametrize(
    "key,value,tensor",
    [("intermediate_size", 96, "mlp"), ("vocab_size", 64, "embed_tokens"), ("hidden_size", 64, "")],
)
def test_weights_that_do_not_match_the_config_name_the_tensor(tiny_model_dir, tmp_path, key, value, tensor):
    folder = broken_copy(tiny_model_dir, tmp_path, "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = assert_refused(folder, "model.safetensors: tensor", "has shape", "config.json implies",
                         "weights do not match the config")
    assert tensor in msg


def test_missing_tensors_are_not_left_random(tiny_model_dir, tmp_path):
    folder = broken_copy(tiny_model_dir, tmp_path, "m")
    st = folder / "model.safetensors"
    w = {k: v for k, v in load_file(st).items() if "layers.1." not in k}
    save_file(w, st, metadata={"format": "pt"})
    assert_refused(folder, str(folder), "lack 9 tensor(s)", "model.layers.1.")


def test_invalid_config_and_tokenizer(tiny_model_dir, tmp_path):
    folder = broken_copy(tiny_model_dir, tmp_path, "cfg")
    (folder / "config.json").write_text("{not json")
    assert_refused(folder, f"{folder / 'config.json'}: invalid model config")
    folder = broken_copy(tiny_model_dir, tmp_path, "heads")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # does not divide hidden_size 32
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_refused(folder, "invalid model config", "not a multiple")  # the reason, not just its heading
    folder = broken_copy(tiny_model_dir, tmp_path, "tok")
    (folder / "tokenizer.json").write_text("{garbage")
    assert_refused(folder, f"{folder}: cannot load tokenizer")


def test_intact_folder_still_loads(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    assert not model.training and len(tok) <= model.get_output_embeddings().weight.shape[0]


def test_plain_permissions_follow_the_umask(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("model.safetensors", "config.json", "sub/x"):
        (tmp_path / name).write_bytes(b"x")
    os.chmod(tmp_path / "model.safetensors", 0o600)  # what save_pretrained leaves
    old = os.umask(0o022)
    try:
        ld.plain_permissions(tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "sub/x"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_bundled_cache_files_get_ordinary_permissions(tmp_path, monkeypatch, tiny_model_dir):
    """The GGUF conversion writes its folder with plain permissions (not mkstemp-like 0600), and
    an older cache with a 0600 model.safetensors is fixed on its next use."""
    import transformers

    monkeypatch.setenv("ENTROPY_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ld, "bundled_gguf_path", lambda: tiny_model_dir / "fake.gguf")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _tokenizer(tiny_model_dir))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: make_model())
    old = os.umask(0o022)
    try:
        target = ld.bundled_model_dir()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
        os.chmod(target / "model.safetensors", 0o600)
        assert ld.bundled_model_dir() == target
        assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def _tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)
