"""Linear datamodeling score (LDS; Park et al., 2023, as in dattri and Kronfluence).

Draw M random subsets holding ``frac`` of the training examples and retrain on each
through the game (DPO from the base on exactly those pairs, cached by content,
parallel when the game has n_jobs > 1) under R training seeds (``lds.seeds``),
*disjoint from the valuation seeds*, so no valuation is scored against fine-tunes
with its own initialisation and data order (``LdsTargets``).

**Per-pair LDS** (``pair_lds``), for valuers with a training-example × eval-pair
score matrix (``Valuation.pair_scores``): for every eval pair z, the Spearman
correlation across the M subsets between the predicted ``Σ_{i∈subset} scores[i, z]``
and the mean over the R seeds of the retrained model's implicit reward margin β·d_z
(``train.pair_metrics``); LDS is the mean over eval pairs. One target: log σ(β·d) is a
monotone map of the margin, and Spearman ignores monotone maps.

**Its ceiling is the ceiling of the target actually scored** (``sb_ceiling``): with r(z)
the correlation across subsets between two single seeds' targets, the R-seed mean has
reliability ρ_R = R·r / (1 + (R − 1)·r) (Spearman–Brown), and a perfect noise-free
predictor reaches √ρ_R against it. Spearman ρ is turned into Pearson r and back by the
bivariate-normal relations r = 2 sin(πρ/6), ρ = (6/π) arcsin(r/2). (A held-out design,
one seed against the mean of the others, scores the valuer against a noisier target
and still leaves a perfect predictor above the seed-vs-seeds correlation, so it was
not chosen.) The first version used r itself: a perfect predictor scored up to 1.7×
that "ceiling". ``tests/test_lds.py`` checks that a perfect predictor's LDS / ceiling
is ≤ 1 within Monte Carlo error on a linear game with known noise, and tends to 1.

**Its interval has every source of variance.** The M subsets are shared by every eval
pair, so a bootstrap over eval pairs alone understates the error (≈ 3–4× in the
simulation of ``tests/test_lds.py``). Each record keeps B two-way bootstrap
replicates (subsets and eval pairs resampled jointly, with the same draws for every
valuer and the ceiling: ``Draws``); ``combine`` adds the valuer's seed-to-seed spread
(variance of the seed mean = bootstrap variance + between-seed variance / S, with
Welch–Satterthwaite degrees of freedom) and ``combine(..., minus=...)`` gives the paired
difference of two valuers on the same subsets, pairs and seeds.

**Aggregate LDS** (``aggregate_lds``), for valuers with only per-example values: the
Spearman correlation across subsets between the summed point values and the game's
seed-averaged scalar utility, beside its own Spearman–Brown ceiling. Labelled apart:
one scalar per subset is dominated by training noise, so the two are never mixed.

The examples are ``game.flat_pairs()``, the order of ``Valuation.point_values``; a
subset keeps that order. LDS is computed by the harness, never by a valuer. Ranks
treat values equal within ``ranks.RTOL`` as tied.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import stats

from bench.core.errors import ConfigError
from bench.core.ranks import pearson_columns, snap_ties, spearman
from bench.core.train import PAIR_METRICS, pair_metrics

TARGET = "margin"        # the per-pair target (log σ of it ranks the same)
N_BOOT = 400             # two-way bootstrap replicates kept per record


def lds_subsets(n: int, m_subsets: int, frac: float, seed: int) -> list[list[int]]:
    """M sorted index subsets of size round(frac·n), seeded."""
    k = int(round(frac * n))
    if not 0 < k < n:
        raise ConfigError(f"lds.frac: {frac} of {n} examples gives a subset of {k}; choose frac in (0, 1) "
                          f"leaving at least one example in and out")
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(m_subsets)]


def sb_ceiling(r_spearman, n_seeds: int):
    """What a perfect noise-free predictor's Spearman ρ reaches against the mean of
    ``n_seeds`` seeds' targets when two single seeds' targets correlate at
    ``r_spearman`` (Spearman–Brown, through the bivariate-normal relation between
    Spearman ρ and Pearson r; a non-positive r leaves nothing to predict: 0)."""
    r = 2 * np.sin(np.pi * np.asarray(r_spearman, float) / 6)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(r > 0, n_seeds * r / (1 + (n_seeds - 1) * r), 0.0)
    out = (6 / np.pi) * np.arcsin(np.sqrt(np.clip(rel, 0, 1)) / 2)
    return np.where(np.isfinite(r), out, np.nan)


def _rho_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ per column of two [M, E] arrays whose ties are already merged."""
    return pearson_columns(stats.rankdata(a, axis=0), stats.rankdata(b, axis=0))


@dataclass(frozen=True)
class Draws:
    """B two-way bootstrap draws: subsets (rows of ``m``: M indices with replacement)
    and eval pairs (rows of ``z``: E indices), from ``seed``. The same for every valuer
    of a job, so their replicates pair."""
    m: np.ndarray     # [B, M]
    z: np.ndarray     # [B, E]

    @classmethod
    def of(cls, n_subsets: int, n_pairs: int, n_boot: int = N_BOOT, seed: int = 0) -> "Draws":
        rng = np.random.default_rng([int(seed), 20261207])
        return cls(rng.integers(0, n_subsets, (n_boot, n_subsets)), rng.integers(0, n_pairs, (n_boot, n_pairs)))


@contextlib.contextmanager
def _nan_ok():
    """A NaN-aware mean of an all-NaN slice is NaN by design here (an eval pair or a draw
    with no defined ρ, e.g. constant targets on a tiny game): no RuntimeWarning for it."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _replicates(pred: np.ndarray, target: np.ndarray, draws: Draws) -> np.ndarray:
    """Mean over resampled eval pairs of the per-pair Spearman ρ over resampled subsets,
    per draw ([B]); ``pred``, ``target``: [M, E] with ties merged."""
    out = np.empty(len(draws.m))
    with _nan_ok():
        for b, (m, z) in enumerate(zip(draws.m, draws.z)):
            out[b] = np.nanmean(_rho_columns(pred[m], target[m])[z])
    return out


@dataclass(frozen=True)
class LdsTargets:
    """What the M subsets' retrained models scored, under each of R seeds (disjoint from
    the valuation seeds)."""
    subsets: list[list[int]]               # [M] index subsets of game.flat_pairs()
    seeds: list[int]                       # [R]
    metric: str                            # the game's scalar metric
    utilities: np.ndarray                  # [R, M] the game's metric
    pairs: dict[str, np.ndarray]           # per-pair target name -> [R, M, E]
    boot_seed: int = 0
    n_boot: int = N_BOOT

    @property
    def n_subsets(self) -> int:
        return len(self.subsets)

    @property
    def n_eval(self) -> int:
        return self.pairs[TARGET].shape[2]

    @cached_property
    def draws(self) -> Draws:
        return Draws.of(self.n_subsets, self.n_eval, self.n_boot, self.boot_seed)

    @cached_property
    def target(self) -> np.ndarray:
        """The scored target: the seed mean of the per-pair margin, ties merged ([M, E])."""
        return snap_ties(self.pairs[TARGET].mean(axis=0))

    def seed_agreement(self, m=None) -> np.ndarray:
        """Per eval pair, the Spearman ρ across subsets (rows ``m``, default all) between
        two single seeds' targets, averaged over every pair of seeds ([E]; NaN with one seed)."""
        T = self.pairs[TARGET]
        idx = np.arange(self.n_subsets) if m is None else m
        if T.shape[0] < 2:
            return np.full(T.shape[2], np.nan)
        with _nan_ok():
            return np.nanmean([_rho_columns(snap_ties(T[a][idx]), snap_ties(T[b][idx]))
                               for a, b in itertools.combinations(range(T.shape[0]), 2)], axis=0)

    def _ceiling(self, agreement: np.ndarray) -> float:
        """The Spearman–Brown ceiling of the mean agreement over eval pairs. Taken of the
        mean, not pair by pair: r(z) from M subsets is noisy and the map is concave, so
        a mean of per-pair ceilings falls below what a perfect predictor reaches (1.13×
        at M = 16 in the simulation); the ceiling of the mean is above the mean of the
        true per-pair ceilings (Jensen), so a perfect predictor stays at or below it."""
        with _nan_ok():
            r = float(np.nanmean(agreement)) if np.isfinite(agreement).any() else float("nan")
        return float(sb_ceiling(r, len(self.seeds))) if math.isfinite(r) else float("nan")

    @cached_property
    def ceiling(self) -> float:
        """What a perfect noise-free predictor's per-pair LDS reaches against the R-seed mean."""
        return self._ceiling(self.seed_agreement())

    @cached_property
    def ceiling_replicates(self) -> np.ndarray:
        """The ceiling under each two-way bootstrap draw ([B])."""
        return np.array([self._ceiling(self.seed_agreement(m)[z]) for m, z in zip(self.draws.m, self.draws.z)])

    def summary(self) -> dict:
        one = self.seed_agreement()
        return {"n_subsets": self.n_subsets, "subset_size": len(self.subsets[0]), "seeds": list(self.seeds),
                "metric": self.metric, "target": TARGET, "ceiling": self.ceiling,
                "seed_vs_seed": float(np.nanmean(one)) if np.isfinite(one).any() else float("nan"),
                "bootstrap": {"n": self.n_boot, "seed": self.boot_seed, "draws": "two-way: subsets x eval pairs"},
                "ceiling_replicates": _compact(self.ceiling_replicates)}


def _compact(x) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in np.asarray(x, float)]


def lds_targets(games, m_subsets: int, frac: float, seed: int, n_boot: int = N_BOOT) -> LdsTargets:
    """Retrain the M subsets under each game's seed (``games``: one game under R seeds,
    disjoint from the valuation seeds) and read the scalar and per-pair targets off the
    records."""
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
                      {k: np.asarray(v, float) for k, v in per_pair.items()}, boot_seed=seed, n_boot=n_boot)


def predictions(pair_scores, targets: LdsTargets) -> np.ndarray:
    """The predicted target of every subset and eval pair, Σ_{i∈S_m} scores[i, z] ([M, E])."""
    S = np.asarray(pair_scores, dtype=np.float64)
    E = targets.n_eval
    if S.ndim != 2 or S.shape[1] != E:
        raise ValueError(f"pair_scores has shape {S.shape}; expected [N, {E}] (training examples × eval pairs)")
    if not np.all(np.isfinite(S)):
        raise ValueError("pair_scores: non-finite scores")
    return np.stack([S[s].sum(axis=0) for s in targets.subsets])


def pair_lds(pair_scores, targets: LdsTargets) -> dict:
    """Per-pair LDS of a score matrix [N, E] against the seed-mean margin: ``{lds, lo, hi
    (two-way bootstrap of this valuation alone), n_pairs, ceiling, ratio, per_pair [E],
    replicates [B], target}``."""
    pred = snap_ties(predictions(pair_scores, targets))
    with _nan_ok():
        per_pair = _rho_columns(pred, targets.target)
    reps = _replicates(pred, targets.target, targets.draws)
    m = float(np.nanmean(per_pair)) if np.isfinite(per_pair).any() else float("nan")
    lo, hi = (np.nanquantile(reps, [0.025, 0.975]) if np.isfinite(reps).any() else (np.nan, np.nan))
    c = targets.ceiling
    return {"lds": m, "lo": float(lo), "hi": float(hi), "n_pairs": int(np.isfinite(per_pair).sum()),
            "ceiling": c, "ratio": m / c if c > 0 else float("nan"), "per_pair": _compact(per_pair),
            "replicates": _compact(reps), "target": TARGET, "interval": "two-way bootstrap (subsets x eval pairs)"}


def combine(per_seed: list[dict], minus: list[dict] | None = None, ceiling_reps=None,
            level: float = 0.95) -> dict | None:
    """A valuer's per-pair LDS over its seeds, with every source of variance: the mean
    over seeds of ``lds``; its variance = the two-way bootstrap variance of the seed mean
    (replicates paired across seeds: the same draws) + the between-seed variance / S;
    a t-interval with Welch–Satterthwaite degrees of freedom, clipped to [−1, 1]
    ([−2, 2] for a difference). ``minus``: another valuer's records on the same seeds:
    the paired difference (with a two-sided p from the same t). ``ceiling_reps``: also
    the ratio to the ceiling with its interval. None without replicates."""
    def rows(recs):
        return {int(r["seed"]): r for r in recs if r.get("replicates") and r.get("lds") is not None
                and math.isfinite(r["lds"])}
    a = rows(per_seed)
    b = rows(minus) if minus is not None else None
    seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
    if not seeds:
        return None
    val = np.array([a[s]["lds"] - (b[s]["lds"] if b else 0.0) for s in seeds])
    reps = np.array([[np.nan if x is None else x for x in a[s]["replicates"]] for s in seeds], float)
    if b:
        reps = reps - np.array([[np.nan if x is None else x for x in b[s]["replicates"]] for s in seeds], float)

    def interval(v, R, bound):
        S = len(v)
        with _nan_ok():
            vb = float(np.nanvar(np.nanmean(R, axis=0), ddof=1))
        vs = float(np.var(v, ddof=1)) / S if S > 1 else 0.0
        var = vb + vs
        df = math.inf if vs == 0 else var ** 2 * (S - 1) / vs ** 2     # bootstrap part: ~known
        q = stats.norm.ppf((1 + level) / 2) if math.isinf(df) else stats.t.ppf((1 + level) / 2, df)
        m, se = float(np.mean(v)), math.sqrt(var)
        p = float(2 * (stats.norm.sf(abs(m) / se) if math.isinf(df) else stats.t.sf(abs(m) / se, df))) \
            if se > 0 else float("nan")
        return m, max(m - q * se, -bound), min(m + q * se, bound), se, df, p
    m, lo, hi, se, df, p = interval(val, reps, 2.0 if b else 1.0)
    out = {"lds": m, "lo": lo, "hi": hi, "se": se, "df": df, "p": p, "n_seeds": len(seeds)}
    if ceiling_reps is not None and not b:
        c = np.array([np.nan if x is None else x for x in ceiling_reps], float)
        with _nan_ok():
            c0 = float(np.nanmean(c))
        per_seed_ceiling = a[seeds[0]].get("ceiling") or c0
        r, rlo, rhi, *_ = interval(val / per_seed_ceiling, reps / c[None, :], math.inf)
        out.update(ceiling=per_seed_ceiling, ratio=r, ratio_lo=rlo, ratio_hi=rhi)
    return out


def aggregate_lds(point_values, targets: LdsTargets) -> dict:
    """Spearman (and Pearson) across subsets of the summed point values with the game's
    seed-averaged scalar utility; its ceiling: the Spearman–Brown ceiling of that mean."""
    v = np.asarray(point_values, dtype=np.float64)
    n = max(max(s) for s in targets.subsets) + 1
    if v.ndim != 1 or v.size < n or not np.all(np.isfinite(v)):
        raise ValueError(f"point_values: need {n}+ finite values, got shape {v.shape}")
    pred = np.array([v[s].sum() for s in targets.subsets])
    u = targets.utilities.mean(axis=0)
    U = targets.utilities
    one = [spearman(U[a], U[b]) for a, b in itertools.combinations(range(len(U)), 2)]
    r = float(np.nanmean(one)) if one and np.isfinite(one).any() else float("nan")
    return {"lds": spearman(pred, u), "pearson": _corr(stats.pearsonr, pred, u),
            "ceiling": float(sb_ceiling(r, len(U))) if math.isfinite(r) else float("nan"),
            "metric": targets.metric, "n_subsets": targets.n_subsets}


def _corr(fn, a, b) -> float:
    """A scipy correlation statistic of two vectors; NaN when either is constant."""
    return float(fn(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")


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
    return {"lds": spearman(predicted, utilities), "pearson": _corr(stats.pearsonr, predicted, utilities),
            "n_subsets": m_subsets,
            "frac": frac, "seed": seed, "subset_size": len(subsets[0]), "metric": game.metric,
            "predicted": predicted.tolist(), "utilities": utilities.tolist(), "subsets": subsets}
