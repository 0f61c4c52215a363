"""Where the work runs: the device and dtype rules every command (``--device``/``--dtype``) and the
trainer (``device``/``dtype`` keys) share.

``auto`` is a GPU when torch sees one (``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0``) and
bfloat16 there, else the CPU and float32. Errors are ``ValueError`` with one line naming the
option and the problem (no GPU visible, an index beyond the visible GPUs, an unknown value).
"""

from __future__ import annotations

import re

from entropy_lens.dist import env_ranks

#: Device values: ``auto``, ``cpu``, ``cuda`` (under torchrun: ``cuda:LOCAL_RANK``), ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
#: Dtype values; ``auto``: bfloat16 on a GPU, float32 on the CPU.
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


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


def resolve_placement(device: str, dtype: str, cpu_only: str | None = None) -> tuple[str, str]:
    """``(device, dtype)`` resolved and checked (dtype first: it needs no GPU to be refused).
    ``cpu_only``: the name of a command whose work does not run on a GPU yet; ``auto`` is then the
    CPU and ``cuda``/``cuda:N`` are refused with one line naming it."""
    _check_choice("--dtype", dtype, DTYPES)
    check_device(device)
    if cpu_only is not None and device.startswith("cuda"):
        raise ValueError(f"--device {device}: {cpu_only} runs on the CPU only so far; use --device cpu or auto")
    where = "cpu" if cpu_only is not None else resolve_device(device)
    return where, resolve_dtype(dtype, where)
