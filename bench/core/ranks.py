"""Tie-aware ranks: the one place a rank is taken.

Exact Shapley values of twin owners are equal in exact arithmetic but come out of
floating point ~1e-18 apart (different summation orders); ranking them apart turns
rounding noise into a verdict. Every rank statistic of the suite (Spearman, Kendall,
AUROC, top-k, precision@k, the LDS and its ceiling, the graded-detection concordance)
first merges values that are equal within ``RTOL`` of the vector's scale
(``snap_ties``), then ranks with ties sharing their average rank.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

RTOL = 1e-9          # values closer than RTOL · max|x| are one value


def snap_ties(x, rtol: float = RTOL) -> np.ndarray:
    """A copy of ``x`` (1-D, or 2-D column by column) where runs of sorted values whose
    neighbours differ by at most ``rtol · max|x|`` share the run's first value.
    Exact equality when every value is 0. NaN stays NaN."""
    x = np.array(x, dtype=float, copy=True)
    if x.ndim == 2:
        for j in range(x.shape[1]):
            x[:, j] = snap_ties(x[:, j], rtol)
        return x
    fin = np.isfinite(x)
    if fin.sum() < 2:
        return x
    v = x[fin]
    tol = rtol * float(np.max(np.abs(v)))
    order = np.argsort(v, kind="stable")
    s = v[order]
    new_run = np.r_[True, np.diff(s) > tol]
    s = s[np.flatnonzero(new_run)[np.cumsum(new_run) - 1]]      # every member takes its run's first value
    v[order] = s
    x[fin] = v
    return x


def rank(x, rtol: float = RTOL) -> np.ndarray:
    """Average ranks (1..n) of ``x`` after ``snap_ties``; 2-D: per column."""
    return stats.rankdata(snap_ties(x, rtol), axis=0)


def _constant(x: np.ndarray) -> bool:
    return len(x) < 2 or np.ptp(x) == 0


def spearman(a, b) -> float:
    """Spearman ρ with ties merged (``snap_ties``); NaN when either side is constant."""
    a, b = snap_ties(a), snap_ties(b)
    if _constant(a) or _constant(b):
        return float("nan")
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_columns(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Spearman ρ of every column of ``pred`` [M, E] with the same column of ``target``
    (ties merged per column); NaN where a column is constant."""
    return pearson_columns(rank(pred), rank(target))


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of every column pair of two [M, E] arrays; NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / den
    r[~(den > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def kendall(a, b) -> float:
    """Kendall τ-b with ties merged; NaN when either side is constant."""
    a, b = snap_ties(a), snap_ties(b)
    if _constant(a) or _constant(b):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.kendalltau(a, b).statistic)


def auroc(score, pos) -> float:
    """Area under the ROC curve of ``score`` for the positives ``pos`` (the Mann–Whitney
    statistic; tied scores, after merging, count ½)."""
    pos = np.asarray(pos, bool)
    r = rank(score)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_k_membership(x, k: int) -> np.ndarray:
    """Per item, the probability of being among the k largest when ties (after merging)
    are broken uniformly at random: 1 above the boundary, 0 below, and r/g for each of
    the g items tied at the boundary, r of whose places are left."""
    x = snap_ties(x)
    n = len(x)
    p = np.zeros(n)
    if k <= 0:
        return p
    if k >= n:
        return np.ones(n)
    kth = np.sort(x)[::-1][k - 1]
    above = x > kth
    tied = x == kth
    p[above] = 1.0
    p[tied] = (k - above.sum()) / tied.sum()
    return p


def top_k_overlap(est, ref, k: int) -> float:
    """Expected share of the top-k of ``ref`` found in the top-k of ``est``, ties on
    either side broken at random (independently): Σ_i P(i ∈ top_k est)·P(i ∈ top_k ref) / k."""
    return float(np.sum(top_k_membership(est, k) * top_k_membership(ref, k)) / k)


def concordance(values, levels) -> float | None:
    """Concordance index of low ``values`` with high ``levels`` (e.g. each owner's
    corrupted share): over the pairs (i, j) with levels[i] > levels[j], the share with
    values[i] < values[j], value ties (after merging) counting ½. 1 = values fall exactly
    as the level rises, 0.5 = chance. Pairs of equal level are left out, so the index
    reaches 1 whatever the ties among levels (Kendall τ-b does not). None when no pair
    has different levels."""
    v, q = snap_ties(values), np.asarray(levels, float)
    if v.shape != q.shape:
        raise ValueError(f"values and levels must have equal shapes, got {v.shape} and {q.shape}")
    hi = q[:, None] > q[None, :]                 # pairs (i, j) with q_i > q_j
    if not hi.any():
        return None
    lower = (v[:, None] < v[None, :]).astype(float) + 0.5 * (v[:, None] == v[None, :])
    return float(lower[hi].mean())
