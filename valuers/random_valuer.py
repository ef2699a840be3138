"""Random values: the floor every method must beat. No fine-tunes.

It returns ``n_draws`` independent draws (``Valuation.draws``; ``owner_values`` is the
first): the harness averages its owner-level metrics over them, so its fidelity per
seed is the expected fidelity of random values on that seed's game, and a paired
comparison with it measures the other valuer, not one lucky draw."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.core.settings import Settings, setting
from valuers.base import Budget, CostMeter, Valuation


@dataclass(frozen=True)
class RandomSettings(Settings):
    prefix = "valuer.random"
    seed: int = setting(0, "seed of the draws (combined with the game's seed)")
    n_draws: int = setting(256, "independent draws whose owner-level metrics are averaged", min=1)


class RandomValuer:
    def __init__(self, name: str = "random", **settings):
        self.name = name
        self.settings = RandomSettings.of(settings, prefix=f"valuer.{name}")

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        with meter.phase("draw", own_compute=True, cpu_only=True):
            rng = np.random.default_rng([self.settings.seed, game.seed])
            draws = rng.standard_normal((self.settings.n_draws, game.n))
        return Valuation(draws[0], cost=meter.cost(), draws=draws)
