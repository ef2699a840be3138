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


def _visible_list() -> list[str]:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [v.strip() for v in vis.split(",") if v.strip() and v.strip() != "-1"]
    return [str(i) for i in range(visible_nvidia_gpus())]


def pin_one_gpu(device: str) -> tuple[str, str | None]:
    """One GPU per process, chosen before CUDA is initialised: ``game.device=cuda:N``
    means the N-th visible GPU, and the process then sees only it
    (``CUDA_VISIBLE_DEVICES``), so transformers counts one GPU (TRL refuses
    ``nn.DataParallel``, which ``n_gpu > 1`` turns on) and every ``cuda`` tensor lands on it.
    ``cuda`` or ``auto`` on a node with several GPUs takes the first; the others are for
    other processes (other seeds' shards or sweep jobs, one per GPU). Returns the device
    to use in this process (``cuda`` once pinned) and a line to print (or None)."""
    device = str(device)
    if device == "cpu" or (device == "auto" and torch.version.cuda is None):
        return device, None
    visible = _visible_list()
    if not visible:
        return device, None          # check_device says what is wrong
    idx = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    if idx >= len(visible):
        raise ConfigError(f"game.device: {device!r} but {len(visible)} GPU(s) are visible (cuda:0 .. "
                          f"cuda:{len(visible) - 1}); pick one of those, or run one process per GPU")
    if len(visible) == 1 and idx == 0:
        return ("cuda" if device.startswith("cuda") else device), None
    if torch.cuda.is_initialized():
        raise ConfigError(f"game.device: {device!r} on {len(visible)} GPUs, but CUDA was initialised before the "
                          f"process could pin one; set CUDA_VISIBLE_DEVICES=<one GPU> before starting dvbench")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[idx]
    note = (f"[dvbench] {len(visible)} GPUs visible: this process uses GPU {visible[idx]} only "
            f"(CUDA_VISIBLE_DEVICES={visible[idx]}); run one process per GPU (game.device=cuda:N) for the others")
    return ("cuda" if device.startswith("cuda") else device), note


class GpuMeter:
    """Wall time and peak GPU memory of a block on this process's GPU (no-op fields on
    the CPU): synchronises and resets torch's peak statistics at the start, reads
    ``max_memory_allocated`` at the end. ``gpus``: GPUs this process holds (0 or 1)."""

    def __init__(self, device_kind: str):
        self.on_gpu = device_kind == "cuda" and torch.cuda.is_available()
        self.gpus = 1 if self.on_gpu else 0
        self.wall_s, self.peak_bytes = 0.0, None

    def __enter__(self) -> "GpuMeter":
        import time
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        import time
        if self.on_gpu:
            torch.cuda.synchronize()
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        self.wall_s = time.perf_counter() - self._t0
        return False

    def fields(self) -> dict:
        """The ``Cost`` fields it measures: gpus, gpu_hours (wall × GPUs / 3600), peak_gpu_mem_bytes."""
        return {"gpus": self.gpus, "gpu_hours": self.wall_s * self.gpus / 3600, "peak_gpu_mem_bytes": self.peak_bytes}
