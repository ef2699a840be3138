"""LoGra valuer: hook gradients against torch.func, exactness at full rank against the
damped empirical-Fisher influence, invariances (batch size, padding), peft LoRA
models, on-disk logs (reuse, atomic, refusal) and bad input. Tiny tier, offline.

The games here get their grand-coalition stage injected into a private cache (a
perturbed full fine-tune, or a randomly initialised LoRA adapter), so no test
waits for TRL; the real fine-tune path is the slow end-to-end test at the bottom.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SPEC, TASK_KW, TRAIN, one_line, subprocess_env, time_runs_out_at, read_records

from bench.core.errors import ConfigError
from bench.core.game import Game
from bench.core.task import Pair
from bench.core.train import _lora_config_dict, clone_model, materialize, sequence_logps
from valuers.base import Budget, BudgetExhausted
from valuers.influence.data import collate, encode_pairs
from valuers.influence.hooks import GradientLogger, estimate_covariances, iter_projected
from valuers.influence.layers import watched_layers
from valuers.influence.per_example import per_example_gradients
from valuers.influence.projection import eigen_projections, projection_shapes, random_projections
from valuers.influence.solve import influence_scores
from valuers.influence.subject import Subject, load_subject, reference_logps
from valuers.influence_naive import NaiveInfluence
from valuers.logra import LoGra

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

LORA_TRAIN = dataclasses.replace(TRAIN, lora_r=4, lora_alpha=8)


# ------------------------------------------------------------------ fixtures

def _perturbed(base, seed=0, scale=0.02):
    torch.manual_seed(seed)
    m = clone_model(base)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m


def _lora_model(base, r=4, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # init_lora_weights=False: B ≠ 0 too, so the A maps get gradients
        return get_peft_model(clone_model(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def make_subject(kind, base, tok, dtype=torch.float64):
    if kind == "full":
        return Subject(_perturbed(base).to(dtype), tok, SPEC, 0.1, 128, clone_model(base).to(dtype), kind="full")
    return Subject(_lora_model(base).to(dtype), tok, SPEC, 0.1, 128, None, kind="lora")


def _pairs(tiny_task, n=10):
    """Training pairs of every source plus two of very different lengths (padding)."""
    extra = [Pair(1000, "x", "Reply to: " + "My cat is sick. " * 4, "Of course, let me help." * 2, "No."),
             Pair(1001, "x", "a", "b", "c")]
    return list(tiny_task.train[::6][:n - 2]) + extra


@pytest.fixture(scope="module", params=["full", "lora"])
def setup(request, tiny_base, tiny_task):
    """(subject, layers, train examples, their ref log-probs, query examples, func grads)."""
    model, tok = tiny_base
    subject = make_subject(request.param, model, tok)
    layers = watched_layers(subject.model)
    ex = encode_pairs(tok, SPEC, _pairs(tiny_task), "dpo", 128)
    ref = reference_logps(subject, ex)
    q_ex = encode_pairs(tok, SPEC, tiny_task.eval[:6], "dpo", 128)
    q_ref = reference_logps(subject, q_ex)
    func = _collect(per_example_gradients(subject, layers, ex, ref, "dpo", batch_size=4), len(ex))
    q_func = _collect(per_example_gradients(subject, layers, q_ex, q_ref, "dpo", batch_size=6), len(q_ex))
    return dict(subject=subject, layers=layers, ex=ex, ref=ref, q_ex=q_ex, q_ref=q_ref, func=func,
                q_func=q_func, kind=request.param)


def _collect(it, n):
    out = {}
    for item in it:
        idx, grads = item[0], item[1]
        for name, v in grads.items():
            out.setdefault(name, torch.zeros(n, v.shape[1], dtype=v.dtype))[idx] = v.detach()
    return out


def _logra(s, proj, ex, ref, batch_size=4):
    with GradientLogger(s["subject"].model, s["layers"], proj) as lg:
        return _collect(iter_projected(s["subject"], lg, ex, ref, "dpo", batch_size), len(ex))


def _project(G, shapes, proj, name, n):
    ko, ki, do, di = shapes[name]
    P_out, P_in = proj[name]
    G = G.view(n, do, di)
    G = G if P_out is None else torch.einsum("oa,nab->nob", P_out, G)
    G = G if P_in is None else torch.einsum("nob,ib->noi", G, P_in)
    return G.reshape(n, -1)


# ------------------------------------------------------------------ gradients

def test_watched_layers(setup):
    names = [n for n, _ in setup["layers"]]
    if setup["kind"] == "lora":
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert len(names) == 2 * 4 * SPEC.n_layer            # A and B of c_attn, c_proj, c_fc, mlp.c_proj
    else:
        assert names == [f"transformer.h.{i}.{m}" for i in range(SPEC.n_layer)
                         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        assert "lm_head" not in " ".join(names), "the head (tied to the embedding) is not watched"


def test_hook_gradients_equal_projected_func_gradients(setup):
    """Σ_t (P_out g_t)(P_in x_t)ᵀ from the hooks == P_out G P_inᵀ of torch.func's per-example G."""
    shapes = projection_shapes(setup["layers"], 8, 8, clip=True)
    proj = random_projections(shapes, seed=3)
    hook = _logra(setup, proj, setup["ex"], setup["ref"])
    n = len(setup["ex"])
    for name, _ in setup["layers"]:
        want = _project(setup["func"][name], shapes, proj, name, n)
        assert want.norm() > 0, name
        torch.testing.assert_close(hook[name], want, rtol=1e-9, atol=1e-12 * want.norm().item())
    # and unprojected (k = null): the hooks give the full per-example gradient
    full = _logra(setup, {}, setup["ex"], setup["ref"])
    for name, _ in setup["layers"]:
        torch.testing.assert_close(full[name], setup["func"][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("projection", ["random", "eigen"])
def test_full_rank_scores_equal_exact_influence(setup, projection):
    """Full-rank orthonormal projections (rotations) leave the damped Fisher influence unchanged."""
    s = setup
    shapes = projection_shapes(s["layers"], 10 ** 6, 10 ** 6, clip=True)        # k = width on every side
    if projection == "random":
        proj = random_projections(shapes, seed=0)
    else:
        proj = eigen_projections(shapes, estimate_covariances(s["subject"], s["layers"], s["ex"], s["ref"],
                                                              "dpo", 4))
    for name, (P_out, P_in) in proj.items():      # really rotations, not the identity
        assert P_out.shape[0] == P_out.shape[1] and not torch.allclose(P_out, torch.eye(len(P_out)).double())
    train = _logra(s, proj, s["ex"], s["ref"])
    query = _logra(s, proj, s["q_ex"], s["q_ref"])
    names = [n for n, _ in s["layers"]]
    got, _ = influence_scores([train[n].numpy() for n in names], [query[n].mean(0).numpy() for n in names], 0.1)
    want, _ = influence_scores([s["func"][n].numpy() for n in names],
                               [s["q_func"][n].mean(0).numpy() for n in names], 0.1)
    assert np.abs(want).max() > 0
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    # a rank-deficient projection changes them (the check above has teeth)
    low = random_projections(projection_shapes(s["layers"], 2, 2, clip=True), seed=0)
    lt, lq = _logra(s, low, s["ex"], s["ref"]), _logra(s, low, s["q_ex"], s["q_ref"])
    approx, _ = influence_scores([lt[n].numpy() for n in names], [lq[n].mean(0).numpy() for n in names], 0.1)
    assert np.linalg.norm(approx - want) / np.linalg.norm(want) > 1e-3


def test_scores_do_not_depend_on_batch_size_or_padding(setup, tiny_base):
    s = setup
    proj = random_projections(projection_shapes(s["layers"], 8, 8, clip=True), seed=1)
    ref_grads = _logra(s, proj, s["ex"], s["ref"], batch_size=len(s["ex"]))
    for bs in (1, 3):
        g = _logra(s, proj, s["ex"], s["ref"], batch_size=bs)
        for name in g:
            torch.testing.assert_close(g[name], ref_grads[name], rtol=1e-9, atol=1e-12)
    # padding: the short pair alone vs batched with the longest pair, and another pad token id
    short, long = len(s["ex"]) - 1, len(s["ex"]) - 2
    sub = [s["ex"][short], s["ex"][long]]
    batched = _logra(s, proj, sub, s["ref"][[short, long]], batch_size=2)
    alone = _logra(s, proj, sub[:1], s["ref"][[short]], batch_size=1)
    b = collate(sub, s["subject"].pad_id)
    assert (b.attn[0] == 0).sum() > 10, "the short row really is padded"
    tok = s["subject"].tok
    old = tok.pad_token_id
    try:
        tok.pad_token_id = tok.convert_tokens_to_ids("a")
        other_pad = _logra(s, proj, sub, s["ref"][[short, long]], batch_size=2)
    finally:
        tok.pad_token_id = old
    for name in batched:
        torch.testing.assert_close(batched[name][0], alone[name][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(other_pad[name], batched[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batched[name][0], ref_grads[name][short], rtol=1e-9, atol=1e-12)


def test_dpo_loss_starts_at_log2_and_sft_loss_is_mean_nll(tiny_base, tiny_task):
    model, tok = tiny_base
    s = Subject(clone_model(model).double(), tok, SPEC, 0.1, 128, clone_model(model).double())
    pairs = tiny_task.train[:5]
    ex = encode_pairs(tok, SPEC, pairs, "dpo", 128)
    layers = watched_layers(s.model)
    with GradientLogger(s.model, layers) as lg:
        _, losses = lg.projected(s, collate(ex, s.pad_id), reference_logps(s, ex), "dpo")
    np.testing.assert_allclose(losses.numpy(), np.log(2), atol=1e-12)    # policy == reference
    ex1 = encode_pairs(tok, SPEC, pairs, "sft", 128)
    with GradientLogger(s.model, layers) as lg:
        _, sft = lg.projected(s, collate(ex1, s.pad_id), None, "sft")
    lc, _ = sequence_logps(s.model, tok, SPEC, pairs)
    n_tok = [len(r[0][0]) - r[0][1] for r in ex1]
    np.testing.assert_allclose(sft.numpy(), -lc / np.array(n_tok), rtol=1e-6)


# ------------------------------------------------------------------ the valuer on games

def _inject_game(root, session_cache, tiny_task, tiny_partition, tiny_base, kind, n_per_owner=5, n_eval=6):
    """A game whose grand-coalition stage is put in its (private) cache: no TRL run."""
    (root / "models").symlink_to(session_cache / "models", target_is_directory=True)
    owners = [o[:n_per_owner] for o in tiny_partition.owners]
    train = TRAIN if kind == "full" else LORA_TRAIN
    game = Game(tiny_task, owners, SPEC, train, cache_dir=root, progress=False)
    game.eval = list(tiny_task.eval[:n_eval])        # a short eval set keeps the float64 reference fast
    model, _ = tiny_base
    if kind == "full":
        stage = {"kind": "full", "state": {k: v.clone() for k, v in _perturbed(model).state_dict().items()}}
    else:
        from peft import get_peft_model_state_dict
        stage = {"kind": "lora", "config": _lora_config_dict(train),
                 "state": {k: v.detach().clone() for k, v in
                           get_peft_model_state_dict(_lora_model(model, r=train.lora_r)).items()}}
    stage.update(train_s=0.0, stats={}, meta=game.stage_meta())
    game.cache.put_tensors("stage", game.key((1 << game.n) - 1), stage)
    return game


@pytest.fixture(scope="module", params=["full", "lora"])
def game(request, tmp_path_factory, session_cache, tiny_task, tiny_partition, tiny_base):
    return _inject_game(tmp_path_factory.mktemp(f"g-{request.param}"), session_cache, tiny_task,
                        tiny_partition, tiny_base, request.param)


def test_valuer_matches_naive_reference_on_a_game(game):
    """Full-rank LoGra (float64) == the exact damped empirical-Fisher influence of influence_naive."""
    exact = NaiveInfluence(dtype="float64").value(game, Budget())
    lg = LoGra(k_in=10 ** 6, k_out=10 ** 6, dtype="float64", batch_size=4).value(game, Budget())
    n = sum(game.owner_sizes)
    assert lg.point_values.shape == exact.point_values.shape == (n,)
    rel = np.linalg.norm(lg.point_values - exact.point_values) / np.linalg.norm(exact.point_values)
    assert rel < 1e-4, rel
    np.testing.assert_allclose(lg.owner_values, [lg.point_values[i * 5:(i + 1) * 5].sum() for i in range(3)])
    assert lg.extras["model_kind"] == ("full" if game.train.lora_r is None else "lora")
    assert lg.cost.phases["log_train"] > 0 and lg.cost.device_s >= lg.cost.phases["log_train"]
    assert lg.cost.fine_tunes == 1                      # the grand coalition, from the game


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_lora_model_is_rebuilt_unmerged(game):
    """The peft model the valuer watches gives the game's (merged) model's log-probs."""
    s = load_subject(game)
    assert s.kind == "lora" and hasattr(s.model, "disable_adapter")
    base, tok = game.base()
    merged = materialize(base, game.stages((1 << game.n) - 1))
    a = sequence_logps(s.model, tok, SPEC, game.eval)
    b = sequence_logps(merged, tok, SPEC, game.eval)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)
    with s.reference() as ref:                          # adapter disabled = the base
        np.testing.assert_allclose(sequence_logps(ref, tok, SPEC, game.eval)[0],
                                   sequence_logps(base, tok, SPEC, game.eval)[0], atol=1e-5)
    assert not np.allclose(a[0], sequence_logps(base, tok, SPEC, game.eval)[0], atol=1e-3)


def test_sequential_lora_chain_watches_the_last_stage(tmp_path, session_cache, tiny_task, tiny_partition,
                                                      tiny_base):
    """Sequential game: earlier stages merged into the start model, the last one un-merged."""
    from peft import get_peft_model_state_dict
    (tmp_path / "models").symlink_to(session_cache / "models", target_is_directory=True)
    game = Game(tiny_task, [o[:3] for o in tiny_partition.owners], SPEC, LORA_TRAIN, kind="sequential",
                cache_dir=tmp_path, progress=False)
    model, _ = tiny_base
    for seed, mask in enumerate((0b001, 0b011, 0b111)):
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(_lora_model(model, seed=seed)).items()}
        game.cache.put_tensors("stage", game.key(mask), {"kind": "lora", "config": _lora_config_dict(LORA_TRAIN),
                                                         "state": state, "train_s": 0.0, "stats": {},
                                                         "meta": game.stage_meta()})
    s = load_subject(game)
    chain = game.stages(0b111)
    assert len(chain) == 3 and s.kind == "lora" and s.ref_model is not None      # reference = the base π0
    _, tok = game.base()
    merged = materialize(model, chain)
    np.testing.assert_allclose(sequence_logps(s.model, tok, SPEC, tiny_task.eval[:5])[0],
                               sequence_logps(merged, tok, SPEC, tiny_task.eval[:5])[0], atol=1e-4)
    with s.reference() as ref:
        assert ref is game.base()[0]
    v = LoGra(k_in=4, k_out=4).value(game, Budget())
    assert v.point_values.shape == (9,) and np.isfinite(v.point_values).all()


def test_logs_are_reused_atomic_and_refused_when_foreign(game, tmp_path):
    v1 = LoGra(k_in=4, k_out=4, seed=0)
    a = v1.value(game, Budget())
    d = a.extras["logs_dir"]
    files = sorted(p.name for p in Path(d).iterdir())
    assert {"COMPLETE", "meta.json", "projections.npz", "query.npz"} <= set(files)
    assert sum(f.startswith("layer_") and f.endswith(".npy") for f in files) == a.extras["n_layers"]
    arr = np.load(f"{d}/layer_0000.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape[0] == sum(game.owner_sizes)
    assert not [p for p in Path(d).parent.iterdir() if ".tmp" in p.name]
    assert a.extras["log_bytes"] > 0 and a.extras["log_examples_per_s"] > 0 and not a.extras["logs_reused"]
    # rerun: nothing logged again, same values; another damping reuses the same logs
    b = LoGra(k_in=4, k_out=4, seed=0).value(game, Budget())
    assert b.extras["logs_reused"] and "log_train" not in b.cost.phases and "log_query" not in b.cost.phases
    np.testing.assert_array_equal(a.point_values, b.point_values)
    c = LoGra(k_in=4, k_out=4, seed=0, damping_scale=1.0).value(game, Budget())
    assert c.extras["logs_dir"] == d and c.extras["logs_reused"]
    assert not np.allclose(c.point_values, a.point_values)
    # another projection seed gets its own folder ...
    assert LoGra(k_in=4, k_out=4, seed=1).value(game, Budget()).extras["logs_dir"] != d
    # ... and is refused when pointed at these logs; so is another model
    with pytest.raises(ConfigError) as e:
        LoGra(k_in=4, k_out=4, seed=1, logs_dir=d).value(game, Budget())
    assert one_line(str(e.value)) and "seed" in str(e.value) and "logs_dir" in str(e.value)
    other = game.with_seed(7)                          # another training seed = other weights
    other.eval = game.eval
    full = (1 << game.n) - 1
    other.cache.put_tensors("stage", other.key(full), game.cache.get_tensors("stage", game.key(full)))
    with pytest.raises(ConfigError) as e:
        LoGra(k_in=4, k_out=4, seed=0, logs_dir=d).value(other, Budget())
    assert one_line(str(e.value)) and "model" in str(e.value)
    # a half-written folder is not mistaken for logs
    half = tmp_path / "half"
    half.mkdir()
    (half / "layer_0000.npy").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no finished"):
        LoGra(k_in=4, k_out=4, logs_dir=str(half)).value(game, Budget())


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_truncated_gradient_logs_are_rebuilt(game, capsys):
    """A layer file of finished logs that lost its tail (a power loss before the logs were
    fsynced): the next run says so in one line, logs them again and gets the same values."""
    a = LoGra(k_in=4, k_out=4, seed=3).value(game, Budget())
    layer = Path(a.extras["logs_dir"]) / "layer_0000.npy"
    with open(layer, "r+b") as f:
        f.truncate(layer.stat().st_size - 16)
    b = LoGra(k_in=4, k_out=4, seed=3).value(game, Budget())
    assert not b.extras["logs_reused"] and "layer_0000.npy" in capsys.readouterr().out
    np.testing.assert_array_equal(a.point_values, b.point_values)


def test_sft_loss_and_eigen_projection_run(game):
    v = LoGra(k_in=4, k_out=4, train_loss="sft", projection="eigen").value(game, Budget())
    assert np.all(np.isfinite(v.point_values)) and np.abs(v.point_values).max() > 0
    assert v.extras["train_loss"] == "sft" and "eigen" in v.cost.phases


def test_spent_time_budget_stops_logra(game, tmp_path):
    """Budget(max_seconds) is honoured: the harness's metered block + value raise BudgetExhausted."""
    budget = Budget(max_seconds=1e-6)
    with game.metered(budget):
        with pytest.raises(BudgetExhausted, match="max_seconds"):
            LoGra(k_in=4, k_out=4, logs_dir=str(tmp_path / "logs")).value(game, budget)
    assert not (tmp_path / "logs").exists()


def test_time_budget_is_checked_between_gradient_batches(game, tmp_path, monkeypatch):
    """The game's budget check runs batch by batch through every gradient pass; time
    running out mid-logging stops LoGra there and leaves no half-written logs."""
    n, bs = sum(game.owner_sizes), 2
    calls = []
    monkeypatch.setattr(game, "check_budget", lambda: calls.append(1))
    v = LoGra(k_in=4, k_out=4, batch_size=bs, logs_dir=str(tmp_path / "counted")).value(game, Budget())
    n_batches = -(-n // bs) + -(-len(game.eval) // bs)              # train logging + query
    assert len(calls) >= n_batches + v.extras["n_layers"], (len(calls), n_batches)
    monkeypatch.undo()

    budget = Budget(max_seconds=600)
    with game.metered(budget) as log:
        seen = time_runs_out_at(game, log, 3, monkeypatch)    # at the third batch (inside the train logging)
        with pytest.raises(BudgetExhausted, match="max_seconds=600"):
            LoGra(k_in=4, k_out=4, batch_size=bs, logs_dir=str(tmp_path / "stopped")).value(game, budget)
    assert len(seen) == 3
    assert not (tmp_path / "stopped").exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------ bad input

def test_model_without_trainable_linear_layer(tiny_base):
    model, _ = tiny_base
    frozen = clone_model(model).requires_grad_(False)
    with pytest.raises(ConfigError) as e:
        watched_layers(frozen)
    assert one_line(str(e.value)) and "valuer.layers" in str(e.value)
    with pytest.raises(ConfigError, match="valuer.layers"):
        watched_layers(clone_model(model), pattern="no_such_layer")


def test_k_larger_than_layer_width(tiny_base):
    model, _ = tiny_base
    layers = watched_layers(clone_model(model))
    with pytest.raises(ConfigError) as e:
        projection_shapes(layers, SPEC.n_embd + 1, 4, clip=False)
    msg = str(e.value)
    assert one_line(msg) and "valuer.k_in" in msg and str(SPEC.n_embd) in msg and "clip_k" in msg
    shapes = projection_shapes(layers, SPEC.n_embd + 1, 4, clip=True)
    assert all(s[1] == min(SPEC.n_embd + 1, s[3]) for s in shapes.values())     # clipped to the width


@pytest.mark.parametrize("kw, field", [(dict(projection="pca"), "projection"), (dict(train_loss="ce"), "train_loss"),
                                       (dict(k_in=0), "k_in"), (dict(k_out=2.5), "k_out"),
                                       (dict(damping_scale=0), "damping_scale"), (dict(dtype="half"), "dtype"),
                                       (dict(batch_size=0), "batch_size"), (dict(device="gpu"), "device"),
                                       (dict(layers="attn("), "layers"), (dict(clip_k="yes"), "clip_k")])
def test_bad_settings_are_one_line(kw, field):
    with pytest.raises(ConfigError) as e:
        LoGra(**kw)
    assert one_line(str(e.value)) and f"valuer.logra.{field}" in str(e.value)


def test_settings_are_named_as_written():
    """Errors name the setting under the valuer's own name; unknown keys are refused by name."""
    with pytest.raises(ConfigError, match=r"^valuer\.logra_k8\.k_in: "):
        LoGra(name="logra_k8", k_in=0)
    with pytest.raises(ConfigError, match=r"valuer\.logra\b.*unknown setting") as e:
        LoGra(k=8)
    assert "'k'" in str(e.value) or "logra.k:" in str(e.value)
    s = LoGra(k_in=None, damping_scale=1).settings
    assert s.k_in is None and s.damping_scale == 1 and s.k_out == 16 and s.projection == "random"


# ------------------------------------------------------------------ LDS plumbing

def test_lds_sums_values_over_random_halves():
    from bench.core.lds import lds, lds_subsets

    class FakeGame:      # utility = a known linear function of the subset: LDS must be 1
        metric = "pref_acc"
        owners = [[Pair(i, "s", f"p{i}", "a", "b") for i in range(j * 5, j * 5 + 5)] for j in range(2)]
        calls = []

        def flat_pairs(self):
            return [p for o in self.owners for p in o]

        def subset_utilities(self, subsets):
            self.calls.append(subsets)
            return np.array([sum(p.id ** 2 for p in s) for s in subsets], float)

    g = FakeGame()
    values = np.arange(10.0) ** 2
    out = lds(g, values, m_subsets=8, frac=0.5, seed=0)
    assert out["lds"] == pytest.approx(1.0) and out["n_subsets"] == 8 and out["subset_size"] == 5
    assert len(g.calls) == 1 and len(g.calls[0]) == 8, "one batched (parallel, cached) call"
    assert all([p.id for p in s] == sorted(p.id for p in s) for s in g.calls[0]), "subsets keep the order"
    assert lds_subsets(10, 8, 0.5, 0) == out["subsets"] != lds_subsets(10, 8, 0.5, 1)
    assert lds(g, -values, m_subsets=8)["lds"] == pytest.approx(-1.0)
    for bad in (dict(point_values=values[:3]), dict(m_subsets=2), dict(frac=1.0)):
        kw = dict(point_values=values, m_subsets=8, frac=0.5) | bad
        with pytest.raises(ConfigError) as e:
            lds(g, **kw)
        assert one_line(str(e.value)) and "lds." in str(e.value)


# ------------------------------------------------------------------ end to end (slow)

@pytest.mark.slow
def test_harness_runs_logra_end_to_end(tmp_path):
    """python -m bench experiment=smoke valuer=[retrain_shapley,logra]: a real fine-tuned model."""
    proc = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke", "valuer=[retrain_shapley,logra]",
                           "logger=none", f"results_dir={tmp_path}", "progress=false", "lds.n_subsets=6"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["valuer"]: r for r in read_records(tmp_path) if r["seed"] == 0}
    r = recs["logra"]
    assert r["status"] == "ok", r.get("error")
    pv = np.array(r["point_values"])
    assert pv.shape == (sum(r["owner_sizes"]),) and np.isfinite(pv).all()
    np.testing.assert_allclose(r["owner_values"], [pv[:40].sum(), pv[40:70].sum(), pv[70:].sum()], rtol=1e-9)
    assert r["extras"]["model_kind"] == "full" and r["extras"]["log_bytes"] > 0
    assert "detection_points" in r["metrics"] and r["cost"]["fine_tunes"] == 1
    print("logra owner values", r["owner_values"], "exact", r["exact_values"],
          "fidelity", r["metrics"]["fidelity"], "point detection", r["metrics"]["detection_points"])
    # the flipped owner is the one the influence says hurts most
    assert int(np.argmin(r["owner_values"])) == 2, r["owner_values"]
    # per-pair LDS over 6 retrained random halves x 2 seeds, beside its ceiling; the aggregate LDS apart
    lp = r["metrics"]["lds_pair"]
    print("pair LDS", lp["lds"], [lp["lo"], lp["hi"]], "ceiling", lp["ceiling"], "aggregate", r["metrics"]["lds"])
    assert lp["target"] == "margin" and lp["n_pairs"] > 0 and len(lp["per_pair"]) == 90
    assert np.isfinite(lp["lds"]) and np.isfinite(lp["ceiling"]) and lp["lo"] <= lp["lds"] <= lp["hi"]
    assert r["lds_targets"]["n_subsets"] == 6 and r["lds_targets"]["seeds"] == [100, 101]   # lds.seeds, disjoint
    assert "lds" in r["metrics"] and "lds_pair" not in recs["retrain_shapley"]["metrics"]


# ------------------------------------------------------------------ benchmarks (-m benchmark -p no:xdist)

def _bench_cfg(session_cache, method_k=16):
    return {"model": "tiny", "spec": dataclasses.asdict(SPEC), "task": TASK_KW,
            "n_train": 40, "batch_size": 8, "k": method_k, "naive_proj_dim": method_k * method_k, "lora_r": 0,
            "max_length": 128, "repeats": 3, "threads": torch.get_num_threads(), "cache_dir": str(session_cache)}


@pytest.mark.benchmark
@pytest.mark.parametrize("method", ["logra", "naive", "plain"])
def test_benchmark_gradient_pass(benchmark, method, session_cache, tiny_base):
    """One pass over 40 training pairs: LoGra logging, naive vmap gradients + dense
    projection (same output size), plain forward+backward."""
    from bench.cli.logra_bench import build_workload, make_pass
    cfg = _bench_cfg(session_cache)
    subject, layers, ex, ref = build_workload(cfg)
    run = make_pass(method, subject, layers, ex, ref, cfg)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(method=method, n_examples=len(ex),
                                examples_per_s=len(ex) / benchmark.stats.stats.min)


@pytest.mark.benchmark
def test_benchmark_throughput_and_memory_ratios(benchmark, session_cache, tiny_base):
    """Each method in a fresh process: examples/s and peak RSS growth; LoGra's ratios."""
    from bench.cli.logra_bench import compare, format_compare
    cfg = _bench_cfg(session_cache)
    out = benchmark.pedantic(lambda: compare(cfg), rounds=1, iterations=1)
    print("\n" + format_compare(out, cfg))
    benchmark.extra_info.update(out["ratios"])
    for m, r in out["methods"].items():
        benchmark.extra_info[f"{m}_examples_per_s"] = r["examples_per_s"]
        benchmark.extra_info[f"{m}_peak_mem_bytes"] = r["peak_mem_bytes"]
    assert all(v > 0 for v in out["ratios"].values())
    assert out["methods"]["logra"]["out_dim"] == out["methods"]["naive"]["out_dim"]


@pytest.mark.parametrize("game", ["lora"], indirect=True)
def test_logs_and_query_are_built_under_their_build_locks(game, monkeypatch, tmp_path):
    """Two jobs sharing a cache write one set of logs: the logs folder and the query vectors
    are each built under ``build_lock`` (its cross-process behaviour: tests/test_storage.py)."""
    from conftest import record_build_locks

    import valuers.logra as LG
    held = record_build_locks(monkeypatch, LG)
    logs = tmp_path / "logs"
    first = LoGra(k_in=4, k_out=4, batch_size=4, logs_dir=str(logs)).value(game, Budget())
    assert held == [logs, logs / "query.npz"] and not first.extras["logs_reused"]
    again = LoGra(k_in=4, k_out=4, batch_size=4, logs_dir=str(logs)).value(game, Budget())
    assert held == [logs, logs / "query.npz"] and again.extras["logs_reused"]      # finished: no lock taken
