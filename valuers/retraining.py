"""Retraining valuers: every utility is a real fine-tune through the game.

``RetrainShapley``  exact Shapley over all 2^n coalitions (the ground truth);
                    Banzhaf and leave-one-out from the same table, in extras.
``LeaveOneOut``     v(N) − v(N∖{i}): n + 1 fine-tunes.
``MCShapley``       permutation sampling with a budget and a stopping rule.
"""
from __future__ import annotations

import numpy as np

from bench.core import shapley
from valuers.base import Budget, CostMeter, Valuation


class RetrainShapley:
    def __init__(self, name: str = "retrain_shapley"):
        self.name = name

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        with meter.phase("fine_tune+score"):
            table = game.table()
        with meter.phase("shapley"):
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


class MCShapley:
    """Permutation Monte Carlo Shapley.

    ``max_fine_tunes`` (or the run's budget, whichever is smaller) caps distinct
    coalitions used; sampling stops earlier when the running mean stabilises
    (``tol``). Stopped by the budget mid-permutation, it keeps the complete ones.
    """

    def __init__(self, name: str = "mc_shapley", max_permutations: int = 50, min_permutations: int = 4,
                 tol: float | None = 0.02, truncation_tol: float | None = None,
                 max_fine_tunes: int | None = None, seed: int = 0):
        self.name, self.seed = name, seed
        self.kw = dict(max_permutations=max_permutations, min_permutations=min_permutations, tol=tol,
                       truncation_tol=truncation_tol)
        self.max_fine_tunes = max_fine_tunes

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        caps = [c for c in (budget.max_fine_tunes, self.max_fine_tunes) if c is not None]
        cap = min(caps) if caps else None
        seen: set[int] = set()

        def utility(mask: int) -> float:
            seen.add(mask)
            return game.utility(mask)

        def stop(m, running):   # budget check after each block of permutations
            return cap is not None and len(seen - {0}) >= cap

        rng = np.random.default_rng(self.seed + 7919 * game.seed)
        with meter.phase("fine_tune+score"):
            res = shapley.permutation_shapley(utility, game.n, rng, callback=stop, **self.kw)
        return Valuation(res.values, stderr=res.stderr, cost=meter.cost(), extras={
            "n_permutations": res.n_permutations, "converged": res.converged, "budget_stop": res.budget_stop,
            "history": [list(map(float, h)) for h in res.history]})
