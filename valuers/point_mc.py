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

import numpy as np

from bench.core import shapley
from bench.core.errors import ConfigError
from valuers.base import Budget, CostMeter, Step, Valuation, owner_sums


class PointMCShapley:
    def __init__(self, name: str = "point_mc_shapley", max_permutations: int = 4, truncation_tol: float | None = 0.05,
                 max_fine_tunes: int | None = None, seed: int = 0):
        if max_permutations < 1:
            raise ConfigError(f"valuer.max_permutations: {max_permutations}; use >= 1")
        if truncation_tol is not None and not 0 <= truncation_tol < 1:
            raise ConfigError(f"valuer.truncation_tol: {truncation_tol}; use a share in [0, 1) or null (off)")
        if max_fine_tunes is not None and max_fine_tunes < 1:
            raise ConfigError(f"valuer.max_fine_tunes: {max_fine_tunes}; use >= 1 or null (no cap)")
        self.name, self.seed = name, seed
        self.max_permutations, self.truncation_tol, self.max_fine_tunes = max_permutations, truncation_tol, max_fine_tunes

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
