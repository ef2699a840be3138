"""TRAK and TracIn through dattri: cross-checks against gradients computed independently
(``influence.per_example``) and against ``influence_naive``, determinism, the budget, bad
settings, and (slow) the harness end to end. Tiny tier, offline; the games get their
grand-coalition stage injected (``test_logra._inject_game``), so no test waits for TRL."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, one_line, subprocess_env, time_runs_out_at, read_records
from test_logra import _inject_game

from bench.core.errors import ConfigError
from valuers.base import Budget, BudgetExhausted
from valuers.dattri_valuers import TRAK, TracIn
from valuers.influence.data import collate, example_losses, row_logps
from valuers.influence.layers import watched_layers
from valuers.influence.per_example import per_example_gradients
from valuers.influence.subject import load_subject, loss_inputs
from valuers.influence_naive import NaiveInfluence

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module", params=["full", "lora"])
def game(request, tmp_path_factory, session_cache, tiny_task, tiny_partition, tiny_base):
    return _inject_game(tmp_path_factory.mktemp(f"dattri-{request.param}"), session_cache, tiny_task,
                        tiny_partition, tiny_base, request.param)


def _grads(subject, layers, pairs, loss):
    """[n, D] per-example loss gradients (all watched layers, concatenated), float64."""
    ex, ref = loss_inputs(subject, pairs, loss)
    out = np.zeros((len(ex), sum(m.weight.numel() for _, m in layers)))
    for idx, g in per_example_gradients(subject, layers, ex, ref, loss, batch_size=4):
        out[idx] = torch.cat([g[n] for n, _ in layers], 1).double().numpy()
    return out


def _probs(subject, pairs, loss):
    """p = exp(−loss) per pair (DPO: σ(margin)), from the plain batched loss."""
    ex, ref = loss_inputs(subject, pairs, loss)
    b = collate(ex, subject.pad_id, subject.device)
    with torch.no_grad():
        return torch.exp(-example_losses(row_logps(subject.model, b), ref, b, loss, subject.beta)).double().numpy()


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_tracin_equals_lr_times_gradient_dot_products(game, loss):
    """One checkpoint, no projection: score(z, e) = lr · ∇ℓ(z)ᵀ∇ℓ(e), the gradients from
    ``per_example_gradients`` (torch.func, the watched layers only). dattri returns float32."""
    v = TracIn(dtype="float64", batch_size=4, train_loss=loss).value(game, Budget())
    s = load_subject(game, "float64")
    layers = watched_layers(s.model)
    G, Ge = _grads(s, layers, game.flat_pairs(), loss), _grads(s, layers, game.eval, loss)
    want = game.train.lr * G @ Ge.T
    assert v.pair_scores.shape == want.shape == (15, 6) and np.abs(want).max() > 0
    np.testing.assert_allclose(v.pair_scores, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(v.point_values, want.mean(1), rtol=2e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(v.owner_values, [v.point_values[i * 5:(i + 1) * 5].sum() for i in range(3)])
    assert v.extras["grad_dim"] == G.shape[1] and v.extras["lr_weight"] == game.train.lr
    assert v.extras["model_kind"] == ("full" if game.train.lora_r is None else "lora")
    assert v.cost.fine_tunes == 1 and v.cost.phases["tracin"] > 0
    cos = TracIn(dtype="float64", normalized=True, train_loss=loss).value(game, Budget())
    norm = np.linalg.norm(G, axis=1)[:, None] * np.linalg.norm(Ge, axis=1)[None]
    np.testing.assert_allclose(cos.pair_scores, want / norm, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("game", ["lora"], indirect=True)
@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_trak_full_rank_equals_naive_influence_up_to_its_known_factors(game, loss):
    """TRAK without projection vs ``influence_naive`` (one Fisher block, unprojected), both with
    damping → 0, gradient dim D > N (the LoRA game: D = 2,048 LoRA A/B weights, N = 15).

    Known differences: TRAK's φ = ∇f (f = log(p/(1−p)), p = exp(−ℓ), so ∇ℓ = −(1−p)∇f) on both
    sides instead of ∇ℓ; its kernel ΦᵀΦ has no 1/N and no (1−p)² weights (the empirical Fisher of
    ∇ℓ does); it multiplies the train side by Q = 1 − p; dattri divides every gradient by
    √n_params (cancels at λ → 0); one model (no ensemble). With K = ΦΦᵀ invertible (D > N):
        TRAK(z, e)  → Q_z (K⁻¹Φφ_e)_z,   naive(z, e) → N (1−p_e)/Q_z · (K⁻¹Φφ_e)_z,
    so TRAK(z, e) = Q_z² · naive(z, e) / (N (1 − p_e)) exactly in the limit."""
    trak = TRAK(proj_dim=None, dtype="float64", damping_scale=1e-6, train_loss=loss).value(game, Budget())
    naive = NaiveInfluence(dtype="float64", hessian="full", damping_scale=1e-6, train_loss=loss).value(game, Budget())
    s = load_subject(game, "float64")
    N, D = 15, trak.extras["grad_dim"]
    assert D > N and trak.extras["kernel_dim"] == D and trak.extras["proj_type"] == "identity"
    Q, q = 1 - _probs(s, game.flat_pairs(), loss), 1 - _probs(s, game.eval, loss)
    naive_pairs = np.asarray(naive.pair_scores)
    want = Q[:, None] ** 2 * naive_pairs / (N * q[None])
    rel = np.linalg.norm(trak.pair_scores - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel          # measured ~2e-7 (damping bias and rounding; 1e-9 gives ~1e-4 rounding)
    if loss == "dpo":               # Q varies here (0.46-0.56): the Q weights are not a constant scale
        flat = naive_pairs * (np.sum(want * naive_pairs) / np.sum(naive_pairs ** 2))
        assert np.linalg.norm(trak.pair_scores - flat) / np.linalg.norm(want) > 1e-2
    assert trak.extras["regularization_relative"] and trak.extras["regularization"] > 0


def test_trak_projection_is_seeded_deterministic_and_finite(game):
    a = TRAK(proj_dim=64, seed=0).value(game, Budget())
    b = TRAK(proj_dim=64, seed=0, batch_size=3).value(game, Budget())
    c = TRAK(proj_dim=64, seed=1).value(game, Budget())
    assert a.pair_scores.shape == (15, 6) and np.isfinite(a.pair_scores).all() and np.abs(a.pair_scores).max() > 0
    assert np.linalg.norm(a.pair_scores - b.pair_scores) < 1e-3 * np.linalg.norm(a.pair_scores)   # float32 sums
    assert not np.allclose(a.pair_scores, c.pair_scores)
    again = TRAK(proj_dim=64, seed=0).value(game, Budget())
    np.testing.assert_array_equal(again.pair_scores, a.pair_scores)
    np.testing.assert_allclose(a.point_values, a.pair_scores.mean(1))
    assert a.extras["proj_dim"] == 64 and a.extras["n_train"] == 15 and a.extras["n_eval"] == 6
    assert a.extras["sign"].startswith("value = -influence") and a.extras["phase_s"]["trak_cache"] > 0
    t1, t2 = (TracIn(proj_dim=64, seed=0).value(game, Budget()) for _ in range(2))
    np.testing.assert_array_equal(t1.pair_scores, t2.pair_scores)
    assert np.isfinite(t1.pair_scores).all() and t1.extras["proj_type"] == "normal"


@pytest.mark.parametrize("game", ["full"], indirect=True)
@pytest.mark.parametrize("cls", [TRAK, TracIn])
def test_time_budget_is_checked_between_batches(game, cls, monkeypatch):
    budget = Budget(max_seconds=600)
    with game.metered(budget) as log:
        seen = time_runs_out_at(game, log, 5, monkeypatch)   # reference passes (2), then dattri's batches
        with pytest.raises(BudgetExhausted, match="max_seconds=600"):
            cls(batch_size=4).value(game, budget)
    assert len(seen) == 5


@pytest.mark.parametrize("game", ["full"], indirect=True)
def test_unprojected_trak_refuses_a_huge_kernel(game, monkeypatch):
    import valuers.dattri_valuers as dv
    monkeypatch.setattr(dv, "MAX_KERNEL_DIM", 100)
    with pytest.raises(ConfigError, match=r"^valuer\.trak\.proj_dim: ") as e:
        TRAK(proj_dim=None).value(game, Budget())
    assert one_line(str(e.value))


@pytest.mark.parametrize("cls, kw, field", [
    (TRAK, dict(proj_dim=0), "trak.proj_dim"), (TRAK, dict(proj_type="sjlt"), "trak.proj_type"),
    (TRAK, dict(regularization=-1.0), "trak.regularization"), (TRAK, dict(damping_scale=0), "trak.damping_scale"),
    (TRAK, dict(train_loss="ce"), "trak.train_loss"), (TRAK, dict(dtype="half"), "trak.dtype"),
    (TRAK, dict(k_in=4), "trak"), (TracIn, dict(lr=0), "tracin.lr"), (TracIn, dict(proj_dim=-3), "tracin.proj_dim"),
    (TracIn, dict(normalized="yes"), "tracin.normalized"), (TracIn, dict(batch_size=0), "tracin.batch_size")])
def test_bad_settings_are_one_line(cls, kw, field):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert one_line(str(e.value)) and f"valuer.{field}" in str(e.value)


@pytest.mark.parametrize("game", ["lora"], indirect=True)
@pytest.mark.parametrize("name", ["trak", "tracin"])
def test_yaml_builds_a_valuer_that_uses_only_the_game_view(game, name):
    """conf/valuer/<name>.yaml as the harness builds it, on a game that exposes only GameView."""
    from test_valuer_contract import ViewOnly

    from bench.harness.build import build_valuer
    valuer, cfg = build_valuer(name)
    assert valuer.name == cfg["name"] == name
    with game.metered(Budget()) as use:
        v = valuer.value(ViewOnly(game), Budget())
    v.check(3, 15, 6)
    assert v.cost.fine_tunes == use.fine_tunes() == 1
    np.testing.assert_allclose(v.owner_values, [v.point_values[i * 5:(i + 1) * 5].sum() for i in range(3)])


# ------------------------------------------------------------------ end to end (slow)

@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dattri-smoke-cache")      # shared: the second job trains nothing new


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trak", "tracin"])
def test_harness_runs_dattri_valuer_end_to_end(name, tmp_path, smoke_cache):
    """python -m bench experiment=smoke valuer=[<name>]: a real fine-tuned (full, tiny) model."""
    proc = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke", f"valuer=[{name}]", "logger=none",
                           f"results_dir={tmp_path}", f"cache_dir={smoke_cache}", "progress=false",
                           "lds.n_subsets=6"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["valuer"]: r for r in read_records(tmp_path) if r["seed"] == 0}
    r = recs[name]
    assert r["status"] == "ok", r.get("error")
    pv = np.array(r["point_values"])
    assert pv.shape == (sum(r["owner_sizes"]),) and np.isfinite(pv).all() and np.abs(pv).max() > 0
    np.testing.assert_allclose(r["owner_values"], [pv[:40].sum(), pv[40:70].sum(), pv[70:].sum()], rtol=1e-9)
    assert r["extras"]["model_kind"] == "full" and r["extras"]["n_train"] == 100 and r["cost"]["fine_tunes"] == 1
    lp = r["metrics"]["lds_pair"]
    print(name, "owner values", r["owner_values"], "exact", r["exact_values"], "fidelity", r["metrics"]["fidelity"],
          "pair LDS", lp["lds"], "ceiling", lp["ceiling"], "phases", r["cost"]["phases"])
    assert lp["target"] == "margin" and np.isfinite(lp["lds"]) and len(lp["per_pair"]) == 90
    assert "detection_points" in r["metrics"]
    assert int(np.argmin(r["owner_values"])) == 2, r["owner_values"]     # the flipped owner hurts most
