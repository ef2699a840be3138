"""MSR Banzhaf and Owen sampling (valuers/semivalues.py) where the answer is known:
closed-form games and a published utility table of real fine-tunes, served by
``TableGame``. Each estimate lands within its own standard error of the exact
semivalue, converges as samples grow, respects the budgets, and agrees with
pyDVL's implementations on the same table (figures recorded once, in a separate
environment, by ``tests/peers/pydvl_crosscheck.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, read_records

from bench.core import toy_games
from bench.core.errors import ConfigError
from bench.core.shapley import banzhaf, exact_shapley
from bench.core.toy_games import TableGame
from valuers.base import Budget, BudgetExhausted
from valuers.semivalues import MSRBanzhaf, OwenShapley, msr_banzhaf, owen_shapley

PYDVL = Path(__file__).parent / "peers" / "pydvl_crosscheck.json"
GAMES = {
    "airport": toy_games.airport_game([1.0, 2.0, 2.0, 5.0])[0],
    "majority": toy_games.weighted_majority([4, 2, 1, 1, 1], 5)[0],
    "glove": toy_games.glove_game(2, 3)[0],
}


def _published_table() -> np.ndarray:
    """The table the pyDVL cross-check used (a real 6-owner game), stored beside its figures."""
    return np.asarray(json.loads(PYDVL.read_text())["table"], float)


def run(valuer, game, budget=Budget()):
    with game.metered(budget) as use:
        val = valuer.value(game, budget)
    val.check(game.n, len(game.flat_pairs()))
    return val, use


@pytest.mark.parametrize("name", list(GAMES) + ["published"])
def test_msr_banzhaf_within_its_stderr_and_converging(name):
    table = GAMES[name] if name in GAMES else _published_table()
    n, exact = int(np.log2(table.size)), banzhaf(table)
    v = lambda m: table[m]      # noqa: E731
    few = msr_banzhaf(v, n, np.random.default_rng(0), 200)
    many = msr_banzhaf(v, n, np.random.default_rng(1), 20000)
    assert np.all(np.abs(many.values - exact) <= 4 * many.stderr + 1e-12), (many.values, exact, many.stderr)
    scale = np.abs(exact).max()
    assert np.abs(many.values - exact).max() < np.abs(few.values - exact).max() + 1e-12
    assert np.abs(many.values - exact).max() < 0.05 * scale
    assert many.n_coalitions <= table.size


@pytest.mark.parametrize("name", list(GAMES) + ["published"])
def test_owen_shapley_within_its_stderr_and_converging(name):
    table = GAMES[name] if name in GAMES else _published_table()
    n, exact = int(np.log2(table.size)), exact_shapley(table)
    v = lambda m: table[m]      # noqa: E731
    res = owen_shapley(v, n, np.random.default_rng(0), n_q=32, n_per_q=100)
    scale = np.abs(exact).max()
    # the midpoint rule's bias is O(1/Q^2) of the integrand's range; the rest is sampling noise
    assert np.all(np.abs(res.values - exact) <= 4 * res.stderr + 0.01 * scale), (res.values, exact, res.stderr)
    assert np.abs(res.values.sum() - (table[-1] - table[0])) < 0.05 * scale * n


def test_owen_quadrature_is_exact_in_expectation():
    """With every coalition's probability weighted exactly (no sampling), Q midpoints integrate
    e_i(q), a polynomial of degree n-1, with error O(1/Q^2): at Q = 64 within 1e-3 of Shapley."""
    table = GAMES["majority"]
    n = 5
    masks = np.arange(1 << n)
    sizes = np.array([bin(m).count("1") for m in masks])
    phi = np.zeros(n)
    for q in (np.arange(64) + 0.5) / 64:
        for i in range(n):
            others = masks[(masks >> i & 1) == 0]
            k = sizes[others]
            p = q ** k * (1 - q) ** (n - 1 - k)
            phi[i] += (p * (table[others | (1 << i)] - table[others])).sum() / 64
    np.testing.assert_allclose(phi, exact_shapley(table), atol=1e-3)


def test_valuers_share_the_game_cache_and_respect_budgets():
    table = GAMES["airport"]
    val, use = run(MSRBanzhaf(n_samples=64), TableGame(table))
    # every distinct coalition is one utility call; all but the empty one are fine-tunes
    assert val.extras["n_samples"] == 64 and val.cost.utility_calls == val.extras["n_coalitions"] <= 16
    assert val.cost.fine_tunes <= val.cost.utility_calls
    capped, _ = run(MSRBanzhaf(n_samples=500, max_fine_tunes=6), TableGame(table))
    assert capped.cost.fine_tunes <= 6 and capped.extras["budget_stop"] and capped.extras["n_samples"] >= 1
    owen, _ = run(OwenShapley(n_q=4, n_per_q=2, max_fine_tunes=10), TableGame(table))
    assert owen.cost.fine_tunes <= 10 and owen.extras["budget_stop"] and owen.extras["n_samples"] >= 1
    with pytest.raises(BudgetExhausted):         # not one draw fits: nothing to keep
        run(OwenShapley(n_q=4, n_per_q=2, max_fine_tunes=2), TableGame(table))
    a, _ = run(OwenShapley(seed=3), TableGame(table))
    b, _ = run(OwenShapley(seed=3), TableGame(table))
    np.testing.assert_array_equal(a.owner_values, b.owner_values)


@pytest.mark.skipif(not PYDVL.exists(), reason="no recorded pyDVL figures (run tests/peers/pydvl_crosscheck.py)")
def test_agrees_with_pydvl_on_the_same_table():
    """pyDVL 0.10's MSR Banzhaf and Owen sampling on the published table (recorded once, in a
    numpy<2 environment) and ours with many samples: within 4 combined standard errors."""
    rec = json.loads(PYDVL.read_text())
    table = np.asarray(rec["table"], float)
    n = int(np.log2(table.size))
    v = lambda m: table[m]      # noqa: E731
    for key, ours in (("msr_banzhaf", msr_banzhaf(v, n, np.random.default_rng(0), 20000)),
                      ("owen_shapley", owen_shapley(v, n, np.random.default_rng(0), 32, 100))):
        theirs, their_se = np.asarray(rec[key]["values"]), np.asarray(rec[key]["stderr"])
        tol = 4 * np.hypot(ours.stderr, their_se) + 1e-3 * np.abs(theirs).max()
        assert np.all(np.abs(ours.values - theirs) <= tol), (key, ours.values, theirs, tol)


@pytest.mark.parametrize("cls, kw, field", [(MSRBanzhaf, dict(n_samples=1), "n_samples"),
                                            (OwenShapley, dict(n_q=0), "n_q"),
                                            (OwenShapley, dict(max_fine_tunes=0), "max_fine_tunes")])
def test_bad_settings_are_one_line(cls, kw, field):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert one_line(str(e.value)) and field in str(e.value) and "valuer." in str(e.value)



@pytest.mark.slow
def test_harness_runs_the_samplers_end_to_end(tmp_path):
    """python -m bench experiment=smoke valuer=[retrain_shapley,msr_banzhaf,owen_shapley]: every
    coalition they ask for is a real fine-tune shared through the cache (none trained twice:
    the job's exact reference already holds them all), the flipped owner is lowest."""
    import json
    import subprocess
    import sys

    from conftest import REPO, subprocess_env
    proc = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke",
                           "valuer=[retrain_shapley,msr_banzhaf,owen_shapley]", "logger=none",
                           f"results_dir={tmp_path}", "progress=false"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set()
    for r in read_records(tmp_path):
        if r["valuer"] not in ("msr_banzhaf", "owen_shapley"):
            continue
        seen.add(r["valuer"])
        assert r["status"] == "ok", r.get("error")
        assert r["cost"]["fine_tunes"] <= 7 and r["cost"]["fine_tunes_cached"] == r["cost"]["fine_tunes"]
        assert int(np.argmin(r["owner_values"])) == 2, r["owner_values"]      # smoke: owner 2 is flipped
    assert seen == {"msr_banzhaf", "owen_shapley"}
