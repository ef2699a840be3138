"""Where a result came from: the code's commit, a hash of the config, the machine, the time.

``provenance(cfg)`` is what every record carries; ``to_jsonable`` turns anything a
record holds into plain JSON types.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.tracking.system import hardware_fingerprint

REPO_DIR = Path(__file__).resolve().parent.parent.parent

# Config keys that do not change a result (where outputs go, how many workers,
# how it is logged). Dropped at any depth before hashing.
VOLATILE_KEYS = frozenset({
    "results_dir", "output_dir", "cache_dir", "work_dir", "log_dir", "paths",
    "hydra", "logger", "wandb", "run_name", "n_jobs",
})


def git_info(repo_dir: str | os.PathLike | None = None) -> dict:
    """``{"commit": sha | "unknown", "dirty": bool}`` of the code's repository.

    Never raises. Untracked (non-ignored) files count as dirty; if the state
    cannot be read the run is reported dirty, since the commit alone would not
    reproduce it.
    """
    cwd = Path(repo_dir) if repo_dir is not None else REPO_DIR
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take index.lock

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True,
                               text=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "--verify", "-q", "HEAD") or "unknown"
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": True if status is None else bool(status)}


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy → Python, NaN/inf → None, dataclass → dict, Path → str."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return to_jsonable(OmegaConf.to_container(obj, resolve=True))
    if hasattr(obj, "tolist"):  # torch tensors and the like
        return to_jsonable(obj.tolist())
    return str(obj)


def _drop_keys(obj: Any, keys: frozenset) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_keys(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop_keys(v, keys) for v in obj]
    return obj


def config_hash(cfg: Any, exclude: Iterable[str] = VOLATILE_KEYS) -> str:
    """sha256 (12 hex) of the canonical JSON of ``cfg`` without volatile keys."""
    clean = _drop_keys(to_jsonable(cfg), frozenset(exclude))
    canon = json.dumps(clean, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(cfg: Any, repo_dir: str | os.PathLike | None = None) -> dict:
    """The record fields that say where a result came from."""
    return {**git_info(repo_dir), "config_hash": config_hash(cfg),
            "hardware": hardware_fingerprint(), "timestamp": utc_timestamp()}
