"""DataInf: exact where the paper says it is (one training example: a rank-one Fisher),
its error vanishing as the damping grows, the valuer on a tiny LoRA game against the
exact damped-Fisher influence of ``influence_naive``, and bad settings. Tiny tier."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import one_line, read_records
from scipy.stats import spearmanr
from test_logra import _inject_game

from bench.core.errors import ConfigError
from valuers.base import Budget
from valuers.datainf import DataInf, datainf_precondition, datainf_scores
from valuers.influence.solve import influence_scores, precondition
from valuers.influence_naive import NaiveInfluence

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_one_example_is_exact():
    """N = 1: F = v vᵀ is rank one, the mean over one term swaps with the inverse, and
    Sherman–Morrison is exact: DataInf = the damped-Fisher solve, for a vector and a matrix query."""
    rng = np.random.default_rng(0)
    G = rng.normal(size=(1, 40))
    for q in (rng.normal(size=40), rng.normal(size=(40, 3))):
        got, info = datainf_precondition(G, q, 0.1)
        want, ref = precondition(G, q, 0.1)
        assert info["lambda"] == pytest.approx(ref["lambda"], rel=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_error_shrinks_as_damping_grows():
    """With many correlated examples the swap is an approximation; both sides tend to q/λ as
    λ grows, so the relative error of q̃ falls monotonically with damping_scale."""
    rng = np.random.default_rng(1)
    G = rng.normal(size=(30, 8)) @ rng.normal(size=(8, 20)) + 0.1 * rng.normal(size=(30, 20))
    q = rng.normal(size=20)
    errs = []
    for d in (0.01, 0.1, 1.0, 10.0, 100.0):
        a, _ = datainf_precondition(G, q, d)
        b, _ = precondition(G, q, d)
        errs.append(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert errs[0] > 0.1, errs                      # a real approximation at small damping
    assert all(x > y for x, y in zip(errs, errs[1:])) and errs[-1] < 0.01, errs


def test_scores_add_over_blocks_and_pair_means_are_the_point_scores():
    rng = np.random.default_rng(2)
    train = [rng.normal(size=(12, 5)), rng.normal(size=(12, 9))]
    pairs = [rng.normal(size=(4, 5)), rng.normal(size=(4, 9))]
    pair, point, info = datainf_scores(train, pairs, [p.mean(0) for p in pairs], 0.1)
    assert pair.shape == (12, 4) and len(info) == 2
    np.testing.assert_allclose(pair.mean(1), point, rtol=1e-10, atol=1e-12)
    one = sum(G @ datainf_precondition(G, P.T, 0.1)[0] for G, P in zip(train, pairs))
    np.testing.assert_allclose(pair, one, rtol=1e-12)


@pytest.fixture(scope="module")
def game(tmp_path_factory, session_cache, tiny_task, tiny_partition, tiny_base):
    return _inject_game(tmp_path_factory.mktemp("datainf"), session_cache, tiny_task, tiny_partition, tiny_base,
                        "lora", n_per_owner=4)


def test_valuer_on_a_lora_game(game):
    """On the tiny LoRA game: finite, deterministic, pair scores [N, E] whose row means are the
    values; the same gradients through the exact solve (influence_naive) rank the examples
    alike (the approximation, measured: Spearman printed), and with one training example
    DataInf equals the exact influence."""
    v = DataInf(dtype="float64").value(game, Budget())
    N, E = len(game.flat_pairs()), len(game.eval)
    assert v.pair_scores.shape == (N, E) and np.all(np.isfinite(v.point_values))
    np.testing.assert_allclose(v.pair_scores.mean(1), v.point_values, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(v.owner_values, [v.point_values[a:b].sum() for a, b in
                                                 zip(np.cumsum([0] + game.owner_sizes[:-1]),
                                                     np.cumsum(game.owner_sizes))], rtol=1e-12)
    again = DataInf(dtype="float64").value(game, Budget())
    np.testing.assert_array_equal(again.point_values, v.point_values)
    exact = NaiveInfluence(dtype="float64").value(game, Budget())
    rho = spearmanr(v.point_values, exact.point_values).statistic
    print(f"datainf vs exact damped-Fisher influence on the tiny LoRA game: Spearman {rho:.3f}")
    assert rho > 0.5
    # one example: the DataInf score of that example = the exact influence (per block, summed)
    naive = NaiveInfluence(dtype="float64")
    from valuers.influence.layers import watched_layers
    from valuers.influence.subject import load_subject
    subject = load_subject(game, "float64")
    layers = watched_layers(subject.model)
    proj = {n: None for n, _ in layers}
    g1 = naive.gradients(subject, layers, game.flat_pairs()[:1], proj)
    qm = naive.gradients(subject, layers, game.eval, proj, mean=True)
    _, di, _ = datainf_scores(g1, [q[None] for q in qm], qm, 0.1)
    ex, _ = influence_scores(g1, qm, 0.1)
    np.testing.assert_allclose(di, ex, rtol=1e-8)


@pytest.mark.parametrize("kw, field", [(dict(train_loss="x"), "train_loss"), (dict(damping_scale=0), "damping"),
                                       (dict(chunk_size=0), "chunk_size"), (dict(layers="("), "layers")])
def test_bad_settings_are_one_line(kw, field):
    with pytest.raises(ConfigError) as e:
        DataInf(**kw)
    assert one_line(str(e.value)) and f"valuer.datainf.{field}" in str(e.value)


@pytest.mark.slow
def test_harness_runs_datainf_end_to_end(tmp_path):
    """python -m bench experiment=smoke valuer=[retrain_shapley,datainf]: a real fine-tuned model,
    point values summing to owner values, per-pair LDS, the flipped owner found."""
    import json
    import subprocess
    import sys

    from conftest import REPO, subprocess_env
    proc = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke", "valuer=[retrain_shapley,datainf]",
                           "logger=none", f"results_dir={tmp_path}", "progress=false", "lds.n_subsets=6"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in read_records(tmp_path):
        if r["valuer"] != "datainf":
            continue
        assert r["status"] == "ok", r.get("error")
        pv = np.array(r["point_values"])
        assert np.isfinite(pv).all() and r["cost"]["fine_tunes"] == 1
        np.testing.assert_allclose(sum(r["owner_values"]), pv.sum(), rtol=1e-9)
        assert np.isfinite(r["metrics"]["lds_pair"]["lds"])
        assert int(np.argmin(r["owner_values"])) == 2, r["owner_values"]      # smoke: owner 2 is flipped
