"""What a valuer returns and what limits it: the types the harness and the valuers share.

A valuer turns a game into a ``Valuation``. The harness reads only the typed
fields below; ``extras`` is for diagnostics (shown in records, never read by
the harness or the analysis). Cost is measured around the valuer by the game's
use meter (``Game.metered``), which the harness opens; a valuer adds only its
own phases and the compute it did outside the game (``CostMeter``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.core.settings import Settings, setting
from bench.core.resources import peak_rss_bytes


@dataclass
class Cost:
    """What a valuation cost. ``fine_tunes`` counts every trained coalition or
    training set the method used, ``fine_tunes_cached`` how many of those came from
    the cache. ``device_s`` is the compute the method needs from scratch: the
    recorded train+eval seconds of every utility it used (cached or not) plus its
    own work, so cost is comparable whatever happened to be cached.

    GPU: ``gpu_hours`` = wall seconds the valuer held its GPU × GPUs held / 3600 (one
    GPU per process; concurrent workers on that GPU are not counted twice, being wall
    time), 0 on the CPU; ``cpu_only_s`` = its phases that run on the CPU only (Shapley
    sums, draws), reported apart: GPU-hours held idle; ``peak_gpu_mem_bytes`` = the peak
    memory torch allocated on the GPU while the valuer ran (None on the CPU). The harness
    measures the first and last around the whole valuer (``bench.core.devices.GpuMeter``)."""

    wall_s: float = 0.0
    device: str = "cpu"
    device_s: float = 0.0
    gpu_hours: float = 0.0
    fine_tunes: int = 0
    fine_tunes_cached: int = 0
    utility_calls: int = 0
    peak_mem_bytes: int = 0
    phases: dict = field(default_factory=dict)   # phase -> wall seconds
    cpu_only_s: float = 0.0
    gpus: int = 0
    peak_gpu_mem_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Step:
    """One point of an anytime estimate: the values after ``fine_tunes`` fine-tunes."""
    fine_tunes: int
    owner_values: np.ndarray
    point_values: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"fine_tunes": int(self.fine_tunes), "owner_values": np.asarray(self.owner_values).tolist(),
                "point_values": None if self.point_values is None else np.asarray(self.point_values).tolist()}


@dataclass(frozen=True)
class Valuation:
    """A valuer's answer. Shapes: n owners, N training examples (owner by owner,
    ``Game.flat_pairs()`` order), E eval pairs (``game.eval`` order), C clusters.

    ``pair_scores`` [N, E] (gradient methods): each training example's score on each
    eval pair; ``point_values`` is its mean over eval pairs. It may be a read-only
    ``np.memmap`` when large. The harness decides what to do with it (records do not
    store it)."""

    owner_values: np.ndarray                    # [n]
    point_values: np.ndarray | None = None      # [N], when the method values examples
    stderr: np.ndarray | None = None            # [n], the method's own uncertainty, when it has one
    cost: Cost = field(default_factory=Cost)
    table: np.ndarray | None = None             # [2^n] its own v(S) for every coalition (arithmetic, exact)
    clusters: np.ndarray | None = None          # [N] cluster of each example (SHED)
    cluster_scores: np.ndarray | None = None    # [C] score per cluster, used for selection (SHED's proxy values)
    trajectory: tuple[Step, ...] = ()           # anytime estimates by fine-tunes spent (sampling methods)
    extras: dict[str, Any] = field(default_factory=dict)   # diagnostics only
    # [N, E] per training example × eval pair (gradient methods); point_values = its mean over eval pairs
    pair_scores: np.ndarray | None = None
    # [R, n] independent draws of a randomised valuer (``owner_values`` = one of them): its
    # owner-level metrics are averaged over the draws, i.e. their expectation under its
    # randomness, so a comparison with it is not one lucky or unlucky draw (``random``)
    draws: np.ndarray | None = None

    def check(self, n_owners: int, n_examples: int, n_eval: int | None = None) -> None:
        """Shapes and finiteness of what the harness consumes; raises ValueError.
        ``pair_scores`` must be [n_examples, E] and finite; E is checked when ``n_eval`` is given."""
        ov = np.asarray(self.owner_values, dtype=float)
        if ov.shape != (n_owners,):
            raise ValueError(f"owner_values has shape {ov.shape}, expected ({n_owners},)")
        if not np.all(np.isfinite(ov)):
            raise ValueError("owner_values are not all finite")
        if self.point_values is not None:
            pv = np.asarray(self.point_values, dtype=float)
            if pv.shape != (n_examples,) or not np.all(np.isfinite(pv)):
                raise ValueError(f"point_values must be {n_examples} finite numbers, got shape {pv.shape}")
        if self.table is not None and np.asarray(self.table).shape != (2 ** n_owners,):
            raise ValueError(f"table has shape {np.asarray(self.table).shape}, expected ({2 ** n_owners},)")
        if self.clusters is not None and np.asarray(self.clusters).shape != (n_examples,):
            raise ValueError(f"clusters has shape {np.asarray(self.clusters).shape}, expected ({n_examples},)")
        if self.draws is not None:
            d = np.asarray(self.draws, dtype=float)
            if d.ndim != 2 or d.shape[1] != n_owners or not d.shape[0] or not np.all(np.isfinite(d)):
                raise ValueError(f"draws must be [R >= 1, {n_owners}] finite values, got shape {d.shape}")
        if self.pair_scores is not None:
            ps = np.asarray(self.pair_scores)            # no copy of an ndarray or a memmap
            if ps.ndim != 2 or ps.shape[0] != n_examples or (n_eval is not None and ps.shape[1] != n_eval):
                raise ValueError(f"pair_scores has shape {ps.shape}, expected ({n_examples}, "
                                 f"{'E' if n_eval is None else n_eval})")
            for s in range(0, ps.shape[0], 4096):        # chunked: it may be a large memmap
                if not np.all(np.isfinite(np.asarray(ps[s:s + 4096], dtype=float))):
                    raise ValueError("pair_scores are not all finite")


class BudgetExhausted(RuntimeError):
    """A valuer asked for more than its budget allows. Sampling methods catch it and
    return what they have; a method that cannot stop early fails with this message."""


@dataclass(frozen=True)
class Budget(Settings):
    """Limits every valuer honours (None = no limit). ``max_fine_tunes`` counts the
    distinct coalitions or training sets a valuer uses (cached ones too, so a result
    does not depend on what happened to be cached); ``max_seconds`` is wall time
    from the moment the harness starts the valuer. The game enforces both
    (``Game.metered``); long computations outside the game call
    ``game.check_budget()`` between units of work."""
    prefix = "budget"
    max_fine_tunes: int | None = setting(None, "distinct coalitions or training sets a valuer may use; "
                                               "null = no limit", min=1)
    max_seconds: float | None = setting(None, "wall seconds a valuer may run; null = no limit", min=0,
                                        min_exclusive=True)


def owner_sums(point_values, sizes) -> np.ndarray:
    """Owners' values as the sums of their examples' values (examples in owner order)."""
    pv = np.asarray(point_values, float)
    bounds = np.cumsum([0] + list(sizes))
    return np.array([float(pv[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])])


class CostMeter:
    """A valuer's phases and own compute, on top of the game's use meter.

    ``phase(name, own_compute=True)`` times work the game did not already count
    (gradients, embeddings, arithmetic); ``cost()`` adds the utilities the game
    served while the harness's meter was open (or since the game was made, when a
    valuer is called directly)."""

    def __init__(self, game):
        self.game = game
        self.phases: dict[str, float] = {}
        self._own_s = 0.0
        self._cpu_only_s = 0.0

    @contextmanager
    def phase(self, name: str, own_compute: bool = False, cpu_only: bool = False):
        """Time a phase; ``own_compute``: work the game did not count; ``cpu_only``: it runs
        on the CPU whatever the game's device (reported apart from GPU time). Fine-tunes the
        game trains inside an own phase (weights a shipped table does not carry, loaded
        there) are the game's count, not the valuer's own: left out of ``_own_s``."""
        t0, busy0 = time.perf_counter(), self._busy()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.phases[name] = self.phases.get(name, 0.0) + dt
            if own_compute:     # work not already counted as a game utility
                self._own_s += max(dt - (self._busy() - busy0), 0.0)
            if cpu_only:
                self._cpu_only_s += dt

    def _busy(self) -> float:
        return float(getattr(getattr(self.game, "usage", None), "busy_s", 0.0) or 0.0)

    def add_own(self, seconds: float) -> None:
        """Charge compute done earlier and reused now (e.g. cached embeddings), so the
        from-scratch cost stays honest whatever was cached."""
        self._own_s += float(seconds)

    def cost(self) -> Cost:
        used = self.game.usage.entries.values()
        trained = [e for e in used if e["trained"]]
        device = self.game.device_kind
        device_s = sum(e["compute_s"] for e in used) + self._own_s
        wall = sum(self.phases.values())
        gpus = 1 if device == "cuda" else 0          # one GPU per process (devices.pin_one_gpu)
        return Cost(
            wall_s=wall, device=device, device_s=device_s, cpu_only_s=self._cpu_only_s, gpus=gpus,
            gpu_hours=wall * gpus / 3600,
            fine_tunes=len(trained), fine_tunes_cached=sum(not e["fresh"] for e in trained),
            utility_calls=len(used),
            peak_mem_bytes=max([peak_rss_bytes()] + [e["peak_rss"] for e in used]),
            phases=dict(self.phases))


class GameView(Protocol):
    """What a valuer may use of a game (``bench.core.game.Game`` implements it; the
    valuer contract test hands every valuer a game that exposes only these names).
    A valuer never sees the planted noise, the cache layout or the stage dicts."""

    n: int                      # owners (players)
    owners: list                # owners' training pairs (``bench.core.task.Pair``)
    owner_sizes: list[int]
    eval: list                  # the evaluation pairs v(S) is scored on
    seed: int                   # the game's training seed
    metric: str                 # the utility's metric (a key of ``record(mask)["metrics"]``)
    kind: str                   # "union" | "sequential"
    model_spec: Any             # ``bench.core.models.ModelSpec``
    train: Any                  # ``bench.core.train.TrainSettings`` (beta, max_length, ...)
    usage: Any                  # the open use meter (read by ``CostMeter``)
    device_kind: str            # "cuda" | "cpu"
    device: str                 # where the game runs its passes ("cpu", "cuda", "cuda:1"); valuers default to it

    def flat_pairs(self) -> list: ...
    def utility(self, mask: int) -> float: ...
    def record(self, mask: int) -> dict: ...
    def table(self, masks=None) -> np.ndarray: ...
    def prefetch(self, items) -> None: ...
    def subset_utilities(self, subsets) -> np.ndarray: ...
    def subset_record(self, pairs) -> dict: ...
    def base(self) -> tuple: ...
    def ensure_weights(self, mask: int) -> None: ...
    def trained_model(self, mask: int): ...
    def coalition_meta(self, mask: int) -> dict | None: ...
    def stage_meta(self) -> dict: ...
    def finetuned(self, mask: int, dtype=None, device="cpu"): ...
    def artefacts_dir(self, name: str) -> Path: ...
    def check_budget(self) -> None: ...
    def metered(self, budget: Budget | None = None): ...   # a valuer's own, narrower budget


GAME_VIEW = tuple(n for n in list(GameView.__annotations__) + [
    k for k, v in vars(GameView).items() if callable(v) and not k.startswith("_")])


class Valuer(Protocol):
    """A valuation method. ``value`` is the method; ``check(game)`` (optional) raises
    ConfigError for settings that do not fit the game, before anything is trained;
    ``models_needed(n)`` (optional; none if absent) lists the coalitions whose trained
    weights ``value`` loads (``finetuned``/``trained_model``), not only their utilities: a
    shipped ground truth carries utilities, not weights, so a job served one trains these,
    says so in its first lines and counts them in its estimate (``harness.truth``)."""
    name: str

    def value(self, game: GameView, budget: Budget) -> Valuation: ...
