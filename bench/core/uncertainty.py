"""Uncertainty of the benchmark's numbers: intervals, paired differences, and the
consensus ground truth of a game trained under several seeds.

Which interval where (the unit of resampling is what varies between repetitions):

``mean_ci``       (``bench.core.metrics``) Student-t over a handful of *seeds*: with
                  S = 3 a percentile bootstrap has 10 distinct resamples and covers
                  about 75 % instead of 95 %; the t-interval is exact for normal
                  data (``tests/test_uncertainty.py`` measures both coverages).
``t_interval``    the same with a floor on the spread of a coarse statistic (ρ over
                  4 owners moves in steps of 0.2: equal values are not zero
                  variance) and clipped to the statistic's range.
``paired_ci``     that interval on per-seed *differences* of two valuers scored on
                  the same games (the seed-to-seed variation they share cancels),
                  with the exact sign-flip p-value (``sign_flip_p``: no normality;
                  its smallest two-sided value is 2/2^S) and the TOST p of
                  equivalence within a declared margin (``tost_p``). Tables mark
                  differences by Benjamini–Hochberg adjusted p (``bh_adjust``).
``bootstrap_ci``  percentile bootstrap over many units (eval pairs, owners), where
                  no distribution is assumed and the resamples are plentiful.
                  (Per-pair LDS shares its subsets across eval pairs: it has its
                  own two-way interval, ``bench.core.lds``.)

``Consensus``: the exact retraining Shapley of the seed-averaged utility table
(Shapley is linear, so it is the mean of the per-seed values), its standard error
per owner, its split-half agreement, and the *held-out* consensus of every seed (the
mean of the other seeds' values): a valuer run on seed s's game is scored against
the consensus of the other seeds, so agreeing with seed s's own training noise earns
nothing, and the exact retraining Shapley of seed s scored the same way is the
*one-seed exact* reference: what one retraining run reaches. It is not a ceiling: an
estimator that averages training noise away can beat it.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from scipy import stats

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


def sign_flip_p(d, alternative: str = "two-sided") -> float:
    """Exact sign-flip (permutation) test of "the paired differences ``d`` are symmetric
    about 0": the share of the 2^S sign patterns whose sum is at least as extreme as the
    observed one (``"greater"``: Σ ≥ observed; ``"less"``: Σ ≤ observed). No normality
    assumed; with S differences the smallest two-sided p is 2/2^S (S = 3: 0.25, S = 6:
    0.031), so a handful of seeds shows nothing whatever their values. S > 20: 2^16
    random patterns. NaN with no difference."""
    d = np.asarray(d, float)
    d = d[np.isfinite(d)]
    S = d.size
    if S == 0:
        return NAN
    if S <= 20:
        signs = 1 - 2 * ((np.arange(2 ** S)[:, None] >> np.arange(S)) & 1)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(2 ** 16, S))
    sums, obs = signs @ d, d.sum()
    eps = 1e-12 * max(1.0, float(np.abs(d).sum()))
    if alternative == "greater":
        return float(np.mean(sums >= obs - eps))
    if alternative == "less":
        return float(np.mean(sums <= obs + eps))
    return float(np.mean(np.abs(sums) >= abs(obs) - eps))


def tost_p(d, margin: float) -> float:
    """Two one-sided sign-flip tests of equivalence: H0 "mean ≤ −margin" (on d + margin)
    and H0 "mean ≥ +margin" (on d − margin); the larger p. Small = the difference is
    shown to lie within ±margin."""
    d = np.asarray(d, float)
    d = d[np.isfinite(d)]
    if d.size == 0 or not margin > 0:
        return NAN
    return max(sign_flip_p(d + margin, "greater"), sign_flip_p(d - margin, "less"))


def bh_adjust(p) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of a family of tests; NaN entries
    are not tests (left NaN, not counted). Rejecting q ≤ α controls the false-discovery
    rate at α for independent or positively dependent tests."""
    p = np.asarray(p, float)
    q = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return q
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    q[order] = np.minimum(adj, 1.0)
    return q


def t_interval(x, level: float = 0.95, sd_floor: float = 0.0,
               bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean of ``x`` (None/NaN skipped) whose
    standard deviation is at least ``sd_floor``, clipped to ``bounds``.

    ``sd_floor`` is for coarse statistics: Spearman ρ over n owners moves in steps of
    12 / (n(n² − 1)) (0.2 at n = 4), so S equal values are not evidence of zero spread;
    each value is known only to within its step, whose rounding has standard deviation
    step / √12 (step / √6 for a difference of two). ``bounds``: the statistic's range
    (a correlation's [−1, 1]); the true mean lies inside it, so clipping never loses
    coverage. The same helper serves closing lines, tables, W&B and the README."""
    x = _finite(x)
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size == 1:
        return mean, NAN, NAN
    sd = max(float(x.std(ddof=1)), float(sd_floor))
    half = float(stats.t.ppf((1 + level) / 2, df=x.size - 1) * sd / math.sqrt(x.size))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


def spearman_step(n: int) -> float:
    """The step of Spearman ρ over n items without ties: 12 / (n(n² − 1))."""
    return 12.0 / (n * (n * n - 1)) if n >= 2 else NAN


@dataclass(frozen=True)
class Paired:
    """The mean of per-unit differences a − b, its t-interval (floored and bounded, see
    ``t_interval``), the exact sign-flip p-value, and the TOST p-value of equivalence
    within ``margin`` (NaN without a margin)."""
    mean: float
    lo: float
    hi: float
    n: int
    p: float = NAN
    p_equiv: float = NAN

    @property
    def excludes_zero(self) -> bool:
        return bool(self.n >= 2 and (self.lo > 0 or self.hi < 0))

    @property
    def sign(self) -> str:
        """'+' / '−' when the interval excludes 0 (no multiplicity correction: the tables
        mark by BH-adjusted sign-flip p instead, ``bench.analysis.verdicts``)."""
        return "~" if not self.excludes_zero else ("+" if self.mean > 0 else "−")

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "excludes_zero": self.excludes_zero,
                "p": self.p, "p_equiv": self.p_equiv}


def paired_ci(a, b, level: float = 0.95, sd_floor: float = 0.0, bounds: tuple[float, float] | None = None,
              margin: float | None = None) -> Paired:
    """Differences ``a[i] - b[i]`` over the units both have (None/NaN in either drops the
    unit): ``t_interval`` of their mean, the exact sign-flip p and (with ``margin``) the
    TOST p. Identical differences of a coarse statistic get the ``sd_floor`` width, not 0."""
    a = np.array([np.nan if v is None else v for v in a], float)
    b = np.array([np.nan if v is None else v for v in b], float)
    if a.shape != b.shape:
        raise ValueError(f"paired_ci: {a.shape} vs {b.shape}; pair the same units")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    m, lo, hi = t_interval(d, level, sd_floor, bounds)
    return Paired(m, lo, hi, int(d.size), sign_flip_p(d) if d.size else NAN,
                  tost_p(d, margin) if margin else NAN)


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
        """The one-seed exact reference on ``seed``: fidelity of that seed's exact values to
        the others' consensus. A reference point, not a ceiling: an estimator that averages
        training noise away can beat it."""
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

