"""Linear datamodeling score (LDS; Park et al., 2023, as in dattri and Kronfluence).

Draw M random subsets holding ``frac`` of the training examples and retrain on each
through the game (DPO from the base on exactly those pairs, cached by content,
parallel when the game has n_jobs > 1) under R training seeds (``LdsTargets``).

**Per-pair LDS** (``pair_lds``), for valuers with a training-example × eval-pair
score matrix (``Valuation.pair_scores``): for every eval pair j, the Spearman
correlation across the M subsets between the predicted ``Σ_{i∈subset} scores[i, j]``
and the retrained model's continuous per-pair target (``train.pair_metrics``: the
implicit reward margin β·d_j, or log σ(β·d_j)), averaged over the R seeds; LDS is
the mean over eval pairs, with a bootstrap interval over eval pairs. Its **noise
ceiling** (``pair_ceiling``) is the same statistic with one seed's retrained targets
predicting another's (every pair of seeds): what the retraining noise leaves to
predict. A predictor of the noise-free target can exceed it, as it is scored against
an R-seed mean that is less noisy than one seed.

**Aggregate LDS** (``aggregate_lds``), for valuers with only per-example values: the
Spearman correlation across subsets between the summed point values and the game's
scalar utility (its metric over the whole eval set), seed-averaged. Labelled apart:
one scalar per subset is dominated by training noise, so the two are never mixed.

The examples are ``game.flat_pairs()``, the order of ``Valuation.point_values``; a
subset keeps that order. LDS is computed by the harness, never by a valuer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bench.core.errors import ConfigError
from bench.core.train import PAIR_METRICS, pair_metrics
from bench.core.uncertainty import bootstrap_ci


def lds_subsets(n: int, m_subsets: int, frac: float, seed: int) -> list[list[int]]:
    """M sorted index subsets of size round(frac·n), seeded."""
    k = int(round(frac * n))
    if not 0 < k < n:
        raise ConfigError(f"lds.frac: {frac} of {n} examples gives a subset of {k}; choose frac in (0, 1) "
                          f"leaving at least one example in and out")
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(m_subsets)]


@dataclass(frozen=True)
class LdsTargets:
    """What the M subsets' retrained models scored, under each of R seeds."""
    subsets: list[list[int]]               # [M] index subsets of game.flat_pairs()
    seeds: list[int]                       # [R]
    metric: str                            # the game's scalar metric
    utilities: np.ndarray                  # [R, M] the game's metric
    pairs: dict[str, np.ndarray]           # per-pair target name -> [R, M, E]

    @property
    def n_subsets(self) -> int:
        return len(self.subsets)

    def summary(self) -> dict:
        return {"n_subsets": self.n_subsets, "subset_size": len(self.subsets[0]), "seeds": list(self.seeds),
                "metric": self.metric}


def lds_targets(games, m_subsets: int, frac: float, seed: int) -> LdsTargets:
    """Retrain the M subsets under each game's seed (``games``: one game under R seeds)
    and read the scalar and per-pair targets off the records."""
    if m_subsets < 3:
        raise ConfigError(f"lds.n_subsets: {m_subsets} < 3 gives no rank correlation; use >= 3 (e.g. 32)")
    pairs = [p for o in games[0].owners for p in o]
    subsets = lds_subsets(len(pairs), m_subsets, frac, seed)
    sets = [[pairs[i] for i in s] for s in subsets]
    utilities, per_pair = [], {k: [] for k in PAIR_METRICS}
    for g in games:
        utilities.append(g.subset_utilities(sets))
        base = g.record(0)
        targets = [pair_metrics(r["logp_chosen"], r["logp_rejected"], base["logp_chosen"], base["logp_rejected"],
                                g.train.beta) for r in (g.subset_record(s) for s in sets)]
        for k in PAIR_METRICS:
            per_pair[k].append(np.stack([t[k] for t in targets]))
    return LdsTargets(subsets, [g.seed for g in games], games[0].metric, np.asarray(utilities, float),
                      {k: np.asarray(v, float) for k, v in per_pair.items()})


def _spearman_columns(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Spearman ρ of every column of ``pred`` [M, E] with the same column of ``target``;
    NaN where a column is constant."""
    out = np.full(pred.shape[1], np.nan)
    for j in range(pred.shape[1]):
        if np.ptp(pred[:, j]) > 0 and np.ptp(target[:, j]) > 0:
            out[j] = stats.spearmanr(pred[:, j], target[:, j]).statistic
    return out


def _corr(fn, a, b) -> float:
    """A scipy correlation statistic of two vectors; NaN when either is constant."""
    return float(fn(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")


def _summary(per_pair: np.ndarray, ceiling: np.ndarray | None = None, seed: int = 0) -> dict:
    m, lo, hi = bootstrap_ci(per_pair, seed=seed)
    out = {"lds": m, "lo": lo, "hi": hi, "n_pairs": int(np.isfinite(per_pair).sum())}
    if ceiling is not None:
        c = float(np.nanmean(ceiling)) if np.isfinite(ceiling).any() else float("nan")
        out.update(ceiling=c, ratio=m / c if c > 0 else float("nan"))
    return out


def pair_ceiling(targets: LdsTargets, name: str) -> np.ndarray:
    """Per eval pair, the Spearman ρ across subsets of one seed's retrained target with
    another's, averaged over every pair of seeds ([E]; NaN with one seed)."""
    T = targets.pairs[name]
    if T.shape[0] < 2:
        return np.full(T.shape[2], np.nan)
    with np.errstate(all="ignore"):
        return np.nanmean([_spearman_columns(T[a], T[b])
                           for a, b in itertools.combinations(range(T.shape[0]), 2)], axis=0)


def pair_lds(pair_scores, targets: LdsTargets) -> dict:
    """Per-pair LDS of a score matrix [N, E] against every per-pair target:
    ``{name: {lds, lo, hi, n_pairs, ceiling, ratio, per_pair [E]}}``."""
    S = np.asarray(pair_scores, dtype=np.float64)
    E = next(iter(targets.pairs.values())).shape[2]
    if S.ndim != 2 or S.shape[1] != E:
        raise ValueError(f"pair_scores has shape {S.shape}; expected [N, {E}] (training examples × eval pairs)")
    if not np.all(np.isfinite(S)):
        raise ValueError("pair_scores: non-finite scores")
    pred = np.stack([S[s].sum(axis=0) for s in targets.subsets])            # [M, E]
    out = {}
    for name, T in targets.pairs.items():
        per_pair = _spearman_columns(pred, T.mean(axis=0))
        out[name] = {**_summary(per_pair, pair_ceiling(targets, name)), "per_pair": per_pair.tolist()}
    return out


def aggregate_lds(point_values, targets: LdsTargets) -> dict:
    """Spearman (and Pearson) across subsets of the summed point values with the game's
    seed-averaged scalar utility; its ceiling: one seed's utilities predicting another's."""
    v = np.asarray(point_values, dtype=np.float64)
    n = max(max(s) for s in targets.subsets) + 1
    if v.ndim != 1 or v.size < n or not np.all(np.isfinite(v)):
        raise ValueError(f"point_values: need {n}+ finite values, got shape {v.shape}")
    pred = np.array([v[s].sum() for s in targets.subsets])
    u = targets.utilities.mean(axis=0)
    U = targets.utilities
    ceil = [_corr(stats.spearmanr, U[a], U[b]) for a, b in itertools.combinations(range(len(U)), 2)]
    return {"lds": _corr(stats.spearmanr, pred, u), "pearson": _corr(stats.pearsonr, pred, u),
            "ceiling": float(np.nanmean(ceil)) if ceil and np.isfinite(ceil).any() else float("nan"),
            "metric": targets.metric, "n_subsets": targets.n_subsets}


def lds(game, point_values, m_subsets: int = 32, frac: float = 0.5, seed: int = 0) -> dict:
    """Aggregate LDS of ``point_values`` on one game (one seed; only its scalar utility),
    with the subsets' predictions and utilities: dict(lds, pearson, n_subsets, frac,
    seed, subset_size, metric, predicted [M], utilities [M], subsets [M][k])."""
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
    return {"lds": _corr(stats.spearmanr, predicted, utilities), "pearson": _corr(stats.pearsonr, predicted, utilities),
            "n_subsets": m_subsets,
            "frac": frac, "seed": seed, "subset_size": len(subsets[0]), "metric": game.metric,
            "predicted": predicted.tolist(), "utilities": utilities.tolist(), "subsets": subsets}
