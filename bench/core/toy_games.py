"""Cooperative games with known Shapley values, for testing the engine in bench/shapley.py.

Each game returns (table, expected_shapley): table is indexed by coalition bitmask (bit i =
player i), expected comes from a closed form or from `shapley_by_permutations`, a slow
brute-force reference kept independent of bench.core.shapley on purpose.
"""

from __future__ import annotations

from itertools import permutations
from math import factorial
from typing import Callable, Sequence

import numpy as np

MAX_BRUTE_FORCE_N = 8  # 8! = 40320 permutations


def _table(n: int, v: Callable[[tuple[int, ...]], float]) -> np.ndarray:
    """Table of v(members) over all 2**n bitmasks."""
    return np.array([v(tuple(i for i in range(n) if m >> i & 1)) for m in range(1 << n)], dtype=float)


def shapley_by_permutations(table: np.ndarray) -> np.ndarray:
    """Reference Shapley: average marginal contribution over all n! orderings (n <= 8)."""
    table = np.asarray(table, dtype=float)
    n = len(table).bit_length() - 1
    if n > MAX_BRUTE_FORCE_N:
        raise ValueError(f"brute force over {n}! permutations is too slow (n <= {MAX_BRUTE_FORCE_N})")
    phi = np.zeros(n)
    for order in permutations(range(n)):
        mask = 0
        for p in order:
            phi[p] += table[mask | 1 << p] - table[mask]
            mask |= 1 << p
    return phi / factorial(n)


def glove_game(n_left: int, n_right: int) -> tuple[np.ndarray, np.ndarray]:
    """v(S) = min(#left, #right); players 0..n_left-1 hold left gloves, the rest right ones.

    Closed form when one side has a single glove (say 1 left, m right): the lone glove gets
    m/(m+1) (it scores unless it comes before every right glove), each of the others
    1/(m(m+1)). Otherwise brute force.
    """
    n = n_left + n_right
    table = _table(n, lambda s: min(sum(i < n_left for i in s), sum(i >= n_left for i in s)))
    if min(n_left, n_right) == 0:
        return table, np.zeros(n)
    if min(n_left, n_right) == 1:
        m = max(n_left, n_right)
        lone, other = m / (m + 1), 1 / (m * (m + 1))
        left, right = (lone, other) if n_left == 1 else (other, lone)
        return table, np.array([left] * n_left + [right] * n_right)
    return table, shapley_by_permutations(table)


def airport_game(costs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """v(S) = max cost in S (v(empty) = 0).

    With costs sorted c_1 <= ... <= c_n and c_0 = 0, the runway segment (c_{j-1}, c_j] is
    shared equally by the n-j+1 players that need it: phi_(i) = sum_{j<=i} (c_j - c_{j-1})/(n-j+1).
    """
    c = np.asarray(costs, dtype=float)
    n = len(c)
    table = _table(n, lambda s: max((c[i] for i in s), default=0.0))
    order = np.argsort(c, kind="stable")
    increments = np.diff(np.concatenate([[0.0], c[order]])) / (n - np.arange(n))
    phi = np.empty(n)
    phi[order] = np.cumsum(increments)
    return table, phi


def weighted_majority(weights: Sequence[float], quota: float) -> tuple[np.ndarray, np.ndarray]:
    """v(S) = 1 if sum of weights in S >= quota else 0. Expected values by brute force."""
    w = np.asarray(weights, dtype=float)
    table = _table(len(w), lambda s: float(sum(w[i] for i in s) >= quota))
    return table, shapley_by_permutations(table)


def additive_game(values: Sequence[float], base: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """v(S) = base + sum_{i in S} values[i]; phi = values."""
    x = np.asarray(values, dtype=float)
    return _table(len(x), lambda s: base + sum(x[i] for i in s)), x.copy()


def symmetric_game(n: int, f: Callable[[int], float]) -> tuple[np.ndarray, np.ndarray]:
    """v(S) = f(|S|); by symmetry and efficiency phi_i = (f(n) - f(0))/n."""
    return _table(n, lambda s: float(f(len(s)))), np.full(n, (f(n) - f(0)) / n)


def unanimity_game(n: int, carriers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """v(S) = 1 if S contains every carrier else 0; phi = 1/|T| on carriers T, 0 elsewhere.

    (Its raw Banzhaf value is 1/2**(|T|-1) on carriers, 0 elsewhere.)
    """
    t = set(carriers)
    phi = np.array([1 / len(t) if i in t else 0.0 for i in range(n)])
    return _table(n, lambda s: float(t <= set(s))), phi
