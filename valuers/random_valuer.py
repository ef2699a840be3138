"""Random values: the floor every method must beat. No fine-tunes."""
from __future__ import annotations

import numpy as np

from valuers.base import Budget, CostMeter, Valuation


class RandomValuer:
    def __init__(self, name: str = "random", seed: int = 0):
        self.name, self.seed = name, seed

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        with meter.phase("draw", own_compute=True):
            rng = np.random.default_rng([self.seed, game.seed])
            values = rng.standard_normal(game.n)
        return Valuation(values, cost=meter.cost())
