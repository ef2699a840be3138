"""Fault injection for the kill-and-resume tests (off unless DVBENCH_KILL_AT is set).

``DVBENCH_KILL_AT=<point>:<n>`` makes this process SIGKILL itself the n-th time it
reaches ``point``: ``cache_write`` (a cache entry's temp file is written and fsynced,
not yet renamed into place) or ``log`` (half of a results record line is written).
Production runs never set it.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def should_kill(point: str) -> bool:
    spec = os.environ.get("DVBENCH_KILL_AT")
    if not spec:
        return False
    name, _, n = spec.partition(":")
    if name != point:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    return _counts[point] == int(n or 1)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
