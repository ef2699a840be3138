"""Point-level permutation Shapley (valuers/point_mc.py) on closed-form games (no
training): additive games give the weights exactly, a glove game converges to its
known Shapley values, truncation and the fine-tune cap behave as documented."""
from __future__ import annotations

import numpy as np
import pytest
from test_shed import FakeGame, make_pairs

from bench.core.errors import ConfigError
from valuers.base import Budget
from valuers.point_mc import PointMCShapley


def additive_game():
    pairs = make_pairs(7)
    w = {p.id: x for p, x in zip(pairs, [0.05, -0.03, 0.0, 0.02, 0.01, -0.04, 0.03])}
    return FakeGame([pairs[:3], pairs[3:5], pairs[5:]], w, base=0.5), np.array(list(w.values()))


def test_additive_game_gives_the_weights_and_owner_sums():
    game, w = additive_game()
    val = PointMCShapley(max_permutations=3, truncation_tol=None).value(game, Budget())
    np.testing.assert_allclose(val.point_values, w, atol=1e-12)
    np.testing.assert_allclose(val.owner_values, [w[:3].sum(), w[3:5].sum(), w[5:].sum()], atol=1e-12)
    traj = val.trajectory                          # one step per permutation
    assert len(traj) == 3 and val.extras["n_permutations"] == 3
    assert traj[0].fine_tunes <= 7 * 1 and traj[-1].fine_tunes >= traj[0].fine_tunes
    np.testing.assert_allclose(traj[-1].point_values, val.point_values)
    assert all(len(set(q)) == len(q) and list(q) == sorted(q) for q in game.asked)   # canonical sets


def test_efficiency_and_glove_game_converge():
    """Glove game: 2 left gloves, 1 right; v = 1 if a pair can be made. Shapley: R 2/3, L 1/6."""
    class Glove(FakeGame):
        def _u(self, pairs):
            ids = {p.id for p in pairs}
            return float(2 in ids and bool(ids & {0, 1}))

    pairs = make_pairs(3)
    game = Glove([pairs[:2], pairs[2:]], {})
    val = PointMCShapley(max_permutations=600, truncation_tol=None, seed=1).value(game, Budget())
    assert val.point_values.sum() == pytest.approx(1.0)                    # every permutation sums to v(N) - v(∅)
    np.testing.assert_allclose(val.point_values, [1 / 6, 1 / 6, 2 / 3], atol=0.04)
    np.testing.assert_allclose(val.owner_values, [1 / 3, 2 / 3], atol=0.04)


def test_truncation_saves_fine_tunes():
    pairs = make_pairs(20)
    w = {p.id: (0.1 if p.id < 2 else 0.0) for p in pairs}   # two examples carry all the gain
    full = PointMCShapley(max_permutations=6, truncation_tol=None).value(FakeGame([pairs], w), Budget())
    trunc = PointMCShapley(max_permutations=6, truncation_tol=0.05).value(FakeGame([pairs], w), Budget())
    assert trunc.cost.fine_tunes < full.cost.fine_tunes
    assert trunc.point_values.sum() == pytest.approx(0.2)  # truncation only skips zero marginals here


def test_fine_tune_cap_stops_after_a_permutation():
    game, _ = additive_game()
    val = PointMCShapley(max_permutations=50, truncation_tol=None).value(game, Budget(max_fine_tunes=10))
    n = val.extras["n_permutations"]
    assert 2 <= n < 50                             # one permutation is <= 7 fresh sets, so the cap needs >= 2
    assert val.trajectory[-2].fine_tunes < 10 <= val.trajectory[-1].fine_tunes


@pytest.mark.parametrize("kw, field", [({"max_permutations": 0}, "max_permutations"),
                                       ({"truncation_tol": 1.5}, "truncation_tol"),
                                       ({"truncation_tol": 1.0}, "truncation_tol"),
                                       ({"max_fine_tunes": 0}, "max_fine_tunes"),
                                       ({"seed": 1.5}, "seed"), ({"permutations": 3}, "permutations")])
def test_bad_settings(kw, field):
    with pytest.raises(ConfigError, match=rf"^valuer\.point_mc_shapley\.{field}: "):
        PointMCShapley(**kw)


def test_budget_curves_from_records():
    """bench.analysis.budget: point MC scored after each permutation, SHED as a running mean over
    passes with 1 + k·(groups − 1) fine-tunes, other valuers as one point. The records are
    version-1 records (trajectories in extras), read through the schema's upgrade."""
    from bench.analysis.budget import curve_points as points
    from bench.tracking.schema import upgrade

    def curve_points(rec, bad):
        return points(upgrade(rec), bad)
    truth = [0.3, 0.1, -0.2]
    base = {"truth_values": truth, "utility_table": [0.5] + [0.0] * 6 + [0.7], "owner_sizes": [2, 1, 1]}
    bad = np.array([False, False, False, True])
    pmc = dict(base, extras={"trajectory": [
        {"fine_tunes": 4, "owner_values": [0.1, 0.3, 0.0], "point_values": [0.0, 0.1, 0.3, 0.0]},
        {"fine_tunes": 8, "owner_values": [0.3, 0.1, -0.2], "point_values": [0.1, 0.2, 0.1, -0.2]}]})
    pts = curve_points(pmc, bad)
    assert [p["fine_tunes"] for p in pts] == [4, 8] and pts[-1]["spearman"] == pytest.approx(1.0)
    assert pts[-1]["point_auroc"] == pytest.approx(1.0)
    shed = dict(base, extras={"per_pass_values": [[1.0, -1.0], [0.0, -1.0]], "clusters": [0, 0, 1, 1],
                              "per_pass_groups": [[[0], [1]], [[1], [0]]]})
    pts = curve_points(shed, bad)
    assert [p["fine_tunes"] for p in pts] == [2, 3]        # 1 + j·(2 groups − 1)
    one = dict(base, owner_values=[0.2, 0.1, 0.0], cost={"fine_tunes": 1}, extras={})
    assert [p["fine_tunes"] for p in curve_points(one, bad)] == [1]
