"""Intervals, paired differences and the consensus ground truth, on synthetic data
whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from bench.core import shapley
from bench.core.metrics import detection_graded, mean_ci
from bench.core.uncertainty import Consensus, bootstrap_ci, paired_ci


def _coverage(interval, draw, truth, trials=2000, seed=0):
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        _, lo, hi = interval(draw(rng))
        hits += lo <= truth <= hi
    return hits / trials


def test_t_interval_covers_95_percent_with_three_seeds():
    """The seed-level interval: exact for normal data even at S = 3 (where a percentile
    bootstrap has 10 distinct resamples and covers far less)."""
    cov_t = _coverage(mean_ci, lambda r: r.normal(0.4, 0.2, size=3), 0.4)
    cov_boot = _coverage(lambda x: bootstrap_ci(x, n_boot=400), lambda r: r.normal(0.4, 0.2, size=3), 0.4, trials=500)
    assert 0.93 <= cov_t <= 0.97, cov_t
    assert cov_boot < 0.85, f"a bootstrap over 3 seeds should undercover (got {cov_boot})"


def test_bootstrap_covers_95_percent_over_many_units():
    """The pair-level interval: 150 eval pairs of a skewed distribution."""
    cov = _coverage(lambda x: bootstrap_ci(x, n_boot=1000), lambda r: r.exponential(1.0, size=150), 1.0, trials=400)
    assert 0.91 <= cov <= 0.98, cov


def test_paired_difference_finds_a_planted_gap_and_not_a_null_one():
    rng = np.random.default_rng(1)
    shared = rng.normal(0.5, 0.3, size=5)        # seed-to-seed variation both valuers share
    better = shared + 0.1 + rng.normal(0, 0.02, size=5)
    same = shared + rng.normal(0, 0.02, size=5)
    d = paired_ci(better, shared)
    assert d.excludes_zero and d.sign == "+" and d.lo > 0
    assert not paired_ci(same, shared).excludes_zero
    # unpaired intervals of the same data overlap: pairing is what shows the gap
    _, lo_b, _ = mean_ci(better)
    _, _, hi_s = mean_ci(shared)
    assert lo_b < hi_s


def test_paired_null_rejects_about_5_percent():
    rng = np.random.default_rng(2)
    rejections = sum(paired_ci(rng.normal(0, 1, 4), rng.normal(0, 1, 4)).excludes_zero for _ in range(2000))
    assert 0.03 <= rejections / 2000 <= 0.07


def test_paired_skips_missing_units_and_needs_two():
    p = paired_ci([0.5, None, 0.7], [0.1, 0.2, float("nan")])
    assert p.n == 1 and not p.excludes_zero and p.mean == pytest.approx(0.4)


def _game_tables(rng, n=4, seeds=3, noise=0.0):
    base = rng.normal(size=2 ** n)
    base[0] = 0.0
    return [base + (rng.normal(0, noise, size=2 ** n) if noise else 0) for _ in range(seeds)]


def test_consensus_of_identical_tables_is_each_tables_shapley():
    tables = _game_tables(np.random.default_rng(3))
    phis = [shapley.exact_shapley(t) for t in tables]
    cons = Consensus.of([0, 1, 2], phis, [t[-1] - t[0] for t in tables])
    np.testing.assert_allclose(cons.values, phis[0], atol=1e-12)
    np.testing.assert_allclose(cons.se, 0, atol=1e-12)
    for s in (0, 1, 2):
        np.testing.assert_allclose(cons.held_out(s), phis[0], atol=1e-12)
        assert cons.ceiling(s)["spearman"] == pytest.approx(1.0)
    assert cons.split_half == pytest.approx(1.0)


def test_consensus_is_the_shapley_of_the_mean_table_and_held_out_leaves_the_seed_out():
    tables = _game_tables(np.random.default_rng(4), noise=0.3)
    phis = [shapley.exact_shapley(t) for t in tables]
    cons = Consensus.of([5, 6, 7], phis, [t[-1] - t[0] for t in tables])
    np.testing.assert_allclose(cons.values, shapley.exact_shapley(np.mean(tables, 0)), atol=1e-12)
    np.testing.assert_allclose(cons.held_out(6), shapley.exact_shapley((tables[0] + tables[2]) / 2), atol=1e-12)
    assert cons.held_out_gain(6) == pytest.approx(np.mean([tables[i][-1] - tables[i][0] for i in (0, 2)]))
    np.testing.assert_allclose(cons.se, np.std(phis, 0, ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError):
        Consensus.of([0], phis[:1], [1.0])


def test_detection_graded_orders_owners_by_corruption():
    corruption = [0, 0, 0.25, 0.5, 1.0]
    d = detection_graded([0.3, 0.31, 0.1, 0.0, -0.4], corruption)
    assert d["concordance"] == 1.0 and d["auroc_any"] == 1.0
    assert detection_graded([0.3, 0.3, 0.3, 0.3, 0.3], corruption)["concordance"] == 0.5
    assert detection_graded([1, 2, 3, 4, 5], corruption)["concordance"] == 0.0
