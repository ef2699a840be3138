"""Sampling semivalue estimators over the game's retrained coalitions: Maximum-Sample-
Reuse Banzhaf and Owen sampling for Shapley. Players are owners; every coalition a
sampler asks for is a fine-tune through ``game.utility`` (cached, so one trained by
the ground truth, LOO or another sampler is reused, and counted in ``Cost``).

``msr_banzhaf``  (Wang & Jia, 2023, "Data Banzhaf"): draw coalitions S with every
                 player in w.p. ½; every sample serves every player:
                     φ_i = mean{v(S) : i ∈ S} − mean{v(S) : i ∉ S},
                 an unbiased estimate of the Banzhaf value (1/2^{n−1}) Σ_{S∌i} v(S∪i) − v(S)
                 once both sides have samples. Not efficient (Banzhaf values need not
                 sum to v(N) − v(∅)); it ranks owners, which is what fidelity scores.
``owen_shapley`` (Okhrati & Lipani, 2021): φ_i = ∫₀¹ e_i(q) dq with
                 e_i(q) = E[v(S_q ∪ i) − v(S_q)], S_q ∋ each other player w.p. q.
                 q runs over the Q midpoints (j + ½)/Q (a midpoint rule; e_i is a
                 polynomial of degree n − 1, so the quadrature error is O(1/Q²)); at each
                 q, K draws u ~ U[0,1]^n give S = {p ≠ i : u_p < q} for every player i
                 at once, and (antithetic) their mirrors from 1 − u.

pyDVL (the maintained implementations of both) requires numpy < 2 and cannot share
this environment; ``tests/peers/pydvl_crosscheck.py`` runs pyDVL 0.10 in a separate one
on a published utility table and ``tests/test_semivalues.py`` checks these estimators
against its recorded figures. (MSR draws a coalition as ``rng.random(n) < ½`` from
``default_rng(seed)``, as pyDVL's sampler does, so with the same seed the two give the
same samples and the same values; pyDVL's Owen grid is ``linspace(0, 1, Q)`` with
importance weights, not these midpoints, so its figures differ within the errors.)

Budget: the run's budget and ``max_fine_tunes`` (distinct coalitions) stop sampling;
the samples completed so far are kept (``budget_stop`` says why), as for mc_shapley.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bench.core.settings import Settings, setting
from valuers.base import Budget, BudgetExhausted, CostMeter, Valuation


@dataclass
class SamplerResult:
    values: np.ndarray           # [n]
    stderr: np.ndarray           # [n] Monte Carlo standard error
    n_samples: int               # coalition draws (MSR) or draws per q x Q (Owen), completed
    n_coalitions: int            # distinct coalitions evaluated
    budget_stop: str | None = None
    history: list = field(default_factory=list)


def _memo(utility: Callable[[int], float]):
    cache: dict[int, float] = {}

    def v(mask: int) -> float:
        if mask not in cache:
            cache[mask] = float(utility(mask))
        return cache[mask]
    return v, cache


def _bits(mask_rows: np.ndarray) -> np.ndarray:
    """Bool rows [K, n] -> int bitmasks [K]."""
    return (mask_rows.astype(np.int64) << np.arange(mask_rows.shape[1])).sum(1)


def msr_banzhaf(utility: Callable[[int], float], n: int, rng: np.random.Generator, n_samples: int,
                check_every: int = 16) -> SamplerResult:
    """MSR Banzhaf with ``n_samples`` uniform coalitions (every player in w.p. ½), drawn in
    order (row k of one ``rng.random((n_samples, n))`` call = the k-th draw)."""
    v, cache = _memo(utility)
    member = rng.random((n_samples, n)) < 0.5
    masks = _bits(member)
    u, stop = np.zeros(n_samples), None
    for k, m in enumerate(masks):
        try:
            u[k] = v(int(m))
        except BudgetExhausted as e:
            if k == 0:
                raise
            stop = str(e)
            member, u = member[:k], u[:k]
            break
    done = len(u)
    # running estimates every check_every samples, from cumulative sums
    at = np.arange(check_every, done + 1, check_every) - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        s_in, k_in = np.cumsum(member * u[:, None], 0)[at], np.cumsum(member, 0)[at]
        s_out, k_out = np.cumsum(~member * u[:, None], 0)[at], np.cumsum(~member, 0)[at]
        history = list(s_in / k_in - s_out / k_out)
    values, se = _msr_estimate(member, u)
    return SamplerResult(values, se, done, len(cache), stop, history)


def _msr_estimate(member: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per player: mean u over samples containing it − mean over the others, and the standard
    error of that difference (NaN where a side has < 2 samples; value NaN where it has none)."""
    def side(mask):
        k = mask.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (mask * u[:, None]).sum(0) / k
            var = (mask * (u[:, None] - mean) ** 2).sum(0) / (k - 1)
            se = np.where(k > 1, np.sqrt(var / k), np.nan)
        return np.where(k > 0, mean, np.nan), se
    (mi, si), (mo, so) = side(member), side(~member)
    return mi - mo, np.hypot(si, so)


def owen_shapley(utility: Callable[[int], float], n: int, rng: np.random.Generator, n_q: int, n_per_q: int,
                 antithetic: bool = True) -> SamplerResult:
    """Owen-sampling Shapley: Q = ``n_q`` midpoints q, ``n_per_q`` draws each (x2 antithetic)."""
    v, cache = _memo(utility)
    qs = (np.arange(n_q) + 0.5) / n_q
    means, variances, done, stop = [], [], 0, None
    for q in qs:
        per_draw = []
        try:
            for _ in range(n_per_q):
                u = rng.random(n)
                mirrors = (u, 1.0 - u) if antithetic else (u,)
                marg = np.zeros(n)
                for w in mirrors:
                    inside = w < q
                    for i in range(n):
                        s = int(_bits(inside[None])[0]) & ~(1 << i)
                        marg[i] += v(s | (1 << i)) - v(s)
                per_draw.append(marg / len(mirrors))
                done += 1
        except BudgetExhausted as e:
            if not means and not per_draw:
                raise
            stop = str(e)
        if per_draw:
            x = np.asarray(per_draw)
            means.append(x.mean(0))
            variances.append(x.var(0, ddof=1) / len(x) if len(x) > 1 else np.full(n, np.nan))
        if stop:
            break
    # a stop mid-grid leaves the integral over the q reached so far: flagged in budget_stop
    m = np.asarray(means)
    values = m.mean(0)
    se = np.sqrt(np.asarray(variances).sum(0)) / len(m)
    return SamplerResult(values, se, done, len(cache), stop)


@dataclass(frozen=True)
class _SamplerSettings(Settings):
    max_fine_tunes: int | None = setting(None, "distinct coalitions at most (the run's budget may be lower)",
                                         min=1)
    seed: int = setting(0, "sampling seed (combined with the game's seed)", min=0)


@dataclass(frozen=True)
class MSRSettings(_SamplerSettings):
    prefix = "valuer.msr_banzhaf"
    n_samples: int = setting(256, "coalitions drawn (each player in w.p. 1/2); repeats cost no fine-tune", min=2)


@dataclass(frozen=True)
class OwenSettings(_SamplerSettings):
    prefix = "valuer.owen_shapley"
    n_q: int = setting(8, "midpoints q of the integral over [0, 1]", min=1)
    n_per_q: int = setting(4, "coalition draws per q (x2 with antithetic)", min=1)
    antithetic: bool = setting(True, "pair each draw u with 1 - u")


class _Sampler:
    settings_cls: type = _SamplerSettings

    def __init__(self, name: str, **settings):
        self.name = name
        self.settings = self.settings_cls.of(settings, prefix=f"valuer.{name}")

    def sample(self, game, rng) -> SamplerResult:
        raise NotImplementedError

    def value(self, game, budget: Budget) -> Valuation:
        s = self.settings
        meter = CostMeter(game)
        rng = np.random.default_rng(s.seed + 7919 * game.seed)
        with meter.phase("fine_tune+score"), game.metered(Budget(max_fine_tunes=s.max_fine_tunes)):
            res = self.sample(game, rng)
        values = np.nan_to_num(res.values)          # a player never sampled on one side: no evidence, 0
        return Valuation(values, stderr=res.stderr, cost=meter.cost(), extras={
            "n_samples": res.n_samples, "n_coalitions": res.n_coalitions, "budget_stop": res.budget_stop,
            "unsampled_players": int(np.isnan(res.values).sum()),
            "history": [list(map(float, h)) for h in res.history]})


class MSRBanzhaf(_Sampler):
    settings_cls = MSRSettings

    def __init__(self, name: str = "msr_banzhaf", **settings):
        super().__init__(name, **settings)

    def sample(self, game, rng) -> SamplerResult:
        return msr_banzhaf(game.utility, game.n, rng, self.settings.n_samples)


class OwenShapley(_Sampler):
    settings_cls = OwenSettings

    def __init__(self, name: str = "owen_shapley", **settings):
        super().__init__(name, **settings)

    def sample(self, game, rng) -> SamplerResult:
        s = self.settings
        return owen_shapley(game.utility, game.n, rng, s.n_q, s.n_per_q, s.antithetic)
