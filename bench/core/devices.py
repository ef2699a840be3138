"""Whether the device a config names can be used here: one line before any work.

``game.device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. What fails later with a
traceback ("Torch not compiled with CUDA enabled", an invalid device ordinal) or runs
silently somewhere else (a CPU build of torch on a machine with GPUs picks the CPU
under ``auto``) is refused here with the field and the fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import torch

from bench.core.errors import ConfigError


def visible_nvidia_gpus() -> int:
    """GPUs that ``nvidia-smi -L`` lists (0 without the tool or on any failure)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def check_device(device: str, field: str = "game.device") -> None:
    """Raise ``ConfigError`` (one line) when ``device`` cannot be used by this torch."""
    device = str(device)
    cpu_build = torch.version.cuda is None
    if device == "auto":
        n = visible_nvidia_gpus() if cpu_build else 0
        if n:
            raise ConfigError(f"{field}: auto would run on the CPU although nvidia-smi lists {n} GPU(s): this torch "
                              f"({torch.__version__}) is a CPU build; install a CUDA build of torch, or set "
                              f"{field}=cpu to use the CPU on purpose")
        return
    if not device.startswith("cuda"):
        return
    if cpu_build:
        raise ConfigError(f"{field}: {device!r} but this torch ({torch.__version__}) is a CPU build without CUDA; "
                          f"use {field}=cpu (or auto), or install a CUDA build of torch")
    if not torch.cuda.is_available():
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"{field}: {device!r} but no GPU is visible to torch"
                          + (f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else "")
                          + f"; use {field}=cpu, or check the driver with nvidia-smi")
    n = torch.cuda.device_count()
    idx = int(device.split(":", 1)[1]) if ":" in device else 0
    if idx >= n:
        raise ConfigError(f"{field}: {device!r} but {n} GPU(s) are visible (cuda:0 .. cuda:{n - 1}); pick one of "
                          f"those, or run one process per GPU")
