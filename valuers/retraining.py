"""Retraining valuers: every utility is a real fine-tune through the game.

``RetrainShapley``  exact Shapley over all 2^n coalitions (the ground truth);
                    Banzhaf and leave-one-out from the same table, in extras.
``LeaveOneOut``     v(N) − v(N∖{i}): n + 1 fine-tunes.
``MCShapley``       permutation sampling with a budget and a stopping rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.core import shapley
from bench.core.settings import Settings, setting
from valuers.base import Budget, CostMeter, Valuation


class RetrainShapley:
    def __init__(self, name: str = "retrain_shapley"):
        self.name = name

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        with meter.phase("fine_tune+score"):
            table = game.table()
        with meter.phase("shapley", cpu_only=True):
            phi = shapley.exact_shapley(table)
            shapley.check_efficiency(phi, table, atol=1e-9)
        return Valuation(phi, cost=meter.cost(), table=table, extras={
            "banzhaf": shapley.banzhaf(table).tolist(), "loo": shapley.leave_one_out(table).tolist()})


class LeaveOneOut:
    def __init__(self, name: str = "loo"):
        self.name = name

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        full = (1 << game.n) - 1
        masks = [full] + [full & ~(1 << i) for i in range(game.n)]
        with meter.phase("fine_tune+score"):
            t = game.table(masks)
        return Valuation(np.array([t[full] - t[full & ~(1 << i)] for i in range(game.n)]), cost=meter.cost())


@dataclass(frozen=True)
class MCShapleySettings(Settings):
    prefix = "valuer.mc_shapley"
    max_permutations: int = setting(50, "permutations at most", min=1)
    min_permutations: int = setting(4, "permutations before the stopping rule may fire", min=1)
    tol: float | None = setting(0.02, "stop when the running mean moves by <= tol x its mean |value| "
                                      "between checks; null = run max_permutations", min=0, min_exclusive=True)
    truncation_tol: float | None = setting(None, "skip the rest of a permutation once within this share "
                                                 "of |v(N)|; null = no truncation", min=0)
    max_fine_tunes: int | None = setting(None, "distinct coalitions at most (the run's budget may be lower)",
                                         min=1)
    seed: int = setting(0, "permutation seed (combined with the game's seed)")


class MCShapley:
    """Permutation Monte Carlo Shapley.

    ``max_fine_tunes`` (and the run's budget) cap the distinct coalitions used; sampling
    stops earlier when the running mean stabilises (``tol``). Stopped by either
    mid-permutation, it keeps the complete permutations.
    """

    def __init__(self, name: str = "mc_shapley", **settings):
        self.name = name
        self.settings = s = MCShapleySettings.of(settings, prefix=f"valuer.{name}")
        self.seed, self.max_fine_tunes = s.seed, s.max_fine_tunes
        self.kw = dict(max_permutations=s.max_permutations, min_permutations=s.min_permutations, tol=s.tol,
                       truncation_tol=s.truncation_tol)

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        rng = np.random.default_rng(self.seed + 7919 * game.seed)
        # its own cap is a budget on a meter of its own: the game stops the walk before the
        # cap is passed, and the complete permutations are kept (as under the run's budget)
        with meter.phase("fine_tune+score"), game.metered(Budget(max_fine_tunes=self.max_fine_tunes)):
            res = shapley.permutation_shapley(game.utility, game.n, rng, **self.kw)
        return Valuation(res.values, stderr=res.stderr, cost=meter.cost(), extras={
            "n_permutations": res.n_permutations, "converged": res.converged, "budget_stop": res.budget_stop,
            "history": [list(map(float, h)) for h in res.history]})
