"""EK-FAC through Kronfluence: identity-strategy scores against independent per-example
gradient dot products (LoRA maps and GPT-2 Conv1D with bias), the diagonal strategy
against its closed form, the cache (reuse, determinism, atomic), the budget, bad
settings, and (slow) the harness end to end. Tiny tier, offline.

Games get their grand-coalition stage injected (``test_logra._inject_game``): a
perturbed full fine-tune or a random LoRA adapter, so no test waits for TRL.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, one_line, subprocess_env, time_runs_out_at, read_records
from test_logra import _collect, _inject_game

from bench.core.errors import ConfigError
from valuers.base import Budget, BudgetExhausted
from valuers.ekfac import EKFAC
from valuers.influence.data import collate, example_losses, row_logps
from valuers.influence.layers import watched_layers
from valuers.influence.per_example import per_example_gradients
from valuers.influence.subject import load_subject, loss_inputs

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module", params=["full", "lora"])
def game(request, tmp_path_factory, session_cache, tiny_task, tiny_partition, tiny_base):
    return _inject_game(tmp_path_factory.mktemp(f"ekfac-{request.param}"), session_cache, tiny_task,
                        tiny_partition, tiny_base, request.param, n_per_owner=4, n_eval=5)


def _gradients(game, pairs):
    """Per layer [n, D] float64: the pairs' DPO-loss gradients on the watched layers, weights
    from ``per_example_gradients`` ([d_out, d_in] flattened) and, where a layer has a bias
    (GPT-2 Conv1D), its bias gradient from plain autograd, one example at a time."""
    s = load_subject(game, "float64", "cpu")
    layers = watched_layers(s.model)
    ex, ref = loss_inputs(s, pairs, "dpo")
    w = _collect(per_example_gradients(s, layers, ex, ref, "dpo", batch_size=4), len(ex))
    out = {n: [w[n].numpy()] for n, _ in layers}
    biased = [(n, m) for n, m in layers if m.bias is not None]
    if biased:
        rows = []
        for i in range(len(ex)):
            b = collate([ex[i]], s.pad_id)
            loss = example_losses(row_logps(s.model, b), ref[[i]], b, "dpo", s.beta).sum()
            rows.append([g.detach().numpy() for g in torch.autograd.grad(loss, [m.bias for _, m in biased])])
        for j, (n, _) in enumerate(biased):
            out[n].append(np.stack([r[j] for r in rows]))
    return {n: np.concatenate(v, 1) for n, v in out.items()}, s.kind


def test_identity_scores_are_gradient_dot_products(game):
    """strategy=identity: pair_scores[z, e] = Σ_layers g_eᵀ g_z (our sign: no minus), one
    score per *pair* (the task sums a pair's chosen and rejected rows)."""
    v = EKFAC(strategy="identity", dtype="float64", batch_size=3).value(game, Budget())
    train, kind = _gradients(game, game.flat_pairs())
    query, _ = _gradients(game, game.eval)
    want = sum(train[n] @ query[n].T for n in train)                # [N, E]
    assert v.pair_scores.shape == want.shape == (12, 5) and np.abs(want).max() > 0
    rel = np.linalg.norm(v.pair_scores - want) / np.linalg.norm(want)
    assert rel < 1e-9, rel
    np.testing.assert_allclose(v.point_values, want.mean(1), rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(v.owner_values, [v.point_values[i * 4:(i + 1) * 4].sum() for i in range(3)])
    assert v.extras["n_layers"] == len(train) and v.extras["model_kind"] == kind == ("full" if game.train.lora_r is None else "lora")
    # the weights alone (what logra watches) miss the Conv1D biases: the check above has teeth
    if kind == "full":
        s = load_subject(game, "float64", "cpu")
        d_w = {n: int(m.weight.numel()) for n, m in watched_layers(s.model)}
        weights_only = sum(train[n][:, :d_w[n]] @ query[n][:, :d_w[n]].T for n in train)
        assert np.linalg.norm(weights_only - want) / np.linalg.norm(want) > 1e-6


def test_diagonal_strategy_matches_its_closed_form(game):
    """strategy=diagonal, empirical Fisher: per layer Λ = mean_z g_z² (per pair), λ = 0.1 × mean(Λ),
    score = Σ_layers Σ g_e g_z / (Λ + λ)."""
    v = EKFAC(strategy="diagonal", fisher="empirical", dtype="float64", batch_size=5).value(game, Budget())
    train, _ = _gradients(game, game.flat_pairs())
    query, _ = _gradients(game, game.eval)
    want = 0
    for n in train:
        lam = (train[n] ** 2).mean(0)
        want = want + (train[n] / (lam + 0.1 * lam.mean())) @ query[n].T
    rel = np.linalg.norm(v.pair_scores - want) / np.linalg.norm(want)
    assert rel < 1e-8, rel
    absolute = EKFAC(strategy="diagonal", fisher="empirical", dtype="float64", damping=1e-3).value(game, Budget())
    assert absolute.extras["factors_reused"] and not absolute.extras["scores_reused"]
    want = sum((train[n] / ((train[n] ** 2).mean(0) + 1e-3)) @ query[n].T for n in train)
    assert np.linalg.norm(absolute.pair_scores - want) / np.linalg.norm(want) < 1e-8


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_ekfac_is_finite_cached_and_deterministic(game):
    a = EKFAC().value(game, Budget())
    d = a.extras["cache_dir"]
    assert np.isfinite(a.pair_scores).all() and np.abs(a.point_values).max() > 0
    assert not a.extras["factors_reused"] and a.cost.phases["fit_factors"] > 0 and a.extras["factor_s"] > 0
    from pathlib import Path
    root = Path(d).parent
    assert (Path(d) / "COMPLETE").exists() and json.loads((Path(d) / "meta.json").read_text())["strategy"] == "ekfac"
    assert not [p for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith("scores_tmp")]
    # rerun: nothing fitted or scored again, the same numbers
    b = EKFAC().value(game, Budget())
    assert b.extras["cache_dir"] == d and b.extras["factors_reused"] and b.extras["scores_reused"]
    assert "fit_factors" not in b.cost.phases and "scores" not in b.cost.phases
    np.testing.assert_array_equal(a.pair_scores, b.pair_scores)
    # another damping: same factors, new scores; identity: another folder, other values
    c = EKFAC(damping=1e-4).value(game, Budget())
    assert c.extras["cache_dir"] == d and c.extras["factors_reused"] and not c.extras["scores_reused"]
    assert "fit_factors" not in c.cost.phases and not np.allclose(c.point_values, a.point_values)
    ident = EKFAC(strategy="identity").value(game, Budget())
    assert ident.extras["cache_dir"] != d and not np.allclose(ident.point_values, a.point_values)
    # from scratch again (the sampled labels are seeded): the same numbers
    shutil.rmtree(d)
    again = EKFAC().value(game, Budget())
    assert not again.extras["factors_reused"]
    np.testing.assert_array_equal(again.pair_scores, a.pair_scores)
    assert EKFAC(seed=1).value(game, Budget()).extras["cache_dir"] != d


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_truncated_factors_and_scores_are_redone(game, capsys):
    """A factor file or the pair scores that lost their tail (a power loss before they were
    fsynced): the next run removes them with one line each, redoes them, same numbers."""
    from pathlib import Path
    a = EKFAC(seed=3).value(game, Budget())
    d = Path(a.extras["cache_dir"])
    (factor,) = sorted(d.rglob("*lambda*.safetensors"))[:1]
    for f in (factor, *sorted((d / "scores").glob("*.npy"))):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 8)
    b = EKFAC(seed=3).value(game, Budget())
    assert not b.extras["factors_reused"] and not b.extras["scores_reused"]
    assert factor.name in capsys.readouterr().out
    np.testing.assert_array_equal(a.pair_scores, b.pair_scores)
    with open(next((d / "scores").glob("*.npy")), "r+b") as fh:      # the scores alone: factors kept
        fh.truncate(64)
    c = EKFAC(seed=3).value(game, Budget())
    assert c.extras["factors_reused"] and not c.extras["scores_reused"] and "removed" in capsys.readouterr().out
    np.testing.assert_array_equal(a.pair_scores, c.pair_scores)


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_sft_loss_and_other_strategies_run(game):
    for kw in (dict(train_loss="sft"), dict(train_loss="sft", fisher="empirical", strategy="kfac")):
        v = EKFAC(**kw).value(game, Budget())
        assert np.isfinite(v.pair_scores).all() and np.abs(v.point_values).max() > 0, kw
        assert v.extras["train_loss"] == "sft"


@pytest.mark.parametrize("game", ["full"], indirect=True)
def test_time_budget_stops_it_inside_the_factor_fit(game, monkeypatch, tmp_path):
    """Time running out at the 3rd check (the reference passes are the first two; the third
    is the first factor batch) stops the valuer and leaves no half-written cache."""
    budget = Budget(max_seconds=600)
    root = game.artefacts_dir("ekfac")
    entries = lambda: {p for p in root.iterdir() if not p.name.endswith(".lock")} if root.exists() else set()  # noqa: E731
    before = entries()
    with game.metered(budget) as log:
        seen = time_runs_out_at(game, log, 3, monkeypatch)
        with pytest.raises(BudgetExhausted, match="max_seconds=600"):
            EKFAC(seed=7, batch_size=4).value(game, budget)
    assert len(seen) == 3
    assert entries() == before            # the build lock (a hidden .lock) is not a half-written cache


@pytest.mark.parametrize("kw, field", [(dict(strategy="eigen"), "strategy"), (dict(damping=0), "damping"),
                                       (dict(damping_scale=0.5), "damping_scale"), (dict(fisher="true"), "fisher"),
                                       (dict(train_loss="ce"), "train_loss"), (dict(batch_size=0), "batch_size"),
                                       (dict(dtype="half"), "dtype"), (dict(layers="attn("), "layers"),
                                       (dict(device="gpu"), "device"), (dict(k_in=4), "k_in")])
def test_bad_settings_are_one_line(kw, field):
    with pytest.raises(ConfigError) as e:
        EKFAC(**kw)
    assert one_line(str(e.value)) and f"valuer.ekfac.{field}" in str(e.value)
    with pytest.raises(ConfigError, match=r"valuer\.ekfac_identity\.strategy"):
        EKFAC(name="ekfac_identity", strategy="exact")


@pytest.mark.slow
def test_harness_runs_ekfac_end_to_end(tmp_path):
    """python -m bench experiment=smoke valuer=[retrain_shapley,ekfac,ekfac_identity]: a real
    fine-tuned (full, GPT-2 Conv1D) model."""
    proc = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke",
                           "valuer=[retrain_shapley,ekfac,ekfac_identity]", "logger=none",
                           f"results_dir={tmp_path}", "progress=false", "lds.n_subsets=6"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["valuer"]: r for r in read_records(tmp_path) if r["seed"] == 0}
    for name in ("ekfac", "ekfac_identity"):
        r = recs[name]
        assert r["status"] == "ok", r.get("error")
        pv = np.array(r["point_values"])
        assert pv.shape == (sum(r["owner_sizes"]),) and np.isfinite(pv).all()
        np.testing.assert_allclose(r["owner_values"], [pv[:40].sum(), pv[40:70].sum(), pv[70:].sum()], rtol=1e-9)
        assert r["extras"]["model_kind"] == "full" and r["extras"]["n_layers"] % 4 == 0
        assert r["cost"]["fine_tunes"] == 1 and "detection_points" in r["metrics"]
        lp = r["metrics"]["lds_pair"]
        assert np.isfinite(lp["lds"]) and len(lp["per_pair"]) == 90
        print(name, "owner values", r["owner_values"], "exact", r["exact_values"], "fidelity",
              r["metrics"]["fidelity"], "point detection", r["metrics"]["detection_points"], "pair LDS", lp["lds"])
    assert recs["ekfac"]["extras"]["strategy"] == "ekfac" and recs["ekfac_identity"]["extras"]["strategy"] == "identity"


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_factors_and_scores_are_built_under_their_build_locks(game, monkeypatch):
    """Two jobs sharing a cache fit the factors once: the factor folder and the pair scores
    are each built under ``build_lock`` (its cross-process behaviour: tests/test_storage.py)."""
    from pathlib import Path

    from conftest import record_build_locks

    import valuers.ekfac as EK
    held = record_build_locks(monkeypatch, EK)
    v = EKFAC(damping=3e-3, seed=11).value(game, Budget())
    d = Path(v.extras["cache_dir"])
    assert [p.relative_to(d.parent) for p in held] == [Path(d.name), Path(d.name, "scores", held[1].name)]
    assert held[1].suffix == ".npy" and not v.extras["factors_reused"]
    EKFAC(damping=3e-3, seed=11).value(game, Budget())
    assert len(held) == 2                                   # both finished: no lock taken


def test_kronfluences_grad_scaler_warning_is_filtered_in_user_runs():
    """Kronfluence builds the deprecated ``torch.cuda.amp.GradScaler`` ~30 times a run; a
    user's run (``quiet_libraries``) shows none of it, other FutureWarnings still pass."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env
    code = ("import warnings, torch\nfrom bench.core.env import quiet_libraries\nquiet_libraries()\n"
            "torch.cuda.amp.GradScaler(enabled=False)\nwarnings.warn('other', FutureWarning)\n")
    p = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "GradScaler" not in p.stderr and "FutureWarning: other" in p.stderr
