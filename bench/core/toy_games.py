"""Cooperative games with known Shapley values, for testing the engine in bench/shapley.py.

Each game returns (table, expected_shapley): table is indexed by coalition bitmask (bit i =
player i), expected comes from a closed form or from `shapley_by_permutations`, a slow
brute-force reference kept independent of bench.core.shapley on purpose. ``TableGame``
serves such a table through the valuers' game interface (``GameView``), metered and
budgeted like the real game, for testing valuers against exact answers.
"""

from __future__ import annotations

from itertools import permutations
from math import factorial
from typing import Callable, Sequence

import numpy as np

from bench.core.metering import Metered

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


class TableGame(Metered):
    """A valuation game whose utilities are read from a 2^n table: the names of
    ``bench.core.valuation.GameView`` over a closed-form game, metered like the real
    game (``bench.core.game.Game``), so valuers and their budgets can be tested against
    exact answers without training anything.

    Each owner holds ``owner_sizes[i]`` placeholder pairs. A coalition's first use is a
    "fresh" fine-tune costing ``compute_s``; later uses are cached. ``metered(budget)``
    opens a use meter that raises ``BudgetExhausted`` before a utility would pass the
    budget, as the real game does; ``computed`` counts how often each coalition was
    actually computed (once, if the cache works). ``subset_utilities`` values a set of
    pairs only when it is a union of whole owners. There are no models: ``base``,
    ``trained_model``, ``finetuned`` and the stage metadata raise NotImplementedError.
    """

    kind = "union"
    metric = "pref_acc"
    model_spec = None
    train = None
    device_kind = "cpu"
    device = "cpu"

    def __init__(self, table, owner_sizes=None, seed: int = 0, compute_s: float = 1.0, cache_dir=None):
        from collections import Counter

        from bench.core.task import Pair
        self._table = np.asarray(table, dtype=float)
        n = len(self._table).bit_length() - 1
        if n < 1 or len(self._table) != 1 << n:
            raise ValueError(f"a utility table has 2^n entries, got {len(self._table)}")
        self.n, self.seed, self.compute_s = n, seed, float(compute_s)
        self.owner_sizes = list(owner_sizes) if owner_sizes is not None else [1] * n
        if len(self.owner_sizes) != n or min(self.owner_sizes) < 1:
            raise ValueError(f"owner_sizes: {self.owner_sizes}; give {n} sizes >= 1")
        ids = iter(range(sum(self.owner_sizes)))
        self.owners = [[Pair(k, f"owner{i}", f"q{k}", "a", "b") for k in (next(ids) for _ in range(s))]
                       for i, s in enumerate(self.owner_sizes)]
        self.eval = [Pair(0, "eval", "q", "a", "b")]
        self._owner_of = {p.id: i for i, o in enumerate(self.owners) for p in o}
        self._cache_dir = cache_dir
        self._init_meters()
        self._done: set = set()             # coalitions "cached"
        self.computed: Counter = Counter()  # coalition -> times computed (1 once cached)

    def _admit(self, masks) -> None:
        self._admit_keys({mask: mask != 0 for mask in masks})

    def _use(self, mask: int) -> float:
        fresh = mask not in self._done
        if fresh:
            self._done.add(mask)
            self.computed[mask] += 1
        rec = {"n_train": sum(self.owner_sizes[i] for i in range(self.n) if mask >> i & 1),
               "train_s": self.compute_s if mask else 0.0, "eval_s": 0.0}
        self._note_key(mask, rec, fresh)
        return float(self._table[mask])

    def _check_mask(self, mask) -> int:
        if not isinstance(mask, (int, np.integer)) or not 0 <= mask < 1 << self.n:
            raise ValueError(f"coalition {mask!r}: not a mask of {self.n} owners")
        return int(mask)

    # ----------------------------------------------------------- GameView
    def flat_pairs(self) -> list:
        return [p for o in self.owners for p in o]

    def utility(self, mask: int) -> float:
        mask = self._check_mask(mask)
        self._admit([mask])
        return self._use(mask)

    def record(self, mask: int) -> dict:
        return {"metrics": {self.metric: self.utility(mask)}, "mask": int(mask)}

    def prefetch(self, items) -> None:
        masks = [self._check_mask(m) for m in dict.fromkeys(items)]
        self._admit(masks)
        for m in masks:
            self._use(m)

    def table(self, masks=None) -> np.ndarray:
        masks = list(range(1 << self.n)) if masks is None else list(masks)
        self.prefetch(masks)
        out = np.full(1 << self.n, np.nan)
        for m in masks:
            out[m] = self.utility(m)
        return out

    def _mask_of_pairs(self, pairs) -> int:
        ids = {p.id for p in pairs}
        mask = 0
        for k in ids:
            mask |= 1 << self._owner_of[k]
        whole = {p.id for i in range(self.n) if mask >> i & 1 for p in self.owners[i]}
        if ids != whole:
            raise ValueError("a TableGame values unions of whole owners only")
        return mask

    def subset_record(self, pairs) -> dict:
        return self.record(self._mask_of_pairs(pairs))

    def subset_utilities(self, subsets) -> np.ndarray:
        masks = [self._mask_of_pairs(s) for s in subsets]
        self.prefetch(masks)
        return np.array([self.utility(m) for m in masks])

    def artefacts_dir(self, name: str):
        from pathlib import Path
        if self._cache_dir is None:
            raise ValueError("TableGame: no cache_dir given for artefacts")
        return Path(self._cache_dir) / name

    def _no_models(self, *a, **k):
        raise NotImplementedError("a TableGame has utilities only, no models")

    base = trained_model = coalition_meta = stage_meta = finetuned = _no_models
