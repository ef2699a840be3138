"""DPO language-model-arithmetic Shapley (Tamine, Sakhi, Heymann, 2025).

With DPO, a coalition's policy is (by the paper's sequential-DPO identity)
    log π_S = Σ_{i∈S} w_i log π_i − (Σ w_i − 1) log π_0 − log Z_S(x),
so one fine-tune per owner (n instead of 2^n − 1) gives every coalition's model
by arithmetic. log Z_S(x) depends only on the prompt and cancels between two
responses to it, so on preference pairs the coalition's margin is exactly
    d_S(x) = Σ_{i∈S} w_i d_i(x),  d_i = [log π_i(y_w) − log π_0(y_w)] − [log π_i(y_l) − log π_0(y_l)]
and the policy's own log-prob gap is (log π_0(y_w) − log π_0(y_l)) + d_S(x).
All 2^n utilities are then one matrix product (coalition weights × owner margins).

Weights: ``identity`` (w_i = 1, the sequential identity) or ``size``
(w_i = |D_i| / |D_S|, a proxy for the pooled/union game). The owner models are
the game's own single-owner coalitions (same trainer, β, reference, cache), so
they are shared with the retraining valuers and never retrained on a rerun.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.core import shapley
from bench.core.errors import ConfigError
from bench.core.settings import Settings, setting
from bench.core.train import METRICS
from valuers.base import Budget, CostMeter, Valuation

WEIGHTS = ("identity", "size")


def coalition_weights(n: int, kind: str, sizes=None) -> np.ndarray:
    """[2^n, n] weight of owner i in coalition mask m (0 when i ∉ m)."""
    member = shapley.coalition_masks(n).astype(np.float64)
    if kind == "identity":
        return member
    if kind == "size":
        w = member * np.asarray(sizes, dtype=np.float64)[None, :]
        tot = w.sum(1, keepdims=True)
        return np.divide(w, tot, out=np.zeros_like(w), where=tot > 0)
    raise ConfigError(f"valuer.dpo_arithmetic.weights: unknown {kind!r}; choose one of {list(WEIGHTS)}")


def coalition_utilities(base_gap: np.ndarray, margins: np.ndarray, weights: np.ndarray, beta: float) -> dict:
    """Every metric of bench.core.train.utility_metrics for all coalitions at once.

    base_gap  [P]     log π_0(y_w|x) − log π_0(y_l|x) per eval pair
    margins   [n, P]  d_i per owner and pair
    weights   [2^n, n]
    Returns {metric: [2^n]}.
    """
    d = weights @ margins                          # [2^n, P] coalition margins d_S
    gap = base_gap[None, :] + d                    # policy's own log-prob gap
    return {
        "pref_acc": np.mean((gap > 0) + 0.5 * (gap == 0), axis=1),
        "reward_acc": np.mean((d > 0) + 0.5 * (d == 0), axis=1),
        "margin": beta * d.mean(axis=1),
        "bt_loglik": np.mean(-np.logaddexp(0.0, -beta * d), axis=1),
    }


def check_compatible(meta: dict | None, expected: dict, owner: int) -> None:
    """Refuse owner models trained with another β, base model or tokenizer."""
    if meta is None:
        raise ConfigError(f"dpo_arithmetic: owner {owner}'s adapter has no training metadata; "
                          f"retrain it through the game (delete its stage in the cache)")
    for field in ("beta", "model", "tokenizer", "base_task"):
        if meta.get(field) != expected.get(field):
            raise ConfigError(f"dpo_arithmetic: owner {owner}'s adapter was trained with {field}="
                              f"{meta.get(field)!r} but the game uses {expected.get(field)!r}; "
                              f"adapters must share the game's beta, base model and tokenizer")


@dataclass(frozen=True)
class DPOArithmeticSettings(Settings):
    prefix = "valuer.dpo_arithmetic"
    weights: str = setting("identity", "identity (w_i = 1, the sequential-DPO identity) | size "
                                       "(w_i = |D_i|/|D_S|, a union-game proxy)", choices=WEIGHTS)
    metric: str | None = setting(None, "utility metric of the coalition table; null = the game's metric",
                                 choices=METRICS)


class DPOArithmetic:
    def __init__(self, name: str = "dpo_arithmetic", **settings):
        self.name = name
        self.settings = s = DPOArithmeticSettings.of(settings, prefix=f"valuer.{name}")
        self.weights, self.metric = s.weights, s.metric

    def owner_margins(self, game) -> tuple[np.ndarray, np.ndarray]:
        """(base gap [P], owner margins [n, P]) from the n single-owner fine-tunes
        (base + adapter i, response tokens only, fp32, as the game scores them)."""
        singles = [1 << i for i in range(game.n)]
        game.prefetch([0] + singles)
        base = game.record(0)
        b_c, b_r = np.array(base["logp_chosen"]), np.array(base["logp_rejected"])
        expected = game.stage_meta()
        margins = []
        for i, m in enumerate(singles):
            check_compatible(game.coalition_meta(m), expected, i)
            r = game.record(m)
            margins.append((np.array(r["logp_chosen"]) - b_c) - (np.array(r["logp_rejected"]) - b_r))
        return b_c - b_r, np.stack(margins)

    def value(self, game, budget: Budget) -> Valuation:
        meter = CostMeter(game)
        with meter.phase("owner_fine_tunes"):
            base_gap, margins = self.owner_margins(game)
        with meter.phase("arithmetic", own_compute=True):
            w = coalition_weights(game.n, self.weights, game.owner_sizes)
            tables = coalition_utilities(base_gap, margins, w, game.train.beta)
            table = tables[self.metric or game.metric]
            phi = shapley.exact_shapley(table)
            shapley.check_efficiency(phi, table, atol=1e-9)
        return Valuation(phi, cost=meter.cost(), table=table, extras={
            "weights": self.weights, "metric": self.metric or game.metric,
            "banzhaf": shapley.banzhaf(table).tolist(), "loo": shapley.leave_one_out(table).tolist()})
