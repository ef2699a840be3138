"""The shared Shapley engine: exact semivalues from a utility table, and permutation Monte Carlo.

Conventions: n players indexed 0..n-1. A coalition is an int bitmask (bit i set = player i
is in it). A utility *table* is a 1-D float array of length 2**n indexed by bitmask, so
table[0] = v(empty set) and table[-1] = v(N).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Callable, Iterable

import numpy as np
from scipy.special import betaln

from bench.core.valuation import BudgetExhausted

# --------------------------------------------------------------------------- coalitions


def coalition_masks(n: int) -> np.ndarray:
    """Bool array [2**n, n]; row m is the membership vector of bitmask m."""
    return ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)


def mask_of(players: Iterable[int]) -> int:
    """Bitmask of a set of player indices (duplicates allowed)."""
    mask = 0
    for i in players:
        if i < 0:
            raise ValueError(f"player index must be >= 0, got {i}")
        mask |= 1 << int(i)
    return mask


def members(mask: int, n: int) -> tuple[int, ...]:
    """Sorted player indices in bitmask `mask` (players 0..n-1)."""
    return tuple(i for i in range(n) if (mask >> i) & 1)


def utility_table(utility: Callable[[int], float], n: int) -> np.ndarray:
    """Full table: utility(mask) for every mask 0..2**n-1."""
    return np.array([float(utility(m)) for m in range(1 << n)], dtype=float)


def _check_table(table: np.ndarray) -> tuple[np.ndarray, int]:
    """Validate a utility table; return it as a float array and n."""
    t = np.asarray(table, dtype=float)
    if t.ndim != 1:
        raise ValueError(f"utility table must be 1-D, got shape {t.shape}")
    size = t.size
    if size < 2 or size & (size - 1):
        raise ValueError(f"utility table length must be a power of two 2**n (n >= 1), got length {size}")
    bad = np.flatnonzero(~np.isfinite(t))
    if bad.size:
        raise ValueError(f"utility table contains NaN/inf at masks {bad[:10].tolist()}")
    return t, size.bit_length() - 1


# --------------------------------------------------------------------------- exact semivalues


def semivalue(table: np.ndarray, weight_fn: Callable[[int, int], float]) -> np.ndarray:
    """phi_i = sum over S not containing i of weight_fn(|S|, n) * (v(S+i) - v(S)).

    Vectorised: per player, the table is viewed as [high bits, bit i, low bits] so the
    marginals v(S+i) - v(S) for all 2**(n-1) coalitions S come out of one subtraction.
    """
    t, n = _check_table(table)
    w = np.array([weight_fn(k, n) for k in range(n)] + [0.0])  # size n (S = N) never lacks i
    w_of_mask = w[coalition_masks(n).sum(axis=1)]
    values = np.empty(n)
    for i in range(n):
        t3 = t.reshape(-1, 2, 1 << i)  # axis 1 = bit i
        marginal = t3[:, 1, :] - t3[:, 0, :]
        values[i] = np.sum(w_of_mask.reshape(-1, 2, 1 << i)[:, 0, :] * marginal)
    return values


def shapley_weight(k: int, n: int) -> float:
    """Shapley weight of a marginal to a coalition of size k: k!(n-k-1)!/n! = 1/(n*C(n-1,k))."""
    return 1.0 / (n * comb(n - 1, k))


def banzhaf_weight(k: int, n: int) -> float:
    """Banzhaf weight: 1/2**(n-1) for every coalition."""
    return 0.5 ** (n - 1)


def exact_shapley(table: np.ndarray) -> np.ndarray:
    """Exact Shapley values from a full utility table (length 2**n)."""
    return semivalue(table, shapley_weight)


def banzhaf(table: np.ndarray) -> np.ndarray:
    """Exact (raw) Banzhaf values: mean marginal over all 2**(n-1) coalitions without i."""
    return semivalue(table, banzhaf_weight)


def beta_shapley(table: np.ndarray, alpha: float = 16.0, beta: float = 1.0) -> np.ndarray:
    """Beta(alpha, beta)-Shapley (Kwon & Zou, 2022), parameterised as in the paper.

    Weight of a coalition of size k: B(k + beta, n - 1 - k + alpha) / B(alpha, beta).
    alpha = beta = 1 is Shapley; alpha > beta (paper's Beta(16,1)) favours small coalitions.
    """

    def weight(k: int, n: int) -> float:
        return float(np.exp(betaln(k + beta, n - 1 - k + alpha) - betaln(alpha, beta)))

    return semivalue(table, weight)


def leave_one_out(table: np.ndarray) -> np.ndarray:
    """LOO values: v(N) - v(N minus {i})."""
    t, n = _check_table(table)
    full = (1 << n) - 1
    return t[full] - t[full ^ (1 << np.arange(n))]


def efficiency_gap(values: np.ndarray, table: np.ndarray) -> float:
    """|sum(values) - (v(N) - v(empty))|."""
    t, _ = _check_table(table)
    return float(abs(np.sum(values) - (t[-1] - t[0])))


def check_efficiency(values: np.ndarray, table: np.ndarray, atol: float = 1e-8) -> None:
    """Raise AssertionError (with the gap) if the efficiency gap exceeds atol."""
    gap = efficiency_gap(values, table)
    if not gap <= atol:
        raise AssertionError(f"efficiency violated: |sum(phi) - (v(N) - v(empty))| = {gap:.3g} > atol={atol:.3g}")


# --------------------------------------------------------------------------- permutation Monte Carlo


@dataclass
class PermutationResult:
    """Output of permutation_shapley."""

    values: np.ndarray  # running mean of marginals over all permutations
    stderr: np.ndarray  # std of per-permutation marginals / sqrt(m) (antithetic: per pair)
    n_permutations: int
    n_utility_calls: int  # distinct coalitions evaluated (memoised)
    converged: bool  # True iff the tol stopping rule fired
    history: list[np.ndarray] = field(default_factory=list)  # running mean at each check
    budget_stop: str | None = None  # why the budget stopped the run early (complete permutations kept)


def permutation_shapley(
    utility: Callable[[int], float],
    n: int,
    rng: np.random.Generator,
    max_permutations: int,
    min_permutations: int = 10,
    tol: float | None = 0.01,
    truncation_tol: float | None = None,
    antithetic: bool = False,
    callback: Callable[[int, np.ndarray], bool | None] | None = None,
    check_every: int | None = None,
    truncation_scale: str = "full",
) -> PermutationResult:
    """Permutation Monte Carlo Shapley, optionally truncated (TMC) and antithetic.

    utility(mask) is called at most once per distinct coalition (memoised within this call).
    Checks happen every `check_every` permutations (default n, rounded up to even when
    antithetic) and at max_permutations. At each check the running mean is appended to
    history and, once m >= min_permutations, the run stops as converged if
        max_i |mean_t[i] - mean_{t-1}[i]| <= tol * mean_i |mean_t[i]|.
    tol=None disables the rule. callback(m, running_mean) is called at each check; a
    truthy return stops the run (converged stays False). A ``BudgetExhausted`` raised by
    ``utility`` mid-permutation ends the run with the permutations completed so far
    (``budget_stop`` says why); raised before the first one completes, it propagates.
    Truncation: once |v(N) - v(prefix)| < truncation_tol * scale the rest of the
    permutation is skipped (its marginals are 0); scale = |v(N)| (``truncation_scale=
    "full"``, Ghorbani & Zou) or |v(N) - v(∅)| (``"gain"``: for utilities such as accuracy
    whose base is far from 0, where |v(N)| would truncate almost at once). antithetic: every second permutation is
    the reverse of the previous one; stderr is then computed over pair means.
    """
    if n < 1 or max_permutations < 1:
        raise ValueError(f"need n >= 1 and max_permutations >= 1, got n={n}, max_permutations={max_permutations}")
    cache: dict[int, float] = {}

    def v(mask: int) -> float:
        if mask not in cache:
            cache[mask] = float(utility(mask))
        return cache[mask]

    if truncation_scale not in ("full", "gain"):
        raise ValueError(f"truncation_scale: {truncation_scale!r}; use 'full' or 'gain'")
    v_empty = v(0)
    v_full = v((1 << n) - 1) if truncation_tol is not None else 0.0
    trunc_at = None if truncation_tol is None else \
        truncation_tol * abs(v_full - v_empty if truncation_scale == "gain" else v_full)
    step = check_every or n
    if antithetic:
        step += step % 2

    def walk(perm: np.ndarray) -> np.ndarray:
        marg, mask, prev = np.zeros(n), 0, v_empty
        for p in perm:
            if trunc_at is not None and abs(v_full - prev) < trunc_at:
                break
            mask |= 1 << int(p)
            cur = v(mask)
            marg[p], prev = cur - prev, cur
        return marg

    total = np.zeros(n)  # sum of marginals over all permutations
    k, w_mean, w_m2 = 0, np.zeros(n), np.zeros(n)  # Welford over samples (perms or pairs)
    history: list[np.ndarray] = []
    converged, m, perm, first, budget_stop = False, 0, None, None, None
    while m < max_permutations:
        if antithetic and m % 2 == 1:
            perm = perm[::-1]
        else:
            perm = rng.permutation(n)
        try:
            marg = walk(perm)
        except BudgetExhausted as e:
            if m == 0:
                raise
            budget_stop = str(e)
            break
        total += marg
        m += 1
        if antithetic and m % 2 == 1:
            first = marg
        else:
            x = (first + marg) / 2 if antithetic else marg
            k += 1
            d = x - w_mean
            w_mean += d / k
            w_m2 += d * (x - w_mean)
        if m % step == 0 or m == max_permutations:
            mean = total / m
            history.append(mean)
            if tol is not None and m >= min_permutations and len(history) >= 2:
                if np.max(np.abs(mean - history[-2])) <= tol * np.mean(np.abs(mean)):
                    converged = True
                    break
            if callback is not None and callback(m, mean):
                break

    stderr = np.sqrt(w_m2 / (k - 1) / k) if k >= 2 else np.full(n, np.nan)
    return PermutationResult(total / m, stderr, m, len(cache), converged, history, budget_stop)
