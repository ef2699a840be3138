"""The valuer interface: a game in, a ``Valuation`` (values + cost) out.

A valuer may call ``game.utility(mask)`` / ``game.table(masks)`` (retraining
methods) or take its own cheaper route. It never sees the planted noise labels:
the game holds data and a utility, not the ground truth.

Adding a method = a module here, a YAML in ``conf/valuer/`` whose ``_target_``
points at the class, and a test. Nothing in ``bench/`` changes.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from bench.game import Game, peak_rss_bytes


@dataclass
class Cost:
    """What a valuation cost. ``fine_tunes`` counts every trained coalition the
    method needed, ``fine_tunes_cached`` how many of those came from the cache.
    ``device_s`` is the compute the method needs from scratch: the recorded
    train+eval seconds of every utility it used (cached or not) plus its own
    work, so cost is comparable whatever happened to be cached."""

    wall_s: float = 0.0
    device: str = "cpu"
    device_s: float = 0.0
    gpu_hours: float = 0.0
    fine_tunes: int = 0
    fine_tunes_cached: int = 0
    utility_calls: int = 0
    peak_mem_bytes: int = 0
    phases: dict = field(default_factory=dict)   # phase -> wall seconds

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Valuation:
    owner_values: np.ndarray                 # [n_owners]
    point_values: np.ndarray | None = None   # [n_examples], when the method has them
    stderr: np.ndarray | None = None
    cost: Cost = field(default_factory=Cost)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """Limits a valuer must respect (None = its own default)."""
    max_fine_tunes: int | None = None
    max_seconds: float | None = None


def flat_pairs(game) -> list:
    """Every training example in the canonical order of point values (owner by owner)."""
    return [p for o in game.owners for p in o]


def owner_sums(point_values, sizes) -> np.ndarray:
    """Owners' values as the sums of their examples' values (examples in owner order)."""
    pv = np.asarray(point_values, float)
    bounds = np.cumsum([0] + list(sizes))
    return np.array([float(pv[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])])


class Valuer(Protocol):
    """``value`` is the method. Optionally ``check(game)``: raise ConfigError for settings
    that do not fit the game (e.g. more clusters than examples); the harness calls it
    before training anything."""
    name: str

    def value(self, game: Game, budget: Budget) -> Valuation: ...


class CostMeter:
    """Measures a valuer's cost from the game's use log plus wall time."""

    def __init__(self, game: Game):
        self.game = game
        self.phases: dict[str, float] = {}
        self._own_s = 0.0

    @contextmanager
    def phase(self, name: str, own_compute: bool = False):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.phases[name] = self.phases.get(name, 0.0) + dt
            if own_compute:     # work not already counted as a game utility
                self._own_s += dt

    def add_own(self, seconds: float) -> None:
        """Charge compute done earlier and reused now (e.g. cached embeddings), so the
        from-scratch cost stays honest whatever was cached."""
        self._own_s += float(seconds)

    def cost(self) -> Cost:
        used = self.game.log.entries.values()
        trained = [e for e in used if e["trained"]]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        device_s = sum(e["compute_s"] for e in used) + self._own_s
        return Cost(
            wall_s=sum(self.phases.values()), device=device, device_s=device_s,
            gpu_hours=device_s / 3600 if device == "cuda" else 0.0,
            fine_tunes=len(trained), fine_tunes_cached=sum(not e["fresh"] for e in trained),
            utility_calls=len(used),
            peak_mem_bytes=max([peak_rss_bytes()] + [e["peak_rss"] for e in used]),
            phases=dict(self.phases))
