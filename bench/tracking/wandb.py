"""Weights & Biases: mirror records as run summary, tables and artifacts.

``WandbLogger`` is offline by default (files under ``dir``, no network) and a no-op in
``disabled`` mode (wandb is then never imported); ``SafeLogger`` wraps one so a W&B
failure never stops a run (the local JSONL record stays the source of truth);
``sweep_group`` names the W&B group of a Hydra multirun.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterable

from bench.core.errors import ConfigError
from bench.tracking.provenance import to_jsonable
from bench.tracking.store import flatten_metrics


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

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """One table of strings (e.g. the leaderboard with its marks) under ``name``."""
        if self.run is None or not rows:
            return
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[[str(c) for c in r] for r in rows])})

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
