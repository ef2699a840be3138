"""The retraining valuers (valuers/retraining.py) on closed-form games served by
``TableGame`` (bench/core/toy_games.py): exact Shapley and its efficiency, leave-one-out
= v(N) − v(N∖i), permutation Monte Carlo converging to the exact values within its own
stderr, and the budgets (what each valuer uses, where it stops, what it keeps)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.core import toy_games
from bench.core.shapley import banzhaf, leave_one_out
from bench.core.toy_games import TableGame
from valuers.base import Budget, BudgetExhausted
from valuers.retraining import LeaveOneOut, MCShapley, RetrainShapley

GAMES = {
    "glove_1_3": toy_games.glove_game(1, 3),
    "airport": toy_games.airport_game([1.0, 2.0, 2.0, 5.0]),
    "majority": toy_games.weighted_majority([4, 2, 1, 1, 1], 5),
    "unanimity": toy_games.unanimity_game(4, [0, 2]),
    "additive": toy_games.additive_game([0.3, -0.1, 0.0, 0.2], base=0.5),
}


def run(valuer, game, budget=Budget()):
    """As the harness runs a valuer: inside the game's meter, with the budget."""
    with game.metered(budget) as use:
        val = valuer.value(game, budget)
    val.check(game.n, len(game.flat_pairs()))
    return val, use


# ------------------------------------------------------------------ the table game itself

def test_table_game_meters_like_the_game():
    table, _ = toy_games.airport_game([1.0, 2.0, 3.0])
    game = TableGame(table, owner_sizes=[2, 1, 3], compute_s=2.0)
    assert game.n == 3 and [len(o) for o in game.owners] == [2, 1, 3] and len(game.flat_pairs()) == 6
    with game.metered(Budget(max_fine_tunes=2)) as use:
        assert game.utility(0) == 0 and game.utility(0b101) == 3.0 and game.utility(0b001) == 1.0
        assert game.utility(0b101) == 3.0                    # a repeat is free
        with pytest.raises(BudgetExhausted):
            game.utility(0b010)                              # the third fine-tune
        assert 0b010 not in game.computed, "refused before computing"
        assert use.fine_tunes() == 2
    assert game.subset_utilities([game.owners[0] + game.owners[2]])[0] == 3.0
    with pytest.raises(ValueError, match="whole owners"):
        game.subset_utilities([game.owners[0][:1]])
    with game.metered() as again:
        game.table()
    assert again.fine_tunes() == 7 and sum(e["fresh"] for e in again.entries.values()) == 7 - 2
    assert set(game.computed.values()) == {1}                # every coalition computed once
    with game.metered(Budget(max_seconds=1e-9)):
        with pytest.raises(BudgetExhausted):
            game.check_budget()


# ------------------------------------------------------------------ exact

@pytest.mark.parametrize("name", list(GAMES))
def test_exact_shapley_is_the_closed_form(name):
    table, phi = GAMES[name]
    game = TableGame(table)
    val, use = run(RetrainShapley(), game)
    np.testing.assert_allclose(val.owner_values, phi, atol=1e-12)
    assert val.owner_values.sum() == pytest.approx(table[-1] - table[0], abs=1e-12)   # efficiency
    np.testing.assert_array_equal(val.table, table)
    np.testing.assert_allclose(val.extras["banzhaf"], banzhaf(table), atol=1e-12)
    np.testing.assert_allclose(val.extras["loo"], leave_one_out(table), atol=1e-12)
    n = game.n
    assert val.cost.fine_tunes == use.fine_tunes() == 2 ** n - 1 and val.cost.utility_calls == 2 ** n
    assert val.cost.fine_tunes_cached == 0 and val.cost.device_s == pytest.approx(2 ** n - 1)
    again, _ = run(RetrainShapley(), game)                   # the same game object: all cached now
    np.testing.assert_array_equal(again.owner_values, val.owner_values)
    assert again.cost.fine_tunes_cached == again.cost.fine_tunes == 2 ** n - 1
    assert set(game.computed.values()) == {1}


def test_exact_refuses_a_short_budget_before_computing():
    table, _ = GAMES["airport"]
    for budget in (Budget(max_fine_tunes=14), Budget(max_seconds=1e-9)):
        game = TableGame(table)
        with pytest.raises(BudgetExhausted):
            run(RetrainShapley(), game, budget)
        assert not game.computed, budget
    val, use = run(RetrainShapley(), TableGame(table), Budget(max_fine_tunes=15))       # exactly enough
    assert use.fine_tunes() == 15


# ------------------------------------------------------------------ leave-one-out

@pytest.mark.parametrize("name", list(GAMES))
def test_loo_is_v_n_minus_v_n_without_i(name):
    table, _ = GAMES[name]
    game = TableGame(table)
    val, use = run(LeaveOneOut(), game)
    n, full = game.n, len(table) - 1
    np.testing.assert_allclose(val.owner_values, [table[full] - table[full & ~(1 << i)] for i in range(n)],
                               atol=1e-12)
    assert set(game.computed) == {full} | {full & ~(1 << i) for i in range(n)}     # nothing else trained
    assert val.cost.fine_tunes == use.fine_tunes() == n + 1


def test_loo_budget():
    table, _ = GAMES["airport"]
    game = TableGame(table)
    with pytest.raises(BudgetExhausted):
        run(LeaveOneOut(), game, Budget(max_fine_tunes=4))      # needs 5
    assert not game.computed
    run(LeaveOneOut(), game, Budget(max_fine_tunes=5))


# ------------------------------------------------------------------ Monte Carlo

def _mc(**kw):
    return MCShapley(**{"tol": None, "min_permutations": 1, **kw})


@pytest.mark.parametrize("name", ["airport", "majority", "glove_1_3"])
def test_mc_converges_to_exact_within_its_stderr(name):
    table, phi = GAMES[name]
    val, _ = run(_mc(max_permutations=400, seed=3), TableGame(table))
    assert val.extras["n_permutations"] == 400 and not val.extras["converged"]
    assert val.owner_values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)   # every permutation is efficient
    se = np.asarray(val.stderr)
    assert se.shape == (len(phi),) and np.all(se >= 0) and np.any(se > 0)
    z = np.abs(val.owner_values - phi) / np.maximum(se, 1e-12)
    assert np.all(z < 4.5), (val.owner_values, phi, se)
    # and the error shrinks with more permutations (stderr ~ 1/sqrt(m))
    few, _ = run(_mc(max_permutations=25, seed=3), TableGame(table))
    assert np.linalg.norm(np.asarray(few.stderr)) > 2 * np.linalg.norm(se)


def test_mc_additive_game_is_exact_after_one_permutation():
    table, phi = GAMES["additive"]
    val, _ = run(_mc(max_permutations=1), TableGame(table))
    np.testing.assert_allclose(val.owner_values, phi, atol=1e-12)


def test_mc_is_seeded_and_memoised():
    table, _ = GAMES["majority"]
    a, _ = run(_mc(max_permutations=30, seed=1), TableGame(table))
    b, _ = run(_mc(max_permutations=30, seed=1), TableGame(table))
    c, _ = run(_mc(max_permutations=30, seed=2), TableGame(table))
    np.testing.assert_array_equal(a.owner_values, b.owner_values)
    assert not np.array_equal(a.owner_values, c.owner_values)
    assert not np.array_equal(a.owner_values, run(_mc(max_permutations=30, seed=1), TableGame(table, seed=1))[0]
                              .owner_values), "the game's seed enters the permutations"
    game = TableGame(table)
    run(_mc(max_permutations=200), game)
    assert set(game.computed.values()) == {1}, "each coalition is computed once"


def test_mc_stopping_rule_stops_early():
    table, _ = GAMES["additive"]         # every permutation gives the same marginals: stable at once
    val, _ = run(MCShapley(max_permutations=50, min_permutations=8, tol=0.02), TableGame(table))
    assert val.extras["converged"] and val.extras["n_permutations"] < 50


@pytest.mark.parametrize("cap", [5, 8, 13])
def test_mc_budget_keeps_only_complete_permutations(cap):
    """Past Budget.max_fine_tunes the game refuses the next coalition; MC keeps the
    permutations it completed (each sums to v(N) − v(∅), so the sum shows no partial one)."""
    table, phi = GAMES["majority"]                     # 5 players: up to 31 coalitions
    game = TableGame(table)
    val, use = run(_mc(max_permutations=200), game, Budget(max_fine_tunes=cap))
    assert use.fine_tunes() <= cap and val.cost.fine_tunes <= cap
    assert len([m for m in game.computed if m]) <= cap
    assert val.extras["budget_stop"] and "max_fine_tunes" in val.extras["budget_stop"]
    m = val.extras["n_permutations"]
    assert 1 <= m < 200
    assert val.owner_values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)


def test_mc_budget_too_small_for_one_permutation_raises():
    table, _ = GAMES["majority"]
    for budget in (Budget(max_fine_tunes=4), Budget(max_seconds=1e-9)):   # a permutation needs 5
        game = TableGame(table)
        with pytest.raises(BudgetExhausted):
            run(_mc(max_permutations=10, seed=5), game, budget)
        assert len([m for m in game.computed if m]) <= 4


def test_mc_own_fine_tune_cap():
    """``max_fine_tunes`` in the valuer's settings caps the coalitions it uses, like the budget."""
    table, _ = GAMES["majority"]
    game = TableGame(table)
    val, use = run(_mc(max_permutations=200, max_fine_tunes=8), game)
    assert 1 <= val.extras["n_permutations"] < 200
    assert use.fine_tunes() <= 8, f"{use.fine_tunes()} fine-tunes for a cap of 8"


# ------------------------------------------------------------------ symmetric players

def test_symmetric_players_get_equal_values():
    """Players 1 and 3 are interchangeable (glove game: three right gloves, one left):
    equal exact and LOO values, and MC values equal within its stderr."""
    table, phi = toy_games.glove_game(1, 3)
    assert table[0b0010] == table[0b1000] and table[0b0011] == table[0b1001]
    exact, _ = run(RetrainShapley(), TableGame(table))
    assert exact.owner_values[1] == exact.owner_values[2] == exact.owner_values[3]
    loo, _ = run(LeaveOneOut(), TableGame(table))
    assert loo.owner_values[1] == loo.owner_values[2] == loo.owner_values[3]
    mc, _ = run(_mc(max_permutations=300, seed=2), TableGame(table))
    se = np.asarray(mc.stderr)
    for i, j in ((1, 2), (1, 3), (2, 3)):
        assert abs(mc.owner_values[i] - mc.owner_values[j]) < 4.5 * np.hypot(se[i], se[j])
