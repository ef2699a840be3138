"""Fault injection for the kill-and-resume tests (off unless DVBENCH_KILL_AT is set).

``DVBENCH_KILL_AT=<point>[/<kind>]:<n>[@<VAR>=<value>,...]`` makes this process SIGKILL
itself the n-th time it reaches ``point``:

- ``cache_write``: a cache file's temp is written and fsynced, not yet renamed into place;
  ``cache_write/<kind>`` counts only the writes of that cache kind (the folder under the
  cache root: ``utility``, ``stage``, ``base_eval``...), so the kill lands at the same entry
  whatever other processes sharing the cache wrote first;
- ``log``: half of a results record line is written.

``@VAR=value,...`` kills only where those environment variables have those values (e.g.
``@SLURM_ARRAY_TASK_ID=0``: one task of an array). A SLURM job kills itself on its first
attempt only (``SLURM_RESTART_COUNT`` unset or 0), so a requeued job runs through; with
``DVBENCH_KILL_REQUEUE=1`` it first asks SLURM to requeue it (``scontrol requeue``), so
the kill and the requeue are placed by the job itself, not raced against the scheduler by
a test (tests/test_cluster.py). Production runs never set either.
"""
from __future__ import annotations

import os
import signal
import subprocess

_counts: dict[str, int] = {}


def _spec() -> tuple[str, int, dict[str, str]] | None:
    spec = os.environ.get("DVBENCH_KILL_AT")
    if not spec:
        return None
    spec, _, where = spec.partition("@")
    name, _, n = spec.partition(":")
    conds = dict(c.partition("=")[::2] for c in where.split(",") if c)
    return name, int(n or 1), conds


def should_kill(point: str, kind: str | None = None) -> bool:
    """Whether this is the moment ``DVBENCH_KILL_AT`` names (counting this call)."""
    spec = _spec()
    if spec is None:
        return False
    name, n, conds = spec
    if name not in (point, f"{point}/{kind}"):
        return False
    if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        return False                        # a requeued job: the fault was its first attempt's
    if any(os.environ.get(k, "") != v for k, v in conds.items()):
        return False
    _counts[name] = _counts.get(name, 0) + 1
    return _counts[name] == n


def die() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("DVBENCH_KILL_REQUEUE") == "1":
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        subprocess.run(["scontrol", "requeue", f"{array}_{task}" if array and task else job], timeout=60)
    os.kill(os.getpid(), signal.SIGKILL)
