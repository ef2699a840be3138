"""Which machine this is: the hardware fingerprint every record carries, its short slug,
and the device view (CUDA / MPS / CPU, GPU memory, driver) that picks a preset.

``hardware_fingerprint()`` is the one fingerprint: the record's fields and a stable
``id``; ``hardware_fingerprint(devices=True)`` adds what ``python -m bench hardware
fingerprint`` prints. Nothing here raises on a machine without torch or with a broken
driver: it reports a CPU.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any


# --------------------------------------------------------------------------- devices

def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:     # no torch, or a broken driver: a machine without a usable GPU
        return False


def _mps_available() -> bool:
    try:
        import torch
        mps = getattr(torch.backends, "mps", None)     # Apple silicon
        return bool(mps is not None and mps.is_available())
    except Exception:
        return False


def cuda_devices() -> list[dict]:
    """``[{"index", "name", "memory_bytes", "capability"}]`` of the visible CUDA devices."""
    if not _cuda_available():
        return []
    try:
        import torch
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                        "capability": f"{p.major}.{p.minor}"})
        return out
    except Exception:
        return []


def detect_device() -> str:
    """``"cuda"`` (also ROCm builds), ``"mps"`` or ``"cpu"``; never raises."""
    if cuda_devices():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def mps_memory_bytes() -> int | None:
    """What Metal recommends as the working-set limit (unified memory), if torch says."""
    try:
        import torch
        fn = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        return int(fn()) if fn is not None else None
    except Exception:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver (``nvidia-smi``, else NVML if installed), or None."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            p = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
            if p.returncode == 0 and lines:
                return lines[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def _cudnn_version() -> int | None:
    try:
        import torch
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        return None


# --------------------------------------------------------------------------- fingerprint

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and val.strip():
                return val.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_brand(cpu: str) -> str:
    """The marketing name where ``cpu`` is only an architecture (macOS reports "arm")."""
    if platform.system() == "Darwin":
        try:
            p = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                               text=True, timeout=5)
            if p.returncode == 0 and p.stdout.strip():
                return p.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return cpu


@functools.lru_cache(maxsize=None)
def _hardware() -> dict:
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "n_cpus": os.cpu_count(),
        "ram_bytes": _total_ram(),
        "torch": None, "cuda": False, "cuda_version": None, "hip_version": None, "gpus": [],
        "mps": False,
    }
    hw["cpu_name"] = _cpu_brand(hw["cpu"])
    try:
        import torch

        hw["torch"] = torch.__version__
        hw["cuda_version"] = torch.version.cuda
        hw["hip_version"] = getattr(torch.version, "hip", None)
    except Exception:  # no torch: still fingerprint the CPU side
        pass
    hw["mps"] = _mps_available()
    hw["cuda"] = _cuda_available()
    hw["gpus"] = [d["name"] for d in cuda_devices()]
    ram_gib = round((hw["ram_bytes"] or 0) / 2**30)
    key = json.dumps([hw["cpu"], hw["n_cpus"], ram_gib, hw["gpus"]])
    hw["id"] = hashlib.sha256(key.encode()).hexdigest()[:12]
    return hw


def hardware_fingerprint(devices: bool = False) -> dict:
    """Machine description plus a short stable ``id`` (cpu, n_cpus, RAM GiB, GPUs): what
    every record carries.

    ``devices=True`` adds the device view: ``device`` (``detect_device()``), ``devices``
    (CUDA name / memory / capability), ``mps_memory_bytes``, ``driver``, ``cudnn`` and
    ``slug``. The extra fields change neither ``id`` nor the slug.
    """
    fp = copy.deepcopy(_hardware())
    if devices:
        fp["device"] = device = detect_device()
        fp["devices"] = cuda_devices() if device == "cuda" else []
        fp["mps_memory_bytes"] = mps_memory_bytes() if device == "mps" else None
        fp["driver"] = driver_version() if device == "cuda" else None
        fp["cudnn"] = _cudnn_version() if device == "cuda" else None
        fp["slug"] = hardware_slug(fp)
    return fp


# --------------------------------------------------------------------------- slug

# Words that name no hardware: vendors' trademarks, "CPU", "Processor", core counts
# (the slug has its own), clock speeds.
_SLUG_NOISE = frozenset({"r", "tm", "c", "cpu", "processor", "nvidia", "corporation", "geforce",
                         "graphics", "with", "radeon", "apu", "soc"})


def _slug_words(text: Any, max_words: int = 5) -> str:
    """``"AMD EPYC 7763 64-Core Processor"`` -> ``"amd-epyc-7763"``."""
    text = str(text or "").split("@")[0]                       # "... @ 2.40GHz"
    text = re.sub(r"\b[\w]+-core\b", " ", text, flags=re.I)      # "64-Core", "Quad-Core"
    words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w and w not in _SLUG_NOISE]
    return "-".join(words[:max_words]) or "unknown"


def hardware_slug(hw: dict | None = None) -> str:
    """A short, stable, filesystem-safe name for a kind of machine (``[a-z0-9-]``, <= 64 chars).

    ``cpu-<n>c-<RAM>g-<cpu>`` (``cpu-2c-24g-amd-epyc``), ``cuda-<gpu>-x<count>-<n>c``
    (``cuda-a100-sxm4-80gb-x1-32c``; ``rocm-`` on ROCm builds; ``-mixed`` when the GPUs
    differ) or ``mps-<chip>-<RAM>g`` (``mps-apple-m2-pro-32g``). It keys per-hardware
    micro-benchmarks and baselines; ``id`` (a hash of the same facts) stays the exact key.
    ``hw`` is a ``hardware_fingerprint()`` dict (default: this machine's).
    """
    hw = hardware_fingerprint() if hw is None else hw
    n_cpus = int(hw.get("n_cpus") or 0)
    ram_gib = round((hw.get("ram_bytes") or 0) / 2**30)
    gpus = [str(g) for g in hw.get("gpus") or []]
    if gpus:
        kind = "rocm" if hw.get("hip_version") else "cuda"
        mixed = "-mixed" if len(set(gpus)) > 1 else ""
        slug = f"{kind}-{_slug_words(gpus[0])}-x{len(gpus)}{mixed}-{n_cpus}c"
    elif hw.get("mps"):
        slug = f"mps-{_slug_words(hw.get('cpu_name') or hw.get('cpu'))}-{ram_gib}g"
    else:
        slug = f"cpu-{n_cpus}c-{ram_gib}g-{_slug_words(hw.get('cpu_name') or hw.get('cpu'))}"
    return re.sub(r"-+", "-", slug)[:64].strip("-")
