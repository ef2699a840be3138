"""Naive influence: torch.func per-example gradients against plain autograd one example
at a time, the damped Fisher solve against a dense inverse, the TRAK-style
projection, and bad settings. Tiny tier, offline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPEC, one_line, time_runs_out_at
from test_logra import _inject_game, _lora_model, _pairs, _perturbed

from bench.core.errors import ConfigError
from bench.core.train import clone_model
from valuers.base import Budget, BudgetExhausted
from valuers.influence.data import collate, encode_pairs, example_losses, row_logps, unwrap
from valuers.influence.layers import watched_layers
from valuers.influence.per_example import per_example_gradients
from valuers.influence.projection import dense_projection
from valuers.influence.solve import influence_scores, precondition
from valuers.influence.subject import Subject, reference_logps
from valuers.influence_naive import NaiveInfluence

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_vmap_gradients_equal_autograd_one_example_at_a_time(tiny_base, tiny_task, kind, loss):
    model, tok = tiny_base
    if kind == "full":
        s = Subject(_perturbed(model).double(), tok, SPEC, 0.1, 128, clone_model(model).double())
    else:
        s = Subject(_lora_model(model).double(), tok, SPEC, 0.1, 128, None, kind="lora")
    layers = watched_layers(s.model)
    ex = encode_pairs(tok, SPEC, _pairs(tiny_task, 6), loss, 128)
    ref = reference_logps(s, ex) if loss == "dpo" else None
    got = {}
    for idx, g in per_example_gradients(s, layers, ex, ref, loss, batch_size=4):
        for n, v in g.items():
            got.setdefault(n, {}).update({i: v[j] for j, i in enumerate(idx)})
    from transformers.pytorch_utils import Conv1D
    for i in range(len(ex)):
        b = collate([ex[i]], s.pad_id)
        lp = row_logps(s.model, b)
        L = example_losses(lp, None if ref is None else ref[[i]], b, loss, s.beta).sum()
        grads = torch.autograd.grad(L, [m.weight for _, m in layers])
        for (n, m), gw in zip(layers, grads):
            want = (gw.T if isinstance(m, Conv1D) else gw).reshape(-1)
            torch.testing.assert_close(got[n][i], want, rtol=1e-8, atol=1e-12)


def test_damped_fisher_solve_equals_dense_inverse():
    rng = np.random.default_rng(0)
    for N, D in ((40, 12), (12, 40)):                  # primal and Woodbury (dual) forms
        G = rng.normal(size=(N, D)) * rng.uniform(0.1, 3, size=D)
        q = rng.normal(size=D)
        F = G.T @ G / N
        lam = 0.1 * np.linalg.eigvalsh(F).mean()
        want = np.linalg.solve(F + lam * np.eye(D), q)
        got, info = precondition(G, q, 0.1, chunk=5)
        assert info["form"] == ("primal" if D <= N else "dual")
        assert info["lambda"] == pytest.approx(lam, rel=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        scores, _ = influence_scores([G, G[:, :3]], [q, q[:3]], 0.1)
        F3 = G[:, :3].T @ G[:, :3] / N
        lam3 = 0.1 * np.trace(F3) / 3
        np.testing.assert_allclose(scores, G @ want + G[:, :3] @ np.linalg.solve(F3 + lam3 * np.eye(3), q[:3]),
                                   rtol=1e-9)
    z, info = precondition(np.zeros((5, 3)), np.ones(3), 0.1)       # a layer with no gradient adds nothing
    assert info["form"] == "zero" and not z.any()


def test_dense_projection_is_seeded_gaussian():
    a, b = dense_projection(64, 500, seed=1), dense_projection(64, 500, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, dense_projection(64, 500, seed=2))
    assert a.shape == (64, 500) and abs(float((a.T @ a).diagonal().mean()) - 1) < 0.1   # E[PᵀP] = I


@pytest.fixture(scope="module")
def game(tmp_path_factory, session_cache, tiny_task, tiny_partition, tiny_base):
    return _inject_game(tmp_path_factory.mktemp("naive"), session_cache, tiny_task, tiny_partition, tiny_base,
                        "full", n_per_owner=6)


def test_projected_naive_approaches_exact(game):
    exact = NaiveInfluence().value(game, Budget())
    assert exact.extras["proj_dim"] is None and np.abs(exact.point_values).max() > 0
    proj = NaiveInfluence(proj_dim=2048, seed=0).value(game, Budget())
    layers = watched_layers(unwrap(_perturbed(game.base()[0])))
    kept = [m.weight.numel() <= 2048 for _, m in layers]
    assert proj.extras["grad_dim"] == sum(m.weight.numel() if k else 2048 for (_, m), k in zip(layers, kept))
    assert proj.extras["grad_dim"] < exact.extras["grad_dim"]
    from scipy.stats import spearmanr
    assert spearmanr(proj.point_values, exact.point_values).statistic > 0.7
    again = NaiveInfluence(proj_dim=2048, seed=0).value(game, Budget())
    np.testing.assert_array_equal(again.point_values, proj.point_values)
    one_block = NaiveInfluence(hessian="full").value(game, Budget())
    assert one_block.extras["hessian"] == "full" and np.all(np.isfinite(one_block.point_values))
    assert not np.allclose(one_block.point_values, exact.point_values)


def test_time_budget_is_checked_between_gradient_batches(game, monkeypatch):
    """Budget(max_seconds) running out between per-example gradient batches stops the valuer."""
    budget = Budget(max_seconds=600)
    with game.metered(budget) as log:
        seen = time_runs_out_at(game, log, 2, monkeypatch)    # at the second batch (the reference pass is one)
        with pytest.raises(BudgetExhausted, match="max_seconds=600"):
            NaiveInfluence(batch_size=4).value(game, budget)
    assert len(seen) == 2


@pytest.mark.parametrize("kw, field", [(dict(hessian="diag"), "hessian"), (dict(proj_dim=0), "proj_dim"),
                                       (dict(train_loss="x"), "train_loss"), (dict(damping_scale=-1), "damping")])
def test_bad_settings_are_one_line(kw, field):
    with pytest.raises(ConfigError) as e:
        NaiveInfluence(**kw)
    assert one_line(str(e.value)) and f"valuer.influence_naive.{field}" in str(e.value)


def test_the_base_reference_logps_are_computed_once_per_process_for_every_seed(fresh_cache, make_game, tiny_task,
                                                                               monkeypatch):
    """π0 is the game's base for every seed: the second seed's subject reuses the first's
    reference log-probs, equal to a fresh pass; other examples or another dtype compute."""
    import valuers.influence.subject as sub
    monkeypatch.setattr(sub, "_REFERENCE_MEMO", {})
    calls = []
    real = sub._reference_logps
    monkeypatch.setattr(sub, "_reference_logps", lambda *a: calls.append(len(a[1])) or real(*a))
    subjects = [sub.load_subject(make_game(fresh_cache, seed=seed)) for seed in (0, 1)]
    assert subjects[0].reference_key and subjects[0].reference_key == subjects[1].reference_key
    assert subjects[0].key != subjects[1].key               # two different fine-tunes
    pairs = _pairs(tiny_task, 6)
    ex0, ref0 = sub.loss_inputs(subjects[0], pairs, "dpo")
    ex1, ref1 = sub.loss_inputs(subjects[1], pairs, "dpo")
    assert calls == [6]
    assert torch.equal(ref1, real(subjects[1], ex1, 32)) and torch.equal(ref0, ref1)
    sub.loss_inputs(subjects[1], pairs[:4], "dpo")
    subjects[1].model.double()
    sub.loss_inputs(subjects[1], pairs, "dpo")
    assert calls == [6, 4, 6]
