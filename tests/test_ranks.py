"""Tie-aware ranks: rounding-level differences are ties in every rank statistic."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bench.core import metrics as M
from bench.core import ranks


def test_values_1e_18_apart_are_tied_and_real_differences_are_not():
    x = np.array([0.031, 0.02, 0.02 + 3.5e-18, -0.05, 0.1])
    assert x[1] != x[2] and stats.rankdata(x)[1] != stats.rankdata(x)[2]
    assert ranks.rank(x)[1] == ranks.rank(x)[2] == 2.5
    np.testing.assert_array_equal(ranks.rank([1.0, 1.0 + 1e-6, 2.0]), [1, 2, 3])
    assert ranks.snap_ties([0.0, 0.0, 0.0]).tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(ranks.snap_ties([np.nan, 1.0, 1.0]))[0]


def test_twin_owners_get_equal_ranks_on_every_seed():
    """quick's owners 1 and 5 are exact copies: their exact Shapley values came out 3.5e-18
    apart on two seeds and bitwise equal on the third, and Spearman ranked them apart."""
    ref = np.array([0.040, 0.012, 0.009, 0.005, -0.020, 0.012])
    for eps in (3.5e-18, 0.0, -3.5e-18):
        est = ref.copy()
        est[5] += eps
        assert eps == 0 or est[5] != ref[5]
        assert M.fidelity(est, ref)["spearman"] == pytest.approx(1.0)
        assert M.fidelity(est, ref)["kendall"] == pytest.approx(1.0)
    est = ref.copy()
    est[5] += 3.5e-18
    assert stats.spearmanr(est, ref).statistic < 1, "scipy alone ranks them apart"


def test_top_k_and_precision_at_k_share_a_tie_at_the_boundary():
    assert ranks.top_k_membership([3, 2, 2, 1], 2).tolist() == [1, 0.5, 0.5, 0]
    assert M.fidelity([3, 2, 2, 1], [3, 2, 1, 0], k=2)["topk"] == pytest.approx(0.75)
    d = M.detection(np.array([0.5, 0.1, 0.1 + 1e-19, 0.9]), np.array([False, True, False, False]))
    assert d["precision_at_k"] == pytest.approx(0.5) and d["auroc"] == pytest.approx(5 / 6)


def test_concordance_of_a_perfect_ordering_with_tied_shares_is_one():
    corruption = [0, 0, 0.25, 0.5, 1.0, 1.0, 0, 0]            # graded: ties among the shares
    values = [0.3, 0.2, 0.1, 0.0, -0.4, -0.3, 0.25, 0.22]     # falls as corruption rises
    g = M.detection_graded(values, corruption)
    assert g["concordance"] == 1.0 and g["auroc_any"] == 1.0
    tau = stats.kendalltau(-np.array(values), corruption).statistic
    assert tau < 0.9, "Kendall tau-b cannot reach 1 with tied shares"
    assert M.detection_graded([1.0] * 8, corruption)["concordance"] == 0.5, "all tied: chance"
    assert M.detection_graded(-np.array(values), corruption)["concordance"] == 0.0
    assert ranks.concordance([1, 2], [0.5, 0.5]) is None


def test_spearman_columns_agree_with_scipy_on_distinct_values():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    want = [stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(4)]
    np.testing.assert_allclose(ranks.spearman_columns(a, b), want, atol=1e-12)
    a[:, 0] = 1.0
    assert np.isnan(ranks.spearman_columns(a, b)[0])


def test_scale_free_error_ignores_the_scale_of_gradient_scores():
    ref = np.array([0.3, 0.1, -0.2, 0.05])
    f = M.fidelity(ref * 9e7, ref)
    assert f["rel_l2"] > 1e7 and f["rel_l2_fit"] == pytest.approx(0.0, abs=1e-12)
    assert M.fidelity(-ref, ref)["rel_l2_fit"] == pytest.approx(1.0)
