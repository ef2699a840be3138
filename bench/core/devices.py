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


_EARLIER_PEAK = [0]    # peaks of the windows closed inside the current GpuMeter (per-utility resets)


def reset_gpu_peak() -> None:
    """Open a new peak-memory window on this process's GPU (a utility's fine-tune and
    scoring): torch's peak statistics are reset, the closed window's peak is kept for
    the ``GpuMeter`` around it. A no-op without CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        _EARLIER_PEAK[0] = max(_EARLIER_PEAK[0], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_bytes() -> int | None:
    """Peak bytes allocated on this process's GPU since the last ``reset_gpu_peak``
    (None without CUDA)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


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
            _EARLIER_PEAK[0] = 0
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        import time
        if self.on_gpu:
            torch.cuda.synchronize()
            self.peak_bytes = max(_EARLIER_PEAK[0], int(torch.cuda.max_memory_allocated()))
        self.wall_s = time.perf_counter() - self._t0
        return False

    def fields(self, workers_peak: int | None = None) -> dict:
        """The ``Cost`` fields it measures: gpus, gpu_hours (wall × GPUs / 3600: time held,
        so workers sharing the GPU are not counted twice), peak_gpu_mem_bytes (this
        process's, or the largest of the utilities its pool workers computed,
        ``workers_peak``)."""
        peaks = [p for p in (self.peak_bytes, workers_peak) if p is not None]
        return {"gpus": self.gpus, "gpu_hours": self.wall_s * self.gpus / 3600,
                "peak_gpu_mem_bytes": max(peaks) if peaks else None}


# ------------------------------------------------------------------ precision

PRECISIONS = ("fp32", "bf16", "auto")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_native(device_kind: str) -> bool:
    """Whether ``device_kind`` computes bf16 matrix products in hardware: a CUDA GPU
    that supports bf16 (Ampere or later), or a CPU with AMX or AVX512-BF16 (read from
    /proc/cpuinfo; False where it cannot be read)."""
    if device_kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_kind == "cpu":
        return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_precision(precision: str, device_kind: str, field: str = "train.precision") -> str:
    """``fp32`` or ``bf16``: what ``train.precision`` means on ``device_kind``. ``auto``
    is bf16 where the device computes it natively (``bf16_native``), fp32 elsewhere;
    ``bf16`` on a GPU without bf16 is refused in one line."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{field}: unknown {precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_native(device_kind) else "fp32"
    if precision == "bf16" and device_kind == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{field}: bf16 but this GPU ({torch.cuda.get_device_name()}) has no bf16; "
                          f"use {field}=fp32 (or auto)")
    return precision


# ------------------------------------------------------------------ determinism

def set_cuda_determinism(on: bool) -> None:
    """Deterministic CUDA kernels for this process (``game.deterministic``): cuBLAS's
    fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts, so set before
    any CUDA work) and ``torch.use_deterministic_algorithms`` with warnings for ops
    that have no deterministic kernel. On the CPU torch's kernels are deterministic
    already and nothing changes. Off: torch's defaults (faster, not bit-identical run
    to run)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
