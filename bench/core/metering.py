"""What was asked of a game, and the budget it may not pass.

``UseLog`` records one entry per distinct utility used (fresh or from the cache, its
compute seconds and memory) and enforces a ``Budget``; ``Metered`` gives a game
nested meters (``metered(budget)``). The real game (``bench.core.game.Game``) and the
closed-form test game (``bench.core.toy_games.TableGame``) share them.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from bench.core.valuation import Budget, BudgetExhausted


@dataclass
class UseLog:
    """What was asked of the game while this log was open: one entry per distinct
    utility used, and the budget those uses may not exceed."""
    entries: dict = field(default_factory=dict)   # mask or cache key -> {"fresh", "compute_s", "peak_rss", "trained"}
    budget: Budget = field(default_factory=Budget)
    t0: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0      # wall seconds spent producing fresh utilities (in this process or its workers)

    def add(self, key, rec: dict, fresh: bool) -> None:
        if key not in self.entries or fresh:
            self.entries[key] = {"fresh": fresh, "compute_s": rec.get("train_s", 0) + rec.get("eval_s", 0),
                                 "peak_rss": rec.get("peak_rss", 0), "trained": rec.get("n_train", 0) > 0,
                                 "peak_gpu": rec.get("peak_gpu_mem")}

    def fine_tunes(self) -> int:
        return sum(e["trained"] for e in self.entries.values())

    def admit(self, keys_trained: dict) -> None:
        """Raise BudgetExhausted if using these utilities ({log id: trains?}) would pass
        the budget, or if the time budget has run out."""
        b = self.budget
        if b.max_seconds is not None and time.monotonic() - self.t0 > b.max_seconds:
            raise BudgetExhausted(f"budget.max_seconds={b.max_seconds:g} spent")
        if b.max_fine_tunes is not None:
            new = sum(1 for k, t in keys_trained.items() if t and k not in self.entries)
            if new and self.fine_tunes() + new > b.max_fine_tunes:
                raise BudgetExhausted(f"budget.max_fine_tunes={b.max_fine_tunes}: {self.fine_tunes()} used, "
                                      f"{new} more asked for")


def fresh_peak_gpu(log: UseLog) -> int | None:
    """The largest peak GPU memory of the utilities a game computed (in this process or
    its workers; None when none ran on a GPU)."""
    peaks = [e["peak_gpu"] for e in log.entries.values() if e["fresh"] and e.get("peak_gpu")]
    return max(peaks) if peaks else None


def fresh_compute_s(log: UseLog) -> float:
    """Train + eval seconds of the utilities a game computed (not read from the cache),
    summed over the processes that computed them (worker seconds, not wall time)."""
    return sum(e["compute_s"] for e in log.entries.values() if e["fresh"])


class Metered:
    """Use meters and budgets, for the real game and the test games: ``self.log`` holds
    everything asked of the object, ``metered(budget)`` opens a nested meter that also
    enforces ``budget``. A subclass calls ``_admit_keys({log id: trains?})`` before
    serving utilities and ``_note_key(log id, record, fresh)`` after."""

    def _init_meters(self) -> None:
        self.log = UseLog()               # everything asked of this game object
        self._meters: list[UseLog] = []   # open ``metered`` blocks, innermost last

    @contextmanager
    def metered(self, budget: Budget | None = None):
        """Count what is asked of the game inside the block (a fresh ``UseLog``), and
        enforce ``budget`` on it: a utility past ``max_fine_tunes`` or after
        ``max_seconds`` raises ``BudgetExhausted`` before any training. Blocks nest
        (the job's total around each valuer's own, a valuer's own narrower cap inside)."""
        log = UseLog(budget=budget or Budget())
        self._meters.append(log)
        try:
            yield log
        finally:
            self._meters.remove(log)

    @property
    def usage(self) -> UseLog:
        """The innermost open meter (the game's whole log when none is open)."""
        return self._meters[-1] if self._meters else self.log

    def check_budget(self) -> None:
        """For valuers' own long computations: raise BudgetExhausted once time is up."""
        for m in self._meters:
            m.admit({})

    def _admit_keys(self, keys_trained: dict) -> None:
        for m in self._meters:
            m.admit(keys_trained)

    def _add_busy(self, seconds: float) -> None:
        """Wall seconds this object spent producing fresh utilities (``UseLog.busy_s``)."""
        for m in [self.log, *self._meters]:
            m.busy_s += seconds

    def _note_key(self, key, rec: dict, fresh: bool) -> None:
        self.log.add(key, rec, fresh)
        for m in self._meters:
            m.add(key, rec, fresh)
