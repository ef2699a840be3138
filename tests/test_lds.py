"""Per-pair LDS, its noise ceiling and the aggregate LDS, on games whose answer is known."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from bench.core.lds import aggregate_lds, lds_targets, pair_ceiling, pair_lds
from bench.core.task import Pair
from bench.core.train import pair_metrics

N, E, BETA = 12, 5, 0.5


@dataclass
class Train:
    beta: float = BETA


class LinearGame:
    """A game whose per-pair margin after training on a subset is linear in it:
    β·d_j(S) = Σ_{i∈S} W[i, j] (+ seed noise), so W is the perfect score matrix."""

    def __init__(self, W, seed=0, noise=0.0):
        self.W, self.seed, self.noise = W, seed, noise
        self.owners = [[Pair(i, "s", f"p{i}", "a", "b") for i in range(k * 4, k * 4 + 4)] for k in range(3)]
        self.metric, self.train = "margin", Train()

    def _margins(self, pairs):
        m = self.W[[p.id for p in pairs]].sum(0) if pairs else np.zeros(self.W.shape[1])
        if self.noise and pairs:
            rng = np.random.default_rng([self.seed, *sorted(p.id for p in pairs)])
            m = m + rng.normal(0, self.noise, size=m.shape)
        return m

    def subset_record(self, pairs):
        d = self._margins(pairs) / BETA                 # lc - lr relative to the base (base: 0, 0)
        return {"logp_chosen": d.tolist(), "logp_rejected": [0.0] * len(d), "metrics": {"margin": float(np.mean(d * BETA))}}

    def record(self, mask):
        assert mask == 0
        return self.subset_record([])

    def subset_utilities(self, subsets):
        return np.array([self.subset_record(s)["metrics"]["margin"] for s in subsets])


def _W(seed=0):
    return np.random.default_rng(seed).normal(size=(N, E))


def test_pair_metrics_are_the_per_pair_terms_of_the_game_metrics():
    from bench.core.train import utility_metrics
    rng = np.random.default_rng(0)
    lc, lr, blc, blr = (rng.normal(size=7) for _ in range(4))
    per, mean = pair_metrics(lc, lr, blc, blr, 0.1), utility_metrics(lc, lr, blc, blr, 0.1)
    assert per["margin"].mean() == pytest.approx(mean["margin"]) and per["bt_loglik"].mean() == pytest.approx(mean["bt_loglik"])


def test_pair_lds_of_the_true_scores_is_one_and_equals_a_hand_computation():
    W = _W()
    t = lds_targets([LinearGame(W, seed=0), LinearGame(W, seed=1)], m_subsets=16, frac=0.5, seed=3)
    assert t.pairs["margin"].shape == (2, 16, E) and t.utilities.shape == (2, 16)
    out = pair_lds(W, t)["margin"]
    assert out["lds"] == pytest.approx(1.0) and out["n_pairs"] == E
    # a noisy score matrix, against a hand computation of the definition
    S = W + np.random.default_rng(9).normal(0, 1.0, size=W.shape)
    got = pair_lds(S, t)["margin"]
    hand = []
    for j in range(E):
        pred = [S[s, j].sum() for s in t.subsets]
        target = [W[s, j].sum() for s in t.subsets]          # noise-free game: both seeds equal the truth
        hand.append(stats.spearmanr(pred, target).statistic)
    np.testing.assert_allclose(got["per_pair"], hand, atol=1e-12)
    assert got["lds"] == pytest.approx(np.mean(hand)) and got["lo"] <= got["lds"] <= got["hi"]
    assert pair_lds(-W, t)["margin"]["lds"] == pytest.approx(-1.0)


def test_ceiling_of_identical_seeds_is_one_and_falls_with_training_noise():
    W = _W(1)
    same = lds_targets([LinearGame(W, seed=0), LinearGame(W, seed=0)], 12, 0.5, 0)
    np.testing.assert_allclose(pair_ceiling(same, "margin"), 1.0)
    assert pair_lds(W, same)["margin"]["ratio"] == pytest.approx(1.0)
    noisy = lds_targets([LinearGame(W, seed=0, noise=1.5), LinearGame(W, seed=1, noise=1.5)], 24, 0.5, 0)
    c = np.nanmean(pair_ceiling(noisy, "margin"))
    assert 0 < c < 0.95
    single = lds_targets([LinearGame(W, seed=0)], 12, 0.5, 0)
    assert np.isnan(pair_ceiling(single, "margin")).all()


def test_aggregate_lds_uses_the_scalar_utility_and_the_point_values():
    W = _W(2)
    t = lds_targets([LinearGame(W, seed=0), LinearGame(W, seed=1)], 16, 0.5, 1)
    point = W.mean(axis=1)                # the scalar margin is the mean over pairs: linear in the points
    out = aggregate_lds(point, t)
    assert out["lds"] == pytest.approx(1.0) and out["ceiling"] == pytest.approx(1.0) and out["metric"] == "margin"
    with pytest.raises(ValueError):
        pair_lds(W[:, :2], t)
