"""Provenance and results tracking.

* ``git_info`` / ``hardware_fingerprint`` / ``config_hash``: what every record carries.
* ``ResultsStore``: an append-only JSONL store, one file per experiment under
  ``<root>/runs/``; one line per (experiment, valuer, game, seed) run.
* ``WandbLogger``: mirrors records to Weights & Biases (offline by default) as
  run summary, tables and artifacts; a no-op in ``disabled`` mode.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import enum
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.core.errors import ConfigError
from bench.tracking.schema import upgrade

REPO_DIR = Path(__file__).resolve().parent.parent.parent

# Config keys that do not change a result (where outputs go, how many workers,
# how it is logged). Dropped at any depth before hashing.
VOLATILE_KEYS = frozenset({
    "results_dir", "output_dir", "cache_dir", "work_dir", "log_dir", "paths",
    "hydra", "logger", "wandb", "run_name", "n_jobs",
})


# --------------------------------------------------------------------------- provenance

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
        mps = getattr(torch.backends, "mps", None)     # Apple silicon
        hw["mps"] = bool(mps is not None and mps.is_available())
        hw["cuda"] = bool(torch.cuda.is_available())
        hw["cuda_version"] = torch.version.cuda
        hw["hip_version"] = getattr(torch.version, "hip", None)
        if hw["cuda"]:
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, or a broken driver: still fingerprint the CPU side
        pass
    ram_gib = round((hw["ram_bytes"] or 0) / 2**30)
    key = json.dumps([hw["cpu"], hw["n_cpus"], ram_gib, hw["gpus"]])
    hw["id"] = hashlib.sha256(key.encode()).hexdigest()[:12]
    return hw


def hardware_fingerprint() -> dict:
    """Machine description plus a short stable ``id`` (cpu, n_cpus, RAM GiB, GPUs)."""
    return copy.deepcopy(_hardware())


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


# --------------------------------------------------------------------------- results store

def _safe_name(name: str) -> str:
    safe = re.sub(r"[^\w.=+-]", "_", str(name)).lstrip(".")
    if not safe:
        raise ConfigError(f"experiment: invalid name {name!r}; set experiment=<name>")
    return safe


def dumps_line(record: dict) -> bytes:
    """One record as one JSON line (NaN written as null)."""
    return (json.dumps(to_jsonable(record), allow_nan=False, ensure_ascii=False) + "\n").encode()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records in a JSONL file; unreadable lines (a truncated write) are skipped with one warning."""
    path = Path(path)
    with open(path, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)  # never read a line while it is being written
        data = fh.read()
    out, bad = [], []
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            bad.append(i)
            continue
        if isinstance(rec, dict):
            out.append(upgrade(rec))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:5]} "
                      "(truncated or interrupted write)", RuntimeWarning, stacklevel=2)
    return out


class ResultsStore:
    """Append-only store: ``<root>/runs/<experiment>.jsonl``, one record per line."""

    def __init__(self, root: str | os.PathLike = "results"):
        self.root = Path(root)
        self.runs = self.root / "runs"

    def path(self, experiment: str) -> Path:
        return self.runs / f"{_safe_name(experiment)}.jsonl"

    def _unwritable(self, err: OSError) -> ConfigError:
        why = err.strerror or type(err).__name__
        return ConfigError(f"results_dir: cannot write to {self.runs} ({why}); "
                           "set results_dir=<writable path>")

    def check_writable(self) -> None:
        """Fail fast, before any expensive work, if records could not be saved."""
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.runs)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise self._unwritable(e) from e

    def append(self, record: dict) -> Path:
        """Append one record as one line; safe with concurrent writers and readers."""
        if not record.get("experiment"):
            raise ValueError("record has no 'experiment'")
        line = dumps_line(record)
        path = self.path(record["experiment"])
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._unwritable(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a crashed writer left half a line: keep ours separate
            from bench.core.faults import die, should_kill
            if should_kill("log"):
                os.write(fd, line[: len(line) // 2])
                os.fsync(fd)
                die()
            n = os.write(fd, line)
            while n < len(line):  # a short write to a regular file is near impossible
                n += os.write(fd, line[n:])
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        return path

    def experiments(self) -> list[str]:
        return sorted(p.stem for p in self.runs.glob("*.jsonl"))

    def read(self, experiment: str | None = None) -> list[dict]:
        """All records (of one experiment, if given), in file order."""
        if experiment is not None:
            p = self.path(experiment)
            recs = read_jsonl(p) if p.exists() else []
            return [r for r in recs if r.get("experiment") == experiment]
        return [r for p in sorted(self.runs.glob("*.jsonl")) for r in read_jsonl(p)]


# --------------------------------------------------------------------------- W&B

_SECTIONS = ("fidelity", "noise_ceiling", "detection", "selection", "cost")


def flatten_metrics(record: dict) -> dict[str, float]:
    """``{"fidelity/spearman": .., "detection/auroc": .., "cost/wall_s": .., ...}``.

    Reads every dict under ``record["metrics"]`` plus a top-level ``cost``;
    lists (curves, owner values) are left to tables.
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif obj is None or isinstance(obj, (bool, int, float, np.number)):
            flat[prefix] = to_jsonable(obj)

    metrics = record.get("metrics") or {}
    for name, sec in metrics.items():
        walk(name, sec)
    if "cost" not in metrics and isinstance(record.get("cost"), dict):
        walk("cost", record["cost"])
    order = {s: i for i, s in enumerate(_SECTIONS)}
    return dict(sorted(flat.items(), key=lambda kv: order.get(kv[0].split("/")[0], len(order))))


def get_metric(record: dict, section: str, key: str) -> float | None:
    """``record["metrics"][section][key]`` (``cost`` may also sit at top level); None if absent."""
    for holder in (record.get("metrics") or {}, record):
        sec = holder.get(section)
        if isinstance(sec, dict) and key in sec:
            v = sec[key]
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
    return None


def latest(records: Iterable[dict], keys=("experiment", "game", "valuer", "seed")) -> list[dict]:
    """The newest record (by timestamp, then file order) for each combination of ``keys``."""
    best: dict[tuple, dict] = {}
    for r in records:
        k = tuple(str(r.get(f)) for f in keys)
        if k not in best or str(r.get("timestamp") or "") >= str(best[k].get("timestamp") or ""):
            best[k] = r
    return list(best.values())


class WandbLogger:
    """Mirror records to W&B. Use as a context manager so the run always finishes.

    ``mode``: "offline" (default; files under ``dir``, no network), "online",
    or "disabled" (every method is a no-op and wandb is never imported).
    """

    MODES = ("offline", "online", "disabled")

    def __init__(self, mode: str = "offline", project: str = "dvbench",
                 dir: str | os.PathLike = "results/wandb", run_name: str | None = None,
                 config: dict | None = None, tags: Iterable[str] | None = None,
                 group: str | None = None):
        mode, d = self.check(mode, dir)
        self.mode, self.run, self._saved_env = mode, None, {}
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"logger.mode={mode} needs wandb; pip install wandb "
                              "or set logger=none") from e
        self._wandb = wandb
        env = {"WANDB_DIR": d, "WANDB_CACHE_DIR": d / ".cache", "WANDB_DATA_DIR": d / ".data",
               "WANDB_ARTIFACT_DIR": d / "artifacts", "WANDB_SILENT": "true"}
        if mode == "offline":  # online keeps the user's settings (entity, host)
            env["WANDB_CONFIG_DIR"] = d / ".config"
        for k, v in env.items():
            self._saved_env[k] = os.environ.get(k)
            os.environ[k] = str(v)
        try:
            self.run = wandb.init(
                mode=mode, project=project, dir=str(d), name=run_name, group=group,
                config=to_jsonable(config or {}), tags=list(tags or []),
                settings=wandb.Settings(silent=True, quiet=True, console="off"))
        except BaseException:
            self._restore_env()
            raise

    @classmethod
    def check(cls, mode, dir) -> tuple[str, Path | None]:
        """The normalised mode and the created run folder (None when disabled); a
        ConfigError for an unknown mode or a folder that cannot be created. The harness
        calls this before training, the constructor again when the run starts."""
        if mode in (None, False, "none", "off"):
            mode = "disabled"
        if mode not in cls.MODES:
            raise ConfigError(f"logger.mode: unknown {mode!r}; use offline, online or disabled")
        if mode == "disabled":
            return mode, None
        d = Path(dir).resolve()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"logger.dir: cannot create {d} ({e.strerror}); "
                              "set logger.dir=<writable path> or logger=none") from None
        return mode, d

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log_record(self, record: dict, prefix: str = "") -> dict:
        """Put one record's metrics into the run summary; returns the flat dict.

        Pass ``prefix=record["valuer"]`` when one run holds several valuers.
        """
        flat = {k: record.get(k) for k in ("valuer", "game", "seed", "n_owners", "status",
                                           "error", "commit", "dirty", "config_hash")
                if k in record}
        flat.update(flatten_metrics(record))
        if prefix:
            flat = {f"{prefix}/{k}": v for k, v in flat.items()}
        if self.run is not None:
            self.run.summary.update(flat)
        return flat

    def log_tables(self, records: list[dict]) -> None:
        """One table of per-owner values and one of per-valuer metrics."""
        if self.run is None or not records:
            return
        wandb = self._wandb
        value_rows, metric_rows, metric_cols = [], [], {}
        for r in records:
            noisy = set((r.get("planted") or {}).get("noisy_owners") or [])
            for i, v in enumerate(r.get("owner_values") or []):
                value_rows.append([r.get("valuer"), r.get("game"), r.get("seed"), i,
                                   to_jsonable(v), i in noisy])
            flat = flatten_metrics(r)
            metric_cols.update(dict.fromkeys(flat))
            metric_rows.append(([r.get("valuer"), r.get("game"), r.get("seed"), r.get("status")],
                                flat))
        base = ["valuer", "game", "seed", "status"]
        cols = list(metric_cols)
        self.run.log({
            "owner_values": wandb.Table(
                columns=["valuer", "game", "seed", "owner", "value", "is_noisy"], data=value_rows),
            "valuer_metrics": wandb.Table(
                columns=base + cols, data=[head + [flat.get(c) for c in cols]
                                           for head, flat in metric_rows]),
        })

    def log_artifact(self, path: str | os.PathLike, name: str, type: str = "values") -> None:
        """Upload a file or folder (e.g. per-example values) as a versioned artifact."""
        if self.run is None:
            return
        p = Path(path)
        art = self._wandb.Artifact(re.sub(r"[^\w.-]", "_", name), type=type)
        if p.is_dir():
            art.add_dir(str(p))
        else:
            art.add_file(str(p))
        self.run.log_artifact(art)

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}

    def finish(self, exit_code: int | None = None) -> None:
        """Close the run (idempotent)."""
        run, self.run = self.run, None
        try:
            if run is not None:
                run.finish(exit_code=exit_code)
        finally:
            self._restore_env()

    def __enter__(self) -> "WandbLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish(exit_code=1 if exc_type else None)
        return False


def sweep_group(default: str) -> str:
    """W&B group of a job: the Hydra sweep folder's name in a multirun (shared by
    every job of the sweep), else ``default``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                return Path(hc.runtime.output_dir).parent.name
    except Exception:       # no Hydra (library use): fall back
        pass
    return default


class SafeLogger:
    """A W&B logger whose failures never stop a run: the local JSONL record is
    written first and stays the source of truth; a W&B error (init, a table, an
    artifact) prints one warning and turns W&B off for the rest of the job."""

    def __init__(self, factory):
        self.logger = None
        try:
            self.logger = factory()
        except ConfigError:
            raise
        except Exception as e:
            self._warn("init", e)

    def _warn(self, what: str, e: Exception) -> None:
        print(f"[dvbench] warning: W&B {what} failed ({type(e).__name__}: {e}); W&B is off for this job, "
              f"the local results store is unaffected", file=sys.stderr)

    def __getattr__(self, name):
        target = getattr(self.logger, name, None) if self.logger is not None else None
        if not callable(target):
            return lambda *a, **k: None

        def call(*a, **k):
            try:
                return target(*a, **k)
            except Exception as e:
                self._warn(name, e)
                try:
                    self.logger.finish(exit_code=1)
                except Exception:
                    pass
                self.logger = None
        return call

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.logger is not None:
            try:
                self.logger.finish(exit_code=1 if exc_type else None)
            except Exception as e:
                self._warn("finish", e)
        return False
