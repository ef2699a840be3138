"""Random values: the floor every method must beat. No fine-tunes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.core.settings import Settings, setting
from valuers.base import Budget, CostMeter, Valuation


@dataclass(frozen=True)
class RandomSettings(Settings):
    prefix = "valuer.random"
    seed: int = setting(0, "seed of the draw (combined with the game's seed)")


class RandomValuer:
    def __init__(self, name: str = "random", **settings):
        self.name = name
        self.settings = RandomSettings.of(settings, prefix=f"valuer.{name}")

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        with meter.phase("draw", own_compute=True):
            rng = np.random.default_rng([self.settings.seed, game.seed])
            values = rng.standard_normal(game.n)
        return Valuation(values, cost=meter.cost())
