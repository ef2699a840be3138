"""Point-level permutation Monte Carlo Shapley (TMC-Shapley, Ghorbani & Zou 2019):
the players are the training examples, not the owners.

A permutation of the N examples is walked from the empty set; each prefix is a
fine-tune from the base on exactly those examples (``game.subset_utilities``,
cached by content, so prefixes shared with LDS or SHED are reused). An example's
value is its mean marginal contribution; an owner's value is the sum over its
examples. Truncation skips the rest of a permutation once the prefix is within
``truncation_tol * |v(all) - v(∅)|`` of the full-data utility (marginals counted
as 0; relative to the gain, since accuracy-like utilities start high at the base).

This is the point-level reference the cheap point valuers are compared with at
equal fine-tune budget: ``Valuation.trajectory`` holds the owner and point
values after every completed permutation with the fine-tunes spent so far.
A permutation costs up to N fine-tunes, so ``max_fine_tunes`` is checked after
each permutation (the last one may overshoot it by < N).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.core import shapley
from bench.core.settings import Settings, setting
from valuers.base import Budget, CostMeter, Step, Valuation, owner_sums


@dataclass(frozen=True)
class PointMCSettings(Settings):
    prefix = "valuer.point_mc_shapley"
    max_permutations: int = setting(4, "permutations of the training examples; each costs up to N fine-tunes",
                                    min=1)
    truncation_tol: float | None = setting(0.05, "stop a permutation once its prefix is within this share of "
                                                 "the gain |v(all) - v(empty)|; null = walk every prefix",
                                           min=0, max=1, max_exclusive=True)
    max_fine_tunes: int | None = setting(None, "distinct fine-tunes at most, checked after each permutation "
                                               "(the run's budget may be lower); null = no cap", min=1)
    seed: int = setting(0, "permutation seed (combined with the game's seed)", min=0)


class PointMCShapley:
    def __init__(self, name: str = "point_mc_shapley", **settings):
        self.name = name
        self.settings = s = PointMCSettings.of(settings, prefix=f"valuer.{name}")
        self.seed = s.seed
        self.max_permutations, self.truncation_tol, self.max_fine_tunes = s.max_permutations, s.truncation_tol, \
            s.max_fine_tunes

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        pairs = game.flat_pairs()
        N = len(pairs)
        caps = [c for c in (budget.max_fine_tunes, self.max_fine_tunes) if c is not None]
        cap = min(caps) if caps else None
        trained: set[int] = set()

        def utility(mask: int) -> float:
            idx = [i for i in range(N) if mask >> i & 1]    # canonical order: v depends on the set only
            if idx:
                trained.add(mask)
            return float(game.subset_utilities([[pairs[i] for i in idx]])[0])

        trajectory = []

        def after_permutation(m: int, running: np.ndarray) -> bool:
            point = np.asarray(running, float)
            trajectory.append(Step(len(trained), owner_sums(point, game.owner_sizes), point))
            return cap is not None and len(trained) >= cap

        rng = np.random.default_rng(self.seed + 7919 * game.seed)
        with meter.phase("fine_tune+score"):
            res = shapley.permutation_shapley(utility, N, rng, max_permutations=self.max_permutations,
                                              min_permutations=self.max_permutations, tol=None,
                                              truncation_tol=self.truncation_tol, truncation_scale="gain",
                                              callback=after_permutation, check_every=1)
        point = np.asarray(res.values, float)
        return Valuation(owner_sums(point, game.owner_sizes), point_values=point, cost=meter.cost(),
                         trajectory=tuple(trajectory), extras={
                             "n_examples": N, "n_permutations": res.n_permutations,
                             "truncation_tol": self.truncation_tol, "budget_stop": res.budget_stop})
