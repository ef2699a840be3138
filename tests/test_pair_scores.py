"""Per-eval-pair scores of the gradient valuers (``Valuation.pair_scores`` [N, E]):
the matrix solve against the vector solve column by column (primal, Woodbury,
zero), per-pair query vectors against the mean query, the valuers' matrices
against their point values, influence_naive's column against a hand computation
from torch.func gradients, LoGra's query cache (old logs without the per-pair
rows), the memmap past the size limit, and ``Valuation.check``. Tiny tier, offline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPEC
from test_logra import _inject_game, make_subject

from bench.core.train import token_logps
from valuers.base import Budget, Valuation
from valuers.influence import solve
from valuers.influence.data import collate, encode_pairs, unwrap
from valuers.influence.hooks import GradientLogger, pair_query_vectors, query_vectors
from valuers.influence.layers import is_conv1d, watched_layers
from valuers.influence.per_example import per_example_gradients
from valuers.influence.projection import projection_shapes, random_projections
from valuers.influence.solve import influence_scores, pair_and_mean_scores, precondition
from valuers.influence.subject import load_subject, reference_logps
from valuers.influence_naive import NaiveInfluence
from valuers.logra import LoGra

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


# ------------------------------------------------------------------ the solve

@pytest.mark.parametrize("N, D, form", [(40, 12, "primal"), (12, 40, "dual")])
def test_matrix_solve_equals_vector_solve_column_by_column(N, D, form, tmp_path):
    rng = np.random.default_rng(1)
    G = rng.normal(size=(N, D)) * rng.uniform(0.1, 3, size=D)
    Q = rng.normal(size=(7, D))                                   # 7 eval pairs
    got, info = precondition(G, Q.T, 0.1, chunk=5)
    assert info["form"] == form and got.shape == (D, 7)
    for j in range(7):
        want, inf = precondition(G, Q[j], 0.1, chunk=5)
        assert inf == info
        np.testing.assert_allclose(got[:, j], want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    # scores over two layers (a memmap one too): column j == the vector path with row j as the query
    np.save(tmp_path / "g.npy", G)
    Gm = np.load(tmp_path / "g.npy", mmap_mode="r")
    S, _ = influence_scores([Gm, G[:, :3]], [Q, Q[:, :3]], 0.1, chunk=7)
    assert S.shape == (N, 7)
    for j in range(7):
        s, _ = influence_scores([G, G[:, :3]], [Q[j], Q[j, :3]], 0.1)
        np.testing.assert_allclose(S[:, j], s, rtol=1e-10, atol=1e-10 * np.abs(s).max())
    # the scores of the mean query are the row means of the matrix (linearity)
    m, _ = influence_scores([G, G[:, :3]], [Q.mean(0), Q[:, :3].mean(0)], 0.1)
    np.testing.assert_allclose(S.mean(1), m, rtol=1e-10, atol=1e-10 * np.abs(m).max())
    pair, point, _ = pair_and_mean_scores([G, G[:, :3]], [Q, Q[:, :3]], [Q.mean(0), Q[:, :3].mean(0)], 0.1)
    assert pair.shape == (N, 7) and pair.dtype == np.float64 and pair.flags.c_contiguous
    np.testing.assert_allclose(pair, S, rtol=1e-10, atol=1e-10 * np.abs(S).max())
    np.testing.assert_array_equal(point, m)          # the point values: the vector path's numbers, bit for bit


def test_matrix_solve_of_a_layer_without_gradient_and_bad_shapes():
    z, info = precondition(np.zeros((5, 3)), np.ones((3, 4)), 0.1)
    assert info["form"] == "zero" and z.shape == (3, 4) and not z.any()
    S, _ = influence_scores([np.zeros((5, 3))], [np.ones((4, 3))], 0.1)
    assert S.shape == (5, 4) and not S.any()
    with pytest.raises(ValueError, match="all"):
        influence_scores([np.ones((5, 3)), np.ones((5, 2))], [np.ones((4, 3)), np.ones(2)], 0.1)
    with pytest.raises(ValueError, match="q has shape"):
        precondition(np.ones((5, 3)), np.ones((4, 3)), 0.1)
    with pytest.raises(ValueError, match="mean queries"):
        pair_and_mean_scores([np.ones((5, 3))], [np.ones((4, 3))], [np.ones(2)], 0.1)


def test_a_large_matrix_is_a_memmap(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    G, Q = rng.normal(size=(30, 8)), rng.normal(size=(5, 8))
    ram, point, _ = pair_and_mean_scores([G], [Q], [Q.mean(0)], 0.1, path=tmp_path / "p.npy")
    assert not isinstance(ram, np.memmap) and not (tmp_path / "p.npy").exists()     # small: in RAM
    monkeypatch.setattr(solve, "PAIR_SCORES_RAM_BYTES", 0)
    mm, point2, _ = pair_and_mean_scores([G], [Q], [Q.mean(0)], 0.1, path=tmp_path / "sub" / "p.npy")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable and mm.shape == (30, 5)
    np.testing.assert_array_equal(np.asarray(mm), ram)
    np.testing.assert_array_equal(point2, point)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["p.npy"]               # no temp file left


# ------------------------------------------------------------------ the per-pair query

@pytest.mark.parametrize("kind", ["full", "lora"])
def test_per_pair_query_vectors_average_to_the_mean_query(tiny_base, tiny_task, kind):
    model, tok = tiny_base
    subject = make_subject(kind, model, tok)
    layers = watched_layers(subject.model)
    proj = random_projections(projection_shapes(layers, 4, 4, clip=True), seed=0)
    pairs = list(tiny_task.eval[:5])
    with GradientLogger(subject.model, layers, proj) as lg:
        rows, means, loss = pair_query_vectors(subject, lg, pairs, "dpo", batch_size=2)
        mq, ml = query_vectors(subject, lg, pairs, "dpo", batch_size=2)
        alone = [query_vectors(subject, lg, [p], "dpo", batch_size=2)[0] for p in pairs[:2]]
    assert len(rows) == len(means) == len(layers) and loss == ml
    for r, m, q in zip(rows, means, mq):
        assert r.shape == (5, m.shape[0]) and r.dtype == np.float64
        np.testing.assert_array_equal(m, q)                  # the mean path is unchanged
        np.testing.assert_allclose(r.mean(0), m, rtol=1e-12, atol=1e-14 * max(np.abs(m).max(), 1e-300))
    assert max(np.abs(r).max() for r in rows) > 0
    for j in range(2):                                       # row j = the gradient of pair j alone
        for r, a in zip(rows, alone[j]):
            np.testing.assert_allclose(r[j], a, rtol=1e-9, atol=1e-12 * max(np.abs(a).max(), 1e-300))


# ------------------------------------------------------------------ the valuers on games

@pytest.fixture(scope="module", params=["full", "lora"])
def game(request, tmp_path_factory, session_cache, tiny_task, tiny_partition, tiny_base):
    return _inject_game(tmp_path_factory.mktemp(f"ps-{request.param}"), session_cache, tiny_task,
                        tiny_partition, tiny_base, request.param)


def _check_matrix(v: Valuation, game):
    N, E = sum(game.owner_sizes), len(game.eval)
    pair = v.pair_scores
    assert isinstance(pair, np.ndarray) and pair.dtype == np.float64 and pair.shape == (N, E)
    scale = np.abs(v.point_values).max()
    assert scale > 0
    np.testing.assert_allclose(pair.mean(axis=1), v.point_values, rtol=1e-10, atol=1e-10 * scale)
    assert not np.allclose(pair, pair.mean(1, keepdims=True)), "the eval pairs' columns differ"
    v.check(game.n, N, E)
    v.check(game.n, N)
    with pytest.raises(ValueError, match="pair_scores"):
        v.check(game.n, N, E + 1)


def test_naive_pair_scores_mean_to_point_values(game):
    _check_matrix(NaiveInfluence(dtype="float64").value(game, Budget()), game)
    _check_matrix(NaiveInfluence(hessian="full", proj_dim=512).value(game, Budget()), game)


def _hand_dpo_grad(subject, layers, ex, ref):
    """torch.func.grad of one pair's DPO loss (dense log-probs with the attention mask) with
    respect to the watched weights, each flattened as [d_out, d_in]."""
    from torch.func import functional_call, grad
    hf = unwrap(subject.model)
    params = {f"{n}.weight": m.weight.detach() for n, m in layers}
    b = collate([ex], subject.pad_id, subject.device)

    def loss(p):
        logits = functional_call(hf, p, (), {"input_ids": b.ids, "attention_mask": b.attn}).logits
        lp = (token_logps(logits[:, :-1], b.ids[:, 1:]) * b.targets[:, 1:].to(logits.dtype)).sum(-1)
        r = ref.to(lp.dtype)
        return -torch.nn.functional.logsigmoid(subject.beta * ((lp[0] - r[0]) - (lp[1] - r[1])))

    with torch.no_grad():                 # torch.func.grad ignores it; no outer graph through the other weights
        g = grad(loss)(params)
    return [(g[f"{n}.weight"].T if is_conv1d(m) else g[f"{n}.weight"]).reshape(-1).numpy() for n, m in layers]


def test_naive_column_equals_a_hand_computation(game):
    """Column j of influence_naive's pair_scores == Σ_layers G (F + λI)⁻¹ g_j with G the train
    gradients from torch.func (vmap(grad)), g_j torch.func.grad of eval pair j's loss, and the
    inverse from an SVD of G."""
    v = NaiveInfluence(dtype="float64").value(game, Budget())
    subject = load_subject(game, "float64")
    layers = watched_layers(subject.model)
    ex = encode_pairs(subject.tok, SPEC, game.flat_pairs(), "dpo", subject.max_length)
    ref = reference_logps(subject, ex)
    N = len(ex)
    G = {n: np.zeros((N, m.weight.numel())) for n, m in layers}
    for idx, g in per_example_gradients(subject, layers, ex, ref, "dpo", batch_size=4):
        for n, t in g.items():
            G[n][idx] = t.numpy()
    j = 2
    q_ex = encode_pairs(subject.tok, SPEC, [game.eval[j]], "dpo", subject.max_length)
    gj = _hand_dpo_grad(subject, layers, q_ex[0], reference_logps(subject, q_ex)[0])
    want = np.zeros(N)
    for (n, _), g in zip(layers, gj):
        Gl = G[n]
        D = Gl.shape[1]
        lam = 0.1 * (Gl ** 2).sum() / (N * D)                 # damping_scale × trace(F) / D
        if lam == 0:
            continue
        U, S, Vt = np.linalg.svd(Gl, full_matrices=False)
        vg = Vt @ g
        x = Vt.T @ (vg / (S ** 2 / N + lam)) + (g - Vt.T @ vg) / lam      # (F + λI)⁻¹ g
        want += Gl @ x
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(v.pair_scores[:, j], want, rtol=1e-9, atol=1e-10 * np.abs(want).max())
    assert not np.allclose(v.pair_scores[:, j + 1], want, rtol=1e-3)           # another pair's column differs


def test_logra_pair_scores_cache_and_old_logs(game, tmp_path, monkeypatch):
    d = tmp_path / "logs"
    a = LoGra(k_in=4, k_out=4, logs_dir=str(d)).value(game, Budget())
    _check_matrix(a, game)
    with np.load(d / "query.npz") as z:
        keys = set(z.files)
        old = {k: z[k] for k in keys if not k.startswith("p_")}
    assert {f"p_{i}" for i in range(a.extras["n_layers"])} <= keys
    # a rerun reads the per-pair query from the cache: the same numbers, nothing recomputed
    b = LoGra(k_in=4, k_out=4, logs_dir=str(d)).value(game, Budget())
    assert "log_query" not in b.cost.phases
    np.testing.assert_array_equal(b.pair_scores, a.pair_scores)
    np.testing.assert_array_equal(b.point_values, a.point_values)
    # logs written before the per-pair rows existed: the rows are computed once and saved
    np.savez(d / "query.npz", **old)
    c = LoGra(k_in=4, k_out=4, logs_dir=str(d)).value(game, Budget())
    assert "log_query" in c.cost.phases and c.extras["fwd_bwd_examples"] == len(game.eval)
    np.testing.assert_array_equal(c.point_values, a.point_values)
    np.testing.assert_allclose(c.pair_scores, a.pair_scores, rtol=1e-9, atol=1e-12 * np.abs(a.pair_scores).max())
    with np.load(d / "query.npz") as z:
        assert {f"p_{i}" for i in range(c.extras["n_layers"])} <= set(z.files)
    assert "log_query" not in LoGra(k_in=4, k_out=4, logs_dir=str(d)).value(game, Budget()).cost.phases
    # past the size limit the matrix is a memmap under the game's artefacts
    monkeypatch.setattr(solve, "PAIR_SCORES_RAM_BYTES", 0)
    m = LoGra(k_in=4, k_out=4, logs_dir=str(d)).value(game, Budget())
    assert isinstance(m.pair_scores, np.memmap)
    assert Path(m.pair_scores.filename).parent == game.artefacts_dir("pair_scores")
    np.testing.assert_array_equal(np.asarray(m.pair_scores), a.pair_scores)
    np.testing.assert_array_equal(m.point_values, a.point_values)
    m.check(game.n, sum(game.owner_sizes), len(game.eval))


def test_valuation_check_of_pair_scores():
    ok = Valuation(np.zeros(2), point_values=np.zeros(5), pair_scores=np.zeros((5, 3)))
    ok.check(2, 5)
    ok.check(2, 5, 3)
    for bad, n_eval in ((np.zeros((4, 3)), None), (np.zeros(5), None), (np.zeros((5, 3)), 4)):
        with pytest.raises(ValueError, match="pair_scores has shape"):
            Valuation(np.zeros(2), pair_scores=bad).check(2, 5, n_eval)
    nan = np.zeros((5, 3))
    nan[4, 2] = np.nan
    with pytest.raises(ValueError, match="not all finite"):
        Valuation(np.zeros(2), pair_scores=nan).check(2, 5, 3)
