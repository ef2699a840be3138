"""The selection experiment (bench/selection.py) on a fake additive game (no training),
the plot, and one slow run of the command line on the smoke preset."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import one_line, run_cli
from test_shed import FakeGame, make_pairs

from bench.core.errors import ConfigError
from bench.analysis.plots import plot_selection
from bench.core.selection import cluster_scores, format_curve, selection_curve
from valuers.base import Valuation


def setup_game(n_per_cluster=10, cluster_w=(0.02, -0.01, 0.0, 0.01, -0.02)):
    """50 examples in 5 clusters of 10 (cluster = id // 10); v = 0.5 + Σ weight (+ 1e-3·seed)."""
    C = len(cluster_w)
    pairs = make_pairs(n_per_cluster * C)
    owners = [pairs[:20], pairs[20:35], pairs[35:]]
    labels = np.array([p.id // n_per_cluster for p in pairs])
    game = FakeGame(owners, {p.id: cluster_w[p.id // n_per_cluster] for p in pairs}, base=0.5)
    val = Valuation(owner_values=np.zeros(3), point_values=np.asarray(cluster_w)[labels],
                    clusters=labels, cluster_scores=np.asarray(cluster_w, float))
    return game, val, labels, np.asarray(cluster_w)


def test_curve_rows_summary_and_ordering():
    game, val, labels, w = setup_game()
    curve = selection_curve(game, val, sizes=(0.1, 0.2, 0.5), seeds=(0, 1, 2))
    assert curve["counts"] == [5, 10, 25] and curve["n_examples"] == 50
    assert len(curve["rows"]) == 3 * (3 * 3 + 1)
    assert curve["base_utility"] == pytest.approx(0.5)
    by = {(r["method"], r["count"], r["seed"]): r for r in curve["rows"]}
    for s in (0, 1, 2):
        # seeds shift training (the game's with_seed) and the draws
        assert by[("all", 50, s)]["train_seed"] == s
        assert by[("all", 50, s)]["utility"] == pytest.approx(0.5 + 10 * w.sum() + 1e-3 * s)
        # QOCS at 10 examples = the best cluster, whole
        q = by[("qocs", 10, s)]
        assert set(labels[q["indices"]]) == {0} and q["utility"] == pytest.approx(0.5 + 10 * 0.02 + 1e-3 * s)
        for c in (5, 10, 25):
            assert len(by[("random", c, s)]["indices"]) == c == len(by[("qwcs", c, s)]["indices"])
    st = curve["summary"]["qocs"]["stats"]
    assert [x["n"] for x in st] == [3, 3, 3] and all(x["lo"] <= x["mean"] <= x["hi"] for x in st)
    # in this additive game, QOCS beats random at every size (paired by seed)
    assert all(p["mean"] > 0 for p in curve["paired"]["qocs-random"])
    assert set(curve["paired"]) == {"qocs-random", "qocs-all", "qwcs-random", "qwcs-all"}
    assert "all data" in format_curve(curve)
    json.dumps(curve)                                                  # JSON-able (NaN aside)


def test_curve_from_point_values_and_cached_sets():
    game, val, labels, w = setup_game()
    scores = cluster_scores(val.point_values, labels)
    np.testing.assert_allclose(scores, w)
    a = selection_curve(game, val.point_values, labels, sizes=(10,), seeds=(0,), methods=("qocs", "random"))
    b = selection_curve(game, val, sizes=(10,), seeds=(0,), methods=("qocs", "random"))
    assert [r["indices"] for r in a["rows"]] == [r["indices"] for r in b["rows"]]   # same draws, same sets
    assert all(list(t) == sorted(t) for t in game.asked)              # canonical order: equal sets share a cache entry


def test_eval_game_scores_the_subsets():
    game, val, _, _ = setup_game()
    held = FakeGame(game.owners, {k: 2 * v for k, v in game.weights.items()}, base=0.4)
    curve = selection_curve(game, val, sizes=(10,), seeds=(0,), methods=("qocs", "all"), eval_game=held)
    assert curve["held_out_eval"] and curve["base_utility"] == pytest.approx(0.4)
    assert curve["summary"]["all"]["mean"] == pytest.approx(0.4)     # 2·Σw = 0 over all 50 examples
    assert curve["rows"][0]["utility"] == pytest.approx(0.4 + 2 * 10 * 0.02)


def test_qwcs_prefers_high_scores_with_large_beta():
    game, val, labels, _ = setup_game()
    curve = selection_curve(game, val, sizes=(10,), seeds=(0, 1, 2), methods=("qwcs",), beta=8.0)
    for r in curve["rows"]:
        assert np.mean(labels[r["indices"]] == 0) >= 0.7               # z-score 1.41 vs ≤0.71: weight ≈ 0.99


def test_bad_inputs():
    game, val, _, _ = setup_game()
    for kw, field in [(dict(sizes=(0,)), "selection.sizes"), (dict(sizes=(51,)), "selection.sizes"),
                      (dict(sizes=(1.5,)), "selection.sizes"), (dict(methods=("best",)), "selection.methods"),
                      (dict(seeds=()), "selection.seeds")]:
        with pytest.raises(ConfigError) as e:
            selection_curve(game, val, **kw)
        assert one_line(str(e.value)) and str(e.value).startswith(field)
    with pytest.raises(ConfigError, match="clusters"):
        selection_curve(game, val.point_values, None)


def test_plot(tmp_path):
    game, val, _, _ = setup_game()
    curve = selection_curve(game, val, sizes=(0.1, 0.5), seeds=(0, 1))
    out = plot_selection(curve, tmp_path / "plots" / "sel.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    one = selection_curve(game, val, sizes=(0.1,), seeds=(0,))      # one seed: no CI bands, still plots
    plot_selection(one, tmp_path / "one.png")


@pytest.mark.slow
def test_selection_command_on_smoke(tmp_path):
    out = tmp_path / "sel.png"
    code, _, err = run_cli(["selection", "--experiment", "smoke", "--seeds", "0", "--sizes", "0.1", "0.5",
                            "--out", str(out), f"results_dir={tmp_path / 'r'}", "progress=false",
                            "valuer.shed.passes=1"])
    assert code == 0, err[-3000:]
    curve = json.loads(out.with_suffix(".json").read_text())
    assert out.exists() and curve["counts"] == [10, 50] and len(curve["rows"]) == 2 * 3 + 1
    assert curve["valuation_extras"]["passes"] == 1
