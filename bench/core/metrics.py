"""Harness metrics: fidelity of estimated values, noisy-data detection, confidence intervals.

Every number returned is a plain Python float (or None), so results are JSON-serialisable.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import r2_score, roc_curve

from bench.core import ranks
from bench.core.ranks import snap_ties

NAN = float("nan")


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    """Correlation statistic; NaN (without warnings) if undefined (n < 2 or constant input)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(fn(a, b).statistic)


def _sign(x: np.ndarray) -> np.ndarray:
    """Sign with values within ``ranks.RTOL`` of the scale counted as 0."""
    tol = ranks.RTOL * float(np.max(np.abs(x))) if len(x) else 0.0
    return np.where(np.abs(x) <= tol, 0.0, np.sign(x))


def rel_l2_fit(est, ref) -> float:
    """Scale-free relative error: min over c >= 0 of ||c·est − ref|| / ||ref|| (1 when
    no positive rescaling of ``est`` helps; 0 when ``est`` is ``ref`` up to scale). For
    valuers whose scale is arbitrary (gradient scores), where plain rel-L2 is not a
    statistic of quality."""
    est, ref = np.asarray(est, float), np.asarray(ref, float)
    norm, ee = np.linalg.norm(ref), float(est @ est)
    if norm == 0:
        return NAN
    c = max(float(est @ ref) / ee, 0.0) if ee > 0 else 0.0
    return float(np.linalg.norm(c * est - ref) / norm)


def fidelity(est, ref, total_gain: float | None = None, k: int | None = None) -> dict:
    """Agreement of estimated values `est` with reference values `ref` (e.g. exact retraining Shapley).

    Keys: spearman, kendall, pearson; rel_l2 = ||est - ref|| / ||ref||; rel_l2_fit = the
    same after the best non-negative rescaling of est (scale-free); topk = expected
    overlap fraction of the top-k sets, ties broken at random (k defaults to
    max(1, n // 3)); sign_agreement = share of players with equal sign (0 is its own
    sign); efficiency_gap = |sum(est) - total_gain| (None without total_gain). Rank
    statistics treat values equal within ``ranks.RTOL`` of their scale as tied
    (``bench.core.ranks``). Undefined correlations are NaN.
    """
    est, ref = np.asarray(est, dtype=float), np.asarray(ref, dtype=float)
    if est.shape != ref.shape or est.ndim != 1:
        raise ValueError(f"est and ref must be 1-D of equal length, got {est.shape} and {ref.shape}")
    n = len(ref)
    k = min(n, max(1, n // 3) if k is None else k)
    norm = np.linalg.norm(ref)
    return {
        "spearman": ranks.spearman(est, ref),
        "kendall": ranks.kendall(est, ref),
        "pearson": _corr(stats.pearsonr, est, ref),
        "rel_l2": float(np.linalg.norm(est - ref) / norm) if norm > 0 else NAN,
        "rel_l2_fit": rel_l2_fit(est, ref),
        "topk": ranks.top_k_overlap(est, ref, k) if k > 0 else NAN,
        "sign_agreement": float(np.mean(_sign(est) == _sign(ref))) if n else NAN,
        "efficiency_gap": None if total_gain is None else float(abs(est.sum() - total_gain)),
    }


def r2(pred, actual) -> float:
    """Coefficient of determination of `pred` as a prediction of `actual`; NaN if actual is constant."""
    pred, actual = np.asarray(pred, dtype=float), np.asarray(actual, dtype=float)
    if len(actual) < 2 or np.ptp(actual) == 0:
        return NAN
    return float(r2_score(actual, pred))


def auroc(score: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the positives ``pos``: the Mann–Whitney
    statistic, tied scores (within ``ranks.RTOL``) counted ½ (= sklearn's
    ``roc_auc_score`` on distinct scores, tested equal)."""
    return ranks.auroc(score, pos)


def average_precision(score: np.ndarray, pos: np.ndarray) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over the distinct score thresholds, highest first (= sklearn's
    ``average_precision_score``, tested equal; tied scores enter together)."""
    order = np.argsort(-score, kind="stable")
    s, y = score[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]    # end of each tie group
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def two_means_low(values: np.ndarray) -> np.ndarray:
    """The lower cluster of the optimal 1-D 2-means split of ``values`` (least within-cluster
    sum of squares over every cut of the sorted values; ties in value never split): what
    k-means converges to at its best start, found exactly, with no seed."""
    order = np.argsort(values, kind="stable")
    x = values[order]
    cuts = np.flatnonzero(np.diff(x) > 0) + 1                   # left part = x[:c]
    c1, c2, n = np.cumsum(x), np.cumsum(x * x), len(x)
    left = c2[cuts - 1] - c1[cuts - 1] ** 2 / cuts
    right = (c2[-1] - c2[cuts - 1]) - (c1[-1] - c1[cuts - 1]) ** 2 / (n - cuts)
    best = int(cuts[np.argmin(left + right)])
    low = np.zeros(n, dtype=bool)
    low[order[:best]] = True
    return low


def f1(pred: np.ndarray, pos: np.ndarray) -> float:
    tp = int((pred & pos).sum())
    denom = int(pred.sum()) + int(pos.sum())
    return 2 * tp / denom if denom else 0.0


def detection(values, is_bad) -> dict:
    """How well low values flag the planted bad points (score = -values).

    Keys: auroc, auprc; precision_at_k with k = number of bad points (ties in values
    broken by index); f1 of the optimal 1-D two-means split of the values where the
    lower cluster is predicted bad (as in OpenDataVal, which runs k-means; constant
    values predict nothing bad). All None if is_bad has no positive or no negative.
    Plain numpy (the harness scores every draw of a randomised valuer: sklearn's
    input checks cost ~25 ms a call).
    """
    values, is_bad = np.asarray(values, dtype=float), np.asarray(is_bad, dtype=bool)
    if values.shape != is_bad.shape or values.ndim != 1:
        raise ValueError(f"values and is_bad must be 1-D of equal length, got {values.shape} and {is_bad.shape}")
    n_bad = int(is_bad.sum())
    if n_bad == 0 or n_bad == len(is_bad):
        return {"auroc": None, "auprc": None, "precision_at_k": None, "f1": None}
    values = snap_ties(values)                      # rounding-level differences are ties
    lowest = ranks.top_k_membership(-values, n_bad)  # ties at the boundary shared at random
    pred_bad = two_means_low(values) if np.ptp(values) > 0 else np.zeros(len(values), dtype=bool)
    return {
        "auroc": auroc(-values, is_bad),
        "auprc": average_precision(-values, is_bad),
        "precision_at_k": float(np.sum(lowest * is_bad) / n_bad),
        "f1": float(f1(pred_bad, is_bad)),
    }


def detection_roc(values, is_bad) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of flagging the lowest values as bad (score = -values, as in
    ``detection``; sklearn's ``roc_curve``, so tied values make one diagonal step).
    Starts at (0, 0) and ends at (1, 1); its area is ``detection(...)["auroc"]``."""
    values, is_bad = np.asarray(values, dtype=float), np.asarray(is_bad, dtype=bool)
    if values.shape != is_bad.shape or values.ndim != 1:
        raise ValueError(f"values and is_bad must be 1-D of equal length, got {values.shape} and {is_bad.shape}")
    if is_bad.all() or not is_bad.any():
        raise ValueError("detection_roc: is_bad needs at least one bad and one good point")
    fpr, tpr, _ = roc_curve(is_bad, -snap_ties(values))
    return fpr, tpr


def mean_ci(xs, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t confidence interval for the mean of the values in ``xs``.

    None, NaN and inf are missing values and skipped (a metric a run could not
    compute). No value -> (nan, nan, nan); one value -> (x, nan, nan).
    """
    raw = np.asarray(xs if isinstance(xs, np.ndarray) else list(xs), dtype=object).ravel()
    x = np.array([np.nan if v is None else v for v in raw], dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size == 1:
        return mean, NAN, NAN
    half = float(stats.t.ppf((1 + level) / 2, df=x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def detection_graded(values, corruption) -> dict:
    """Owner-level detection by noise level: ``concordance`` = P(v_i < v_j | q_i > q_j)
    over owner pairs whose corrupted shares q differ (value ties count ½; 1 = values fall
    exactly as corruption rises, 0.5 = chance; ``ranks.concordance``), and the
    ``detection`` scores of "any corruption" (``auroc_any``, ``auprc_any``). None where
    undefined (no corruption planted, or every owner equally corrupted). Kendall τ-b,
    used before, cannot reach 1 when shares tie (0.577 at most on ``quick``)."""
    values, corruption = np.asarray(values, float), np.asarray(corruption, float)
    if values.shape != corruption.shape:
        raise ValueError(f"values and corruption must have equal shapes, got {values.shape} and {corruption.shape}")
    det = detection(values, corruption > 0)
    return {"concordance": ranks.concordance(values, corruption), "auroc_any": det["auroc"],
            "auprc_any": det["auprc"]}


def mean_of_dicts(dicts: list[dict]) -> dict:
    """Key by key (nested), the mean of the numbers over ``dicts`` (None and NaN skipped;
    None when no value is left)."""
    out = {}
    for k, v in dicts[0].items():
        if isinstance(v, dict):
            out[k] = mean_of_dicts([d[k] for d in dicts])
        else:
            xs = [d[k] for d in dicts if d[k] is not None and np.isfinite(d[k])]
            out[k] = float(np.mean(xs)) if xs else None
    return out
