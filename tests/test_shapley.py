"""Science tests for bench/shapley.py against closed forms and brute force (bench/toy_games.py)."""

from math import comb

import numpy as np
import pytest

from bench.core import shapley as sh
from bench.core import toy_games as tg


def random_table(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=1 << n)


# --------------------------------------------------------------------------- helpers


def test_mask_helpers_round_trip():
    n = 5
    masks = sh.coalition_masks(n)
    assert masks.shape == (32, 5) and masks.dtype == bool
    for m in range(1 << n):
        players = sh.members(m, n)
        assert sh.mask_of(players) == m
        assert tuple(np.flatnonzero(masks[m])) == players
    assert sh.mask_of([]) == 0 and sh.mask_of([2, 2, 0]) == 0b101


def test_utility_table_matches_callable():
    t = random_table(4, 0)
    np.testing.assert_array_equal(sh.utility_table(lambda m: t[m], 4), t)


@pytest.mark.parametrize(
    "table, problem",
    [(np.zeros(6), "power of two"), (np.zeros(1), "power of two"), (np.zeros((4, 2)), "1-D"),
     (np.array([0.0, 1.0, np.nan, 2.0]), "NaN")],
)
def test_bad_tables_raise(table, problem):
    for fn in (sh.exact_shapley, sh.banzhaf, sh.leave_one_out):
        with pytest.raises(ValueError, match=problem):
            fn(table)


# --------------------------------------------------------------------------- exact Shapley vs known values


@pytest.mark.parametrize("n_left, n_right", [(1, 1), (1, 2), (1, 5), (4, 1), (2, 2), (2, 3), (3, 3)])
def test_glove_game(n_left, n_right):
    table, expected = tg.glove_game(n_left, n_right)
    np.testing.assert_allclose(sh.exact_shapley(table), expected, atol=1e-12)


def test_glove_closed_form_agrees_with_brute_force():
    table, expected = tg.glove_game(1, 4)
    np.testing.assert_allclose(tg.shapley_by_permutations(table), expected, atol=1e-12)


@pytest.mark.parametrize("costs", [[1.0], [3.0, 1.0], [1, 2, 2, 5], [4, 0.5, 7, 7, 2, 9, 1, 3], [-1, 2, 0.5]])
def test_airport_game(costs):
    table, expected = tg.airport_game(costs)
    np.testing.assert_allclose(sh.exact_shapley(table), expected, atol=1e-12)


def test_airport_closed_form_agrees_with_brute_force():
    table, expected = tg.airport_game([5.0, 1.0, 3.0, 3.0, 8.0])
    np.testing.assert_allclose(tg.shapley_by_permutations(table), expected, atol=1e-12)


@pytest.mark.parametrize("weights, quota", [([4, 2, 1, 1, 1], 5), ([1, 1, 1], 2), ([50, 49, 1], 51), ([3, 3, 2, 1, 1, 1], 6)])
def test_weighted_majority(weights, quota):
    table, expected = tg.weighted_majority(weights, quota)
    np.testing.assert_allclose(sh.exact_shapley(table), expected, atol=1e-12)


def test_weighted_majority_known_value():
    # [49, 48, 3] with quota 51: any two players win, none alone, so all three are symmetric.
    _, expected = tg.weighted_majority([49, 48, 3], 51)
    np.testing.assert_allclose(expected, [1 / 3] * 3)


@pytest.mark.parametrize("n", [1, 3, 7, 12])
def test_additive_and_symmetric_games(n):
    table, expected = tg.additive_game(np.linspace(-1, 2, n), base=0.7)
    np.testing.assert_allclose(sh.exact_shapley(table), expected, atol=1e-10)
    table, expected = tg.symmetric_game(n, lambda k: np.sqrt(k) + 0.3)
    np.testing.assert_allclose(sh.exact_shapley(table), expected, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_random_game_matches_brute_force(seed):
    table = random_table(5, seed)
    np.testing.assert_allclose(sh.exact_shapley(table), tg.shapley_by_permutations(table), atol=1e-12)


# --------------------------------------------------------------------------- axioms


@pytest.mark.parametrize("n", [1, 2, 5, 10, 14])
def test_efficiency_on_random_tables(n):
    table = random_table(n, n)
    phi = sh.exact_shapley(table)
    sh.check_efficiency(phi, table, atol=1e-9)
    assert sh.efficiency_gap(phi, table) < 1e-9


def test_check_efficiency_reports_gap():
    table = random_table(3, 0)
    phi = sh.exact_shapley(table) + np.array([0.25, 0.0, 0.0])
    assert sh.efficiency_gap(phi, table) == pytest.approx(0.25)
    with pytest.raises(AssertionError, match="0.25"):
        sh.check_efficiency(phi, table, atol=1e-6)


def test_symmetry():
    n, base = 6, random_table(6, 1)
    swap01 = [m & ~0b11 | (m & 1) << 1 | (m >> 1) & 1 for m in range(1 << n)]
    table = base + base[swap01]  # invariant under exchanging players 0 and 1
    for values in (sh.exact_shapley(table), sh.banzhaf(table), sh.leave_one_out(table)):
        assert values[0] == pytest.approx(values[1], abs=1e-12)


@pytest.mark.parametrize("null", [0, 3, 5])
def test_null_player(null):
    n, base = 6, random_table(6, 2)
    table = base[[m & ~(1 << null) for m in range(1 << n)]]  # player `null` changes nothing
    for values in (sh.exact_shapley(table), sh.banzhaf(table), sh.leave_one_out(table), sh.beta_shapley(table)):
        assert values[null] == pytest.approx(0.0, abs=1e-12)


def test_linearity():
    v, w = random_table(7, 3), random_table(7, 4)
    np.testing.assert_allclose(
        sh.exact_shapley(2.5 * v - w), 2.5 * sh.exact_shapley(v) - sh.exact_shapley(w), atol=1e-12
    )


# --------------------------------------------------------------------------- other semivalues


@pytest.mark.parametrize("n, carriers", [(4, [0, 2]), (5, [1, 2, 3]), (6, [4])])
def test_unanimity_shapley_and_banzhaf(n, carriers):
    table, expected = tg.unanimity_game(n, carriers)
    np.testing.assert_allclose(sh.exact_shapley(table), expected, atol=1e-12)
    expected_bz = np.where(expected > 0, 0.5 ** (len(carriers) - 1), 0.0)
    np.testing.assert_allclose(sh.banzhaf(table), expected_bz, atol=1e-12)


def test_banzhaf_matches_definition_on_random_game():
    n, table = 5, random_table(5, 5)
    ref = [np.mean([table[m | 1 << i] - table[m] for m in range(1 << n) if not m >> i & 1]) for i in range(n)]
    np.testing.assert_allclose(sh.banzhaf(table), ref, atol=1e-12)


def test_leave_one_out():
    table, _ = tg.glove_game(1, 2)  # left glove is pivotal; each right glove is replaceable
    np.testing.assert_allclose(sh.leave_one_out(table), [1.0, 0.0, 0.0])
    table, x = tg.additive_game([0.5, -2.0, 3.0], base=1.0)
    np.testing.assert_allclose(sh.leave_one_out(table), x)


def test_semivalue_with_shapley_weight_and_beta_1_1_equal_shapley():
    table = random_table(6, 6)
    phi = sh.exact_shapley(table)
    np.testing.assert_allclose(sh.semivalue(table, lambda k, n: 1 / (n * comb(n - 1, k))), phi, atol=1e-12)
    np.testing.assert_allclose(sh.beta_shapley(table, alpha=1, beta=1), phi, atol=1e-12)


def test_beta_shapley_is_probabilistic_and_favours_small_coalitions():
    table, x = tg.additive_game([1.0, -0.5, 2.0, 0.25, 3.0])
    np.testing.assert_allclose(sh.beta_shapley(table, 16, 1), x, atol=1e-12)  # weights sum to 1
    # Player 0 only adds value to the empty coalition: Beta(16,1) must value it above Shapley.
    n = 5
    table = np.array([1.0 if m == 1 else 0.0 for m in range(1 << n)])
    assert sh.beta_shapley(table, 16, 1)[0] > sh.exact_shapley(table)[0]


# --------------------------------------------------------------------------- permutation Monte Carlo


class Counting:
    """Utility that records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, mask):
        self.calls.append(mask)
        return self.table[mask]


def test_permutation_converges_to_exact_on_random_game():
    n, table = 6, random_table(6, 7)
    u = Counting(table)
    res = sh.permutation_shapley(u, n, np.random.default_rng(0), max_permutations=3000, tol=None)
    exact = sh.exact_shapley(table)
    assert res.n_permutations == 3000 and not res.converged
    assert np.linalg.norm(res.values - exact) / np.linalg.norm(exact) < 0.05
    assert np.all(np.abs(res.values - exact) < 4 * res.stderr + 1e-9)
    assert res.n_utility_calls == len(u.calls) == len(set(u.calls)) <= 2**n
    sh.check_efficiency(res.values, table, atol=1e-9)  # every permutation telescopes to v(N) - v(empty)
    assert len(res.history) == 3000 // n


def test_antithetic_converges_and_pairs_permutations():
    n, table = 6, random_table(6, 8)
    res = sh.permutation_shapley(lambda m: table[m], n, np.random.default_rng(1), 2001, tol=None, antithetic=True)
    exact = sh.exact_shapley(table)
    assert res.n_permutations == 2001
    assert np.linalg.norm(res.values - exact) / np.linalg.norm(exact) < 0.05
    assert np.all(np.isfinite(res.stderr))


def test_stopping_rule_stops_early_on_additive_game():
    n = 5
    table, x = tg.additive_game([1.0, 2.0, -1.0, 0.5, 3.0], base=0.2)
    res = sh.permutation_shapley(lambda m: table[m], n, np.random.default_rng(0), 1000, min_permutations=10)
    # every permutation gives the exact marginals, so the second check (at m = 2n = 10) stops it
    assert res.converged and res.n_permutations == 10 and len(res.history) == 2
    np.testing.assert_allclose(res.values, x, atol=1e-12)
    np.testing.assert_allclose(res.stderr, 0.0, atol=1e-12)


def test_min_permutations_and_callback():
    n = 4
    table, _ = tg.additive_game([1.0, 2.0, 3.0, 4.0])
    res = sh.permutation_shapley(lambda m: table[m], n, np.random.default_rng(0), 1000, min_permutations=50)
    assert res.converged and 50 <= res.n_permutations <= 52
    seen = []
    res = sh.permutation_shapley(
        lambda m: table[m], n, np.random.default_rng(0), 1000, tol=None, callback=lambda m, mean: seen.append(m) or m >= 12
    )
    assert seen == [4, 8, 12] and res.n_permutations == 12 and not res.converged


def test_truncation_skips_saturated_tails():
    n = 8
    table, expected = tg.symmetric_game(n, lambda k: min(k, 2))  # saturates after 2 players
    u = Counting(table)
    res = sh.permutation_shapley(u, n, np.random.default_rng(0), 400, tol=None, truncation_tol=0.01)
    assert max(bin(m).count("1") for m in u.calls if m != (1 << n) - 1) <= 2
    assert res.n_utility_calls <= 2 + n + comb(n, 2)
    np.testing.assert_allclose(res.values.sum(), 2.0)  # marginals after truncation are exactly 0 here
    assert np.abs(res.values - expected).max() < 0.05
    no_trunc = sh.permutation_shapley(lambda m: table[m], n, np.random.default_rng(0), 400, tol=None)
    assert no_trunc.n_utility_calls > res.n_utility_calls


# --------------------------------------------------------------------------- micro benchmark


@pytest.mark.benchmark
def test_bench_exact_shapley_n12(benchmark):
    table = random_table(12, 0)
    phi = benchmark(sh.exact_shapley, table)
    sh.check_efficiency(phi, table, atol=1e-9)


def test_truncation_relative_to_the_gain():
    """truncation_scale="gain": a high-base utility (accuracy-like) is not truncated at once."""
    n = 6
    u = lambda m: 0.9 + 0.01 * bin(m).count("1")        # noqa: E731  base 0.9, gain 0.06
    rng = lambda: np.random.default_rng(0)              # noqa: E731
    full = sh.permutation_shapley(u, n, rng(), 3, tol=None, truncation_tol=0.05)
    gain = sh.permutation_shapley(u, n, rng(), 3, tol=None, truncation_tol=0.05, truncation_scale="gain")
    assert full.values.sum() < 0.06 - 1e-9               # 5% of |v(N)| = 0.048: cut after the first step
    np.testing.assert_allclose(gain.values, 0.01)        # 5% of the gain = 0.003: every marginal walked
    with pytest.raises(ValueError, match="truncation_scale"):
        sh.permutation_shapley(u, n, rng(), 1, truncation_tol=0.1, truncation_scale="nope")
