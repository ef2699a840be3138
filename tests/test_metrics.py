"""Tests for bench/metrics.py."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from bench.core.metrics import detection, detection_roc, fidelity, mean_ci, r2


def test_fidelity_perfect_ranking():
    truth = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    f = fidelity(2 * truth, truth, total_gain=6.0, k=2)
    assert f["spearman"] == pytest.approx(1) and f["kendall"] == pytest.approx(1) and f["pearson"] == pytest.approx(1)
    assert f["rel_l2"] == pytest.approx(1.0)  # ||2t - t|| / ||t||
    assert f["topk"] == 1.0 and f["sign_agreement"] == 1.0
    assert f["efficiency_gap"] == pytest.approx(0.0)  # sum(2t) = 6
    json.dumps(f)
    assert all(v is None or type(v) is float for v in f.values())


def test_fidelity_reversed_ranking():
    truth = np.arange(1.0, 10.0)
    f = fidelity(-truth, truth)
    assert f["spearman"] == pytest.approx(-1) and f["kendall"] == pytest.approx(-1) and f["pearson"] == pytest.approx(-1)
    assert f["topk"] == 0.0 and f["sign_agreement"] == 0.0 and f["efficiency_gap"] is None
    assert f["rel_l2"] == pytest.approx(2.0)


def test_fidelity_constant_estimate_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = fidelity(np.ones(5), np.arange(5.0))
    assert math.isnan(f["spearman"]) and math.isnan(f["kendall"]) and math.isnan(f["pearson"])


def test_fidelity_topk_and_signs():
    truth = np.array([5.0, 4.0, 3.0, -1.0, 0.0, -2.0])
    est = np.array([5.0, 1.0, 3.0, 4.0, 0.0, 2.0])
    f = fidelity(est, truth, k=3)
    assert f["topk"] == pytest.approx(2 / 3)  # {0,1,2} vs {0,3,2}
    assert f["sign_agreement"] == pytest.approx(4 / 6)  # zero matches zero; players 3 and 5 differ
    assert f["kendall"] == pytest.approx(stats.kendalltau(est, truth).statistic)


def test_r2():
    y = np.array([1.0, 2.0, 4.0, 8.0])
    assert r2(y, y) == 1.0
    assert r2(np.full(4, y.mean()), y) == pytest.approx(0.0)
    assert math.isnan(r2(y, np.ones(4)))


def test_detection_perfect_separation():
    values = np.array([-3.0, -2.5, 1.0, 1.2, 0.9, 1.1, -2.8, 1.3])
    is_bad = values < 0
    d = detection(values, is_bad)
    assert d == {"auroc": 1.0, "auprc": 1.0, "precision_at_k": 1.0, "f1": 1.0}
    assert all(type(v) is float for v in d.values())


def test_detection_inverted_and_partial():
    values = np.array([0.0, 1.0, 2.0, 3.0])
    d = detection(values, [False, False, True, True])  # the bad ones have the highest values
    assert d["auroc"] == 0.0 and d["precision_at_k"] == 0.0 and d["f1"] == 0.0
    d = detection(values, [True, False, True, False])
    assert d["precision_at_k"] == 0.5 and d["auroc"] == pytest.approx(0.75)


@pytest.mark.parametrize("is_bad", [[False] * 4, [True] * 4])
def test_detection_degenerate_labels_give_none(is_bad):
    d = detection(np.arange(4.0), is_bad)
    assert d == {"auroc": None, "auprc": None, "precision_at_k": None, "f1": None}


def test_detection_constant_values_do_not_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = detection(np.zeros(6), [True, False] * 3)
    assert d["auroc"] == 0.5 and d["f1"] == 0.0


def test_mean_ci():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) / np.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert mean_ci([1.0, 2.0, 3.0], level=0.5)[2] < hi
    m, lo, hi = mean_ci([4.2])
    assert m == 4.2 and math.isnan(lo) and math.isnan(hi)
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_mean_ci_skips_missing_values():
    """The one CI of the project: report cells pass metrics a run could not compute."""
    assert mean_ci([1.0, None, 2.0, float("nan"), 3.0, float("inf")]) == mean_ci([1.0, 2.0, 3.0])
    assert all(math.isnan(v) for v in mean_ci([None, float("nan")]))
    assert all(math.isnan(v) for v in mean_ci([]))


def test_detection_roc_known_answer():
    """Low value = flagged bad. Ranked lowest first: bad, good, bad, good."""
    fpr, tpr = detection_roc([1.0, 2.0, 3.0, 4.0], [True, False, True, False])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert detection([1.0, 2.0, 3.0, 4.0], [True, False, True, False])["auroc"] == pytest.approx(0.75)
    # the bad points valued lowest: the curve goes straight up to (0, 1)
    fpr, tpr = detection_roc([5.0, -1.0, 3.0, -2.0], [False, True, False, True])
    assert (0.0, 1.0) in set(zip(fpr.tolist(), tpr.tolist()))
    # valued highest: the worst curve, straight right first
    fpr, tpr = detection_roc([5.0, -1.0, 3.0, -2.0], [True, False, True, False])
    assert (1.0, 0.0) in set(zip(fpr.tolist(), tpr.tolist()))
    # a tie between a bad and a good point is one diagonal step
    fpr, tpr = detection_roc([1.0, 1.0], [True, False])
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        detection_roc([1.0, 2.0], [True, True])


def test_numpy_detection_scores_equal_sklearn():
    """auroc / average_precision equal sklearn's on random data with ties; the exact 2-means
    split is at least as good as sklearn's KMeans (10 starts) and equal on generic data."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import average_precision_score, roc_auc_score

    from bench.core.metrics import auroc, average_precision, two_means_low
    rng = np.random.default_rng(0)
    same = []
    for trial in range(60):
        n = int(rng.integers(3, 40))
        score = rng.normal(size=n)
        if trial % 2:
            score = np.round(score, 1)                  # ties
        pos = rng.random(n) < 0.4
        if pos.all() or not pos.any():
            continue
        assert auroc(score, pos) == pytest.approx(roc_auc_score(pos, score), abs=1e-12)
        assert average_precision(score, pos) == pytest.approx(average_precision_score(pos, score), abs=1e-12)
        if np.ptp(score) == 0:
            continue
        low = two_means_low(score)
        km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(score.reshape(-1, 1))
        theirs = km.labels_ == int(np.argmin(km.cluster_centers_.ravel()))

        def sse(mask):
            return sum(((score[m] - score[m].mean()) ** 2).sum() for m in (mask, ~mask) if m.any())
        assert sse(low) <= sse(theirs) + 1e-9
        same.append(bool((low == theirs).all()))
    # Lloyd's iterations can stop at a local optimum; the exact split is the global one
    assert np.mean(same) >= 0.9, np.mean(same)
