"""Uncertainty of the benchmark's numbers: intervals, paired differences, and the
consensus ground truth of a game trained under several seeds.

Which interval where (the unit of resampling is what varies between repetitions):

``mean_ci``       (``bench.core.metrics``) Student-t over a handful of *seeds*: with
                  S = 3 a percentile bootstrap has 10 distinct resamples and covers
                  about 75 % instead of 95 %; the t-interval is exact for normal
                  data (``tests/test_uncertainty.py`` measures both coverages).
``paired_ci``     the same t-interval on per-seed *differences* of two valuers
                  scored on the same games: the seed-to-seed variation they share
                  cancels, so a difference can be shown that two overlapping
                  intervals would hide.
``bootstrap_ci``  percentile bootstrap over many units (eval pairs, owners), where
                  no distribution is assumed and the resamples are plentiful.

``Consensus``: the exact retraining Shapley of the seed-averaged utility table
(Shapley is linear, so it is the mean of the per-seed values), its standard error
per owner, its split-half agreement, and the *held-out* consensus of every seed (the
mean of the other seeds' values): a valuer run on seed s's game is scored against
the consensus of the other seeds, so agreeing with seed s's own training noise earns
nothing, and the exact retraining Shapley of seed s scored the same way is the noise
ceiling, the fidelity a perfect one-seed estimator would reach.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from bench.core.metrics import NAN, fidelity, mean_ci


def _finite(x) -> np.ndarray:
    raw = np.asarray(x if isinstance(x, np.ndarray) else list(x), dtype=object).ravel()
    x = np.array([np.nan if v is None else v for v in raw], dtype=float)
    return x[np.isfinite(x)]


def bootstrap_ci(x, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap of the mean of ``x`` (None/NaN skipped).
    Fewer than 2 values: no interval (NaN bounds)."""
    x = _finite(x)
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size < 2:
        return mean, NAN, NAN
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(lo), float(hi)


@dataclass(frozen=True)
class Paired:
    """The mean of per-unit differences a − b with its t-interval."""
    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return bool(self.n >= 2 and (self.lo > 0 or self.hi < 0))

    @property
    def sign(self) -> str:
        """'+' (a > b shown), '−' (a < b shown), '~' (not shown)."""
        return "~" if not self.excludes_zero else ("+" if self.mean > 0 else "−")

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "excludes_zero": self.excludes_zero}


def paired_ci(a, b, level: float = 0.95) -> Paired:
    """Differences ``a[i] - b[i]`` over the units both have (None/NaN in either drops the
    unit), Student-t interval of their mean."""
    a = np.array([np.nan if v is None else v for v in a], float)
    b = np.array([np.nan if v is None else v for v in b], float)
    if a.shape != b.shape:
        raise ValueError(f"paired_ci: {a.shape} vs {b.shape}; pair the same units")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    m, lo, hi = mean_ci(d, level)
    if d.size >= 2 and np.ptp(d) == 0:       # identical differences: no spread, the interval is the point
        lo = hi = m
    return Paired(m, lo, hi, int(d.size))


# ------------------------------------------------------------------ consensus ground truth

@dataclass(frozen=True)
class Consensus:
    """The exact Shapley values of one game under S training seeds (``phi``: [S, n],
    one row per seed, each the exact Shapley of that seed's utility table)."""
    seeds: tuple[int, ...]
    phi: np.ndarray           # [S, n]
    gains: np.ndarray         # [S]  v(N) - v(∅) per seed

    @classmethod
    def of(cls, seeds, per_seed_phi, gains) -> "Consensus":
        phi = np.asarray(per_seed_phi, float)
        if phi.ndim != 2 or phi.shape[0] != len(seeds):
            raise ValueError(f"Consensus: {phi.shape} values for {len(seeds)} seeds")
        if len(seeds) < 2:
            raise ValueError("Consensus: needs >= 2 seeds (one seed has no held-out reference and no ceiling)")
        return cls(tuple(int(s) for s in seeds), phi, np.asarray(gains, float))

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @cached_property
    def values(self) -> np.ndarray:
        """Shapley of the seed-averaged table (= the mean of the per-seed values)."""
        return self.phi.mean(axis=0)

    @cached_property
    def se(self) -> np.ndarray:
        """Standard error of each owner's consensus value over seeds."""
        return self.phi.std(axis=0, ddof=1) / math.sqrt(self.n_seeds)

    def index(self, seed: int) -> int:
        return self.seeds.index(int(seed))

    def held_out(self, seed: int) -> np.ndarray:
        """The consensus of every seed but ``seed``: what a valuation on ``seed``'s game is scored against."""
        k = self.index(seed)
        return np.delete(self.phi, k, axis=0).mean(axis=0)

    def held_out_gain(self, seed: int) -> float:
        return float(np.delete(self.gains, self.index(seed)).mean())

    def ceiling(self, seed: int) -> dict:
        """The noise ceiling on ``seed``: fidelity of that seed's exact values to the others' consensus."""
        return fidelity(self.phi[self.index(seed)], self.held_out(seed), self.held_out_gain(seed))

    @cached_property
    def split_half(self) -> float:
        """Mean Spearman ρ between the consensus of one half of the seeds and of the other,
        over every split into ⌊S/2⌋ and the rest (the reference's own reproducibility)."""
        S = self.n_seeds
        rhos = []
        for half in itertools.combinations(range(S), S // 2):
            rest = [i for i in range(S) if i not in half]
            rhos.append(fidelity(self.phi[list(half)].mean(0), self.phi[rest].mean(0))["spearman"])
        return float(np.nanmean(rhos)) if np.isfinite(rhos).any() else NAN

    @cached_property
    def seed_to_seed(self) -> tuple[float, float, float]:
        """Spearman ρ of every pair of seeds' exact values: mean and t-interval over pairs."""
        rhos = [fidelity(self.phi[i], self.phi[j])["spearman"]
                for i, j in itertools.combinations(range(self.n_seeds), 2)]
        return mean_ci(rhos)

    def summary(self) -> dict:
        s2s = self.seed_to_seed
        return {"seeds": list(self.seeds), "values": self.values.tolist(), "se": self.se.tolist(),
                "per_seed": self.phi.tolist(), "split_half_spearman": self.split_half,
                "seed_to_seed_spearman": {"mean": s2s[0], "lo": s2s[1], "hi": s2s[2]}}

