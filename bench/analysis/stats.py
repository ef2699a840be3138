"""Statistics of recorded runs over seeds.

The one confidence interval is ``bench.core.metrics.mean_ci`` (``(mean, lo, hi)``,
Student-t, missing values skipped); the core's data selection uses it too, so it lives
there and this module applies it to records.
"""
from __future__ import annotations

import math
from typing import Iterable

from bench.core.metrics import mean_ci
from bench.tracking.store import get_metric


def ok(records: Iterable[dict]) -> list[dict]:
    """The records whose run succeeded (a record without a status is an old success)."""
    return [r for r in records if r.get("status", "ok") == "ok"]


def metric_ci(records: Iterable[dict], section: str, key: str,
              level: float = 0.95) -> tuple[float, float, float]:
    """``mean_ci`` of one metric (``get_metric(r, section, key)``) over ``records``."""
    return mean_ci([get_metric(r, section, key) for r in records], level)


def metric_mean(records: Iterable[dict], section: str, key: str) -> float | None:
    """The mean of one metric over the records that have it; None when none has it."""
    m = metric_ci(records, section, key)[0]
    return None if math.isnan(m) else m


def half_width(ci: tuple[float, float, float]) -> float:
    """The half-width of a ``mean_ci`` interval (NaN when it has none)."""
    mean, _, hi = ci
    return hi - mean


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, quality) points no cheaper-or-equal point beats, cheapest first."""
    front, best = [], -math.inf
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front
