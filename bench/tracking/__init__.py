"""Provenance and results tracking; the names other packages use, from their modules:

* ``provenance``: ``git_info``, ``config_hash``, ``utc_timestamp``, ``to_jsonable``,
  ``provenance(cfg)`` (what every record carries), ``REPO_DIR``.
* ``system``: ``hardware_fingerprint`` (the one fingerprint; ``devices=True`` adds the
  device view), ``hardware_slug``, device detection.
* ``store``: ``ResultsStore`` (append-only JSONL under ``<root>/runs/``), ``read_jsonl``,
  ``dumps_line``, ``latest``, ``flatten_metrics``, ``get_metric``.
* ``wandb``: ``WandbLogger``, ``SafeLogger``, ``sweep_group``.
* ``schema``: the versioned run record and ``upgrade`` of old records.
"""
from __future__ import annotations

from bench.tracking.provenance import (REPO_DIR, config_hash, git_info, provenance, to_jsonable,
                                       utc_timestamp)
from bench.tracking.store import ResultsStore, dumps_line, flatten_metrics, get_metric, latest, read_jsonl
from bench.tracking.system import hardware_fingerprint, hardware_slug
from bench.tracking.wandb import SafeLogger, WandbLogger, sweep_group

__all__ = ["REPO_DIR", "ResultsStore", "SafeLogger", "WandbLogger", "config_hash", "dumps_line",
           "flatten_metrics", "get_metric", "git_info", "hardware_fingerprint", "hardware_slug",
           "latest", "provenance", "read_jsonl", "sweep_group", "to_jsonable", "utc_timestamp"]
