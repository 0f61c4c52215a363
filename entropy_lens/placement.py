"""Where the work runs: the device and dtype rules every command (``--device``/``--dtype``) and the
trainer (``device``/``dtype`` keys) share, and the device map (``--device-map``) that spreads one
model over several devices for the forward-only commands.

``auto`` is a GPU when torch sees one (``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0``) and
bfloat16 there, else the CPU and float32. Errors are ``ValueError`` with one line naming the
option and the problem (no GPU visible, an index beyond the visible GPUs, an unknown value, a
device map where the command updates or differentiates the weights).
"""

from __future__ import annotations

import re

from entropy_lens.dist import env_ranks

#: Device values: ``auto``, ``cpu``, ``cuda`` (under torchrun: ``cuda:LOCAL_RANK``), ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
#: Dtype values; ``auto``: bfloat16 on a GPU, float32 on the CPU.
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
#: Device-map values: ``none`` (the whole model on ``--device``), ``auto`` (transformers'
#: ``device_map="auto"``: the layers balanced over the visible GPUs, then CPU memory) and
#: ``sequential`` (the GPUs filled in order, then CPU memory).
DEVICE_MAPS = ("none", "auto", "sequential")
#: The commands that only run the model forward, the only ones a device map may split it for.
FORWARD_ONLY = ("analyze", "sample", "eval")
#: Why each other command that loads a model refuses a device map, and what to use instead.
_NOT_FORWARD_ONLY = {
    "validate": "validate updates the weights: use --device",
    "train": "train updates the weights: use --device",
    "compare": "compare --measure updates the weights: use --device",
    "attribute": "attribute differentiates through the model, which stays whole on the CPU",
}


def _check_choice(option: str, value: str, choices) -> None:
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
        raise ValueError(f"{option} must be {listed}, got {value!r}")


def check_device(device: str) -> None:
    """``device`` is one of :data:`DEVICES` (``cuda:N`` with an integer N)."""
    if not _DEVICE.match(device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """A dtype name from ``dtype``: ``auto`` is ``bfloat16`` on a GPU (``device`` ``cuda...``),
    ``float32`` on the CPU."""
    _check_choice("--dtype", dtype, DTYPES)
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def resolve_device(device: str) -> str:
    """The device this process uses, ``cpu`` or ``cuda:I``. ``auto`` is a GPU when torch sees one,
    else the CPU; ``cuda`` is ``cuda:LOCAL_RANK`` (0 without torchrun); under torchrun every rank
    takes its own GPU, so ``cuda:N`` is refused there. One line when no GPU is visible or the index
    is out of range. The chosen GPU becomes torch's current device."""
    check_device(device)
    if device == "cpu":
        return "cpu"
    import torch

    visible = torch.cuda.is_available()
    if device == "auto":
        if not visible:
            return "cpu"
        device = "cuda"
    if not visible:
        raise ValueError(f"--device {device}: no GPU is visible (torch.cuda.is_available() is false); "
                         "use --device cpu or auto")
    _, world, local = env_ranks()
    if device != "cuda" and world > 1:
        raise ValueError(f"--device {device}: under torchrun every rank uses cuda:LOCAL_RANK; pass --device cuda or auto")
    index = local if device == "cuda" else int(device.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        what = f"LOCAL_RANK {local}" if device == "cuda" else device
        raise ValueError(f"--device {device}: {what} but only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def resolve_placement(device: str, dtype: str) -> tuple[str, str]:
    """``(device, dtype)`` resolved and checked (dtype first: it needs no GPU to be refused)."""
    _check_choice("--dtype", dtype, DTYPES)
    check_device(device)
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def resolve_device_map(device_map: str, device: str, command: str) -> str | None:
    """The ``device_map`` to load the model with (None for ``none``), checked before any work.

    A map is refused, one line naming the option and why, where ``command`` is not forward-only
    (:data:`FORWARD_ONLY`: the commands that update or differentiate the weights need the whole
    model on one device), with ``--device cpu`` or ``cuda:N`` (the map places the model itself:
    over every visible GPU, then CPU memory; without a GPU, on the CPU) and under torchrun with
    more than one process (each rank would spread its model over all the GPUs)."""
    if command not in FORWARD_ONLY:
        if device_map == "none":
            return None
        why = _NOT_FORWARD_ONLY.get(command, f"{command} is not one of them: use --device")
        raise ValueError(f"--device-map {device_map} splits the model across devices for the "
                         f"forward-only commands ({', '.join(FORWARD_ONLY)}); {why}")
    _check_choice("--device-map", device_map, DEVICE_MAPS)
    if device_map == "none":
        return None
    check_device(device)
    if device not in ("auto", "cuda"):
        hint = ("use --device-map none for the CPU" if device == "cpu" else
                "choose the GPUs with CUDA_VISIBLE_DEVICES, or use --device-map none")
        raise ValueError(f"--device-map {device_map} with --device {device}: the map places the model over every "
                         f"visible GPU itself (leave --device at auto); {hint}")
    _, world, _ = env_ranks()
    if world > 1:
        raise ValueError(f"--device-map {device_map} under torchrun (WORLD_SIZE={world}): every rank would spread "
                         "its model over all the visible GPUs; run one process, or use --device with torchrun")
    return device_map
