"""Linear datamodeling score (LDS) of point values (Park et al., 2023; as in dattri).

Draw M random subsets holding ``frac`` of the training examples, retrain on each
(through the game: DPO from the base on exactly those pairs, cached by content,
parallel when the game has n_jobs > 1), and take the Spearman correlation between
the subsets' summed point values and their retrained utilities (the game's metric).

The examples are ``[p for o in game.owners for p in o]`` — the order of
``Valuation.point_values``; a subset keeps that order. LDS is computed by the
harness, never by a valuer.
"""
from __future__ import annotations

import numpy as np

from bench.core.errors import ConfigError


def lds_subsets(n: int, m_subsets: int, frac: float, seed: int) -> list[list[int]]:
    """M sorted index subsets of size round(frac·n), seeded."""
    k = int(round(frac * n))
    if not 0 < k < n:
        raise ConfigError(f"lds.frac: {frac} of {n} examples gives a subset of {k}; choose frac in (0, 1) "
                          f"leaving at least one example in and out")
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(m_subsets)]


def lds(game, point_values, m_subsets: int = 32, frac: float = 0.5, seed: int = 0) -> dict:
    """LDS of ``point_values`` on ``game``.

    Returns dict(lds, pearson, n_subsets, frac, seed, subset_size, predicted [M],
    utilities [M], subsets [M][k] (indices into the example order)).
    """
    from scipy import stats

    pairs = [p for o in game.owners for p in o]
    v = np.asarray(point_values, dtype=np.float64)
    if v.shape != (len(pairs),):
        raise ConfigError(f"lds.point_values: shape {v.shape} but the game has {len(pairs)} training examples; "
                          f"pass Valuation.point_values of this game")
    if not np.all(np.isfinite(v)):
        raise ConfigError("lds.point_values: non-finite values; the valuer failed")
    if m_subsets < 3:
        raise ConfigError(f"lds.m_subsets: {m_subsets} < 3 gives no rank correlation; use >= 3 (e.g. 32)")
    subsets = lds_subsets(len(pairs), m_subsets, frac, seed)
    predicted = np.array([v[s].sum() for s in subsets])
    utilities = np.asarray(game.subset_utilities([[pairs[i] for i in s] for s in subsets]), dtype=np.float64)

    def corr(fn):
        if np.ptp(predicted) == 0 or np.ptp(utilities) == 0:
            return float("nan")
        return float(fn(predicted, utilities).statistic)

    return {"lds": corr(stats.spearmanr), "pearson": corr(stats.pearsonr), "n_subsets": m_subsets,
            "frac": frac, "seed": seed, "subset_size": len(subsets[0]), "metric": game.metric,
            "predicted": predicted.tolist(), "utilities": utilities.tolist(), "subsets": subsets}
