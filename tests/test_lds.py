"""Per-pair LDS, its noise ceiling and the aggregate LDS, on games whose answer is known."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from bench.core.lds import LdsTargets, aggregate_lds, lds_subsets, lds_targets, pair_lds, sb_ceiling
from bench.core.ranks import spearman_columns
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
    out = pair_lds(W, t)
    assert out["lds"] == pytest.approx(1.0) and out["n_pairs"] == E and out["target"] == "margin"
    # a noisy score matrix, against a hand computation of the definition
    S = W + np.random.default_rng(9).normal(0, 1.0, size=W.shape)
    got = pair_lds(S, t)
    hand = []
    for j in range(E):
        pred = [S[s, j].sum() for s in t.subsets]
        target = [W[s, j].sum() for s in t.subsets]          # noise-free game: both seeds equal the truth
        hand.append(stats.spearmanr(pred, target).statistic)
    np.testing.assert_allclose(got["per_pair"], hand, atol=1e-5)
    assert got["lds"] == pytest.approx(np.mean(hand)) and got["lo"] <= got["lds"] <= got["hi"]
    assert len(got["replicates"]) == t.n_boot
    assert pair_lds(-W, t)["lds"] == pytest.approx(-1.0)


def test_ceiling_of_identical_seeds_is_one_and_falls_with_training_noise():
    W = _W(1)
    same = lds_targets([LinearGame(W, seed=0), LinearGame(W, seed=0)], 12, 0.5, 0)
    assert same.ceiling == pytest.approx(1.0) and pair_lds(W, same)["ratio"] == pytest.approx(1.0)
    noisy = lds_targets([LinearGame(W, seed=0, noise=1.5), LinearGame(W, seed=1, noise=1.5)], 24, 0.5, 0)
    assert 0 < noisy.ceiling < 0.95
    single = lds_targets([LinearGame(W, seed=0)], 12, 0.5, 0)
    assert np.isnan(single.ceiling)
    # Spearman-Brown: the 2-seed mean of seeds agreeing at Pearson r = 0.53 has reliability 2r/(1+r)
    r_s = (6 / np.pi) * np.arcsin(0.53 / 2)
    assert sb_ceiling(r_s, 2) == pytest.approx((6 / np.pi) * np.arcsin(np.sqrt(2 * 0.53 / 1.53) / 2))
    assert sb_ceiling(1.0, 2) == pytest.approx(1.0) and sb_ceiling(-0.2, 2) == 0.0


def _synthetic(M, seed, N=40, E=30, R=2, noise=1.0, n_boot=20):
    """A linear game with known noise: target = Σ_{i∈S} W[i, z] + noise per seed; W is
    the perfect noise-free predictor."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(N, E))
    subsets = lds_subsets(N, M, 0.5, seed)
    true = np.stack([W[s].sum(0) for s in subsets])
    T = np.stack([true + noise * np.sqrt(N / 2) * rng.normal(size=true.shape) for _ in range(R)])
    t = LdsTargets(subsets, list(range(R)), "margin", np.zeros((R, M)), {"margin": T, "bt_loglik": T},
                   boot_seed=seed, n_boot=n_boot)
    return W, t


def test_a_perfect_predictor_stays_at_or_below_the_ceiling_and_reaches_it_as_m_grows():
    ratios, old = {}, {}
    for M in (16, 128):
        out = [pair_lds(*_synthetic(M, seed)) for seed in range(12)]
        ratios[M] = np.array([o["ratio"] for o in out])
        ts = [_synthetic(M, seed)[1] for seed in range(12)]
        old[M] = np.mean([o["lds"] / np.nanmean(t.seed_agreement()) for o, t in zip(out, ts)])
    for M, r in ratios.items():
        se = r.std(ddof=1) / np.sqrt(len(r))
        assert r.mean() <= 1 + 2 * se, f"M={M}: a perfect predictor's LDS / ceiling {r.mean():.3f} > 1"
    assert abs(ratios[128].mean() - 1) < 0.03, "the ceiling is tight with many subsets"
    assert old[128] > 1.2, "the first definition (one seed predicting another) is exceeded"


def test_two_way_interval_covers_when_effects_are_shared_across_eval_pairs():
    """Scores share an error across eval pairs (Σ over a subset of one per-example term),
    so every pair's LDS moves with the same subsets: a bootstrap over pairs alone
    undercovers, the two-way one does not."""
    N, M, E, noise = 40, 32, 30, 2.0
    u = np.random.default_rng(123).normal(size=N)
    shared_err = np.random.default_rng(5).normal(size=N)

    def pairs(rng, e):
        W = 0.8 * u[:, None] + 0.6 * rng.normal(size=(N, e))
        return W, W + shared_err[:, None] + 0.5 * rng.normal(size=W.shape)

    rng = np.random.default_rng(99)                  # the population value, by brute force
    Wp, Sp = pairs(rng, 2000)
    subs = lds_subsets(N, 2000, 0.5, 99)
    true = np.stack([Wp[s].sum(0) for s in subs])
    T = true + noise * rng.normal(size=true.shape) / np.sqrt(2)
    truth = np.nanmean(spearman_columns(np.stack([Sp[s].sum(0) for s in subs]), T))
    two_way = pairs_only = 0
    n = 60
    for k in range(n):
        rng = np.random.default_rng(k)
        W, S = pairs(rng, E)
        subsets = lds_subsets(N, M, 0.5, 1000 + k)
        tr = np.stack([W[s].sum(0) for s in subsets])
        Tt = np.stack([tr + noise * rng.normal(size=tr.shape) for _ in range(2)])
        t = LdsTargets(subsets, [0, 1], "margin", np.zeros((2, M)), {"margin": Tt, "bt_loglik": Tt},
                       boot_seed=k, n_boot=120)
        out = pair_lds(S, t)
        two_way += out["lo"] <= truth <= out["hi"]
        pp = np.array([x for x in out["per_pair"] if x is not None])
        lo, hi = np.quantile(pp[rng.integers(0, len(pp), (500, len(pp)))].mean(1), [0.025, 0.975])
        pairs_only += lo <= truth <= hi
    assert two_way / n >= 0.85, f"two-way coverage {two_way / n:.2f}"
    assert pairs_only / n <= 0.6, f"the pairs-only bootstrap covered {pairs_only / n:.2f}"


def test_aggregate_lds_uses_the_scalar_utility_and_the_point_values():
    W = _W(2)
    t = lds_targets([LinearGame(W, seed=0), LinearGame(W, seed=1)], 16, 0.5, 1)
    point = W.mean(axis=1)                # the scalar margin is the mean over pairs: linear in the points
    out = aggregate_lds(point, t)
    assert out["lds"] == pytest.approx(1.0) and out["ceiling"] == pytest.approx(1.0) and out["metric"] == "margin"
    assert t.summary()["seeds"] == [0, 1] and len(t.summary()["ceiling_replicates"]) == t.n_boot
    with pytest.raises(ValueError):
        pair_lds(W[:, :2], t)
