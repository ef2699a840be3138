"""The valuation game on the tiny tier: v(∅), determinism, the sequential game's
prefix stages, cache keys, scoring against a direct computation and against TRL,
and what happens when training does nothing or blows up."""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest
import torch
from conftest import SPEC, TRAIN

from bench.core.game import Game
from bench.core.partition import make_partition
from bench.core.shapley import exact_shapley
from bench.core.task import Pair
from bench.core.models import render_prompt, render_response
from bench.core.train import (FineTuneDiverged, clone_model, dpo_stage, materialize, sequence_logps, to_dataset,
                         tokenize_pair, utility_metrics)


def _pref_acc(lc, lr):
    d = np.asarray(lc) - np.asarray(lr)
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def _state_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ v(∅)

def test_empty_coalition_is_base_model(fresh_cache, make_game, tiny_base, tiny_task, monkeypatch):
    import bench.core.game
    def no_training(*a, **k):
        raise AssertionError("v(∅) must not train")
    monkeypatch.setattr(bench.core.game, "dpo_train", no_training)
    game = make_game(fresh_cache)
    model, tok = tiny_base
    lc, lr = sequence_logps(model, tok, SPEC, tiny_task.eval)
    v0 = game.utility(0)
    assert v0 == pytest.approx(_pref_acc(lc, lr), abs=1e-12)
    rec = game.record(0)
    assert rec["n_train"] == 0 and rec["train_s"] == 0
    np.testing.assert_allclose(rec["logp_chosen"], lc, atol=1e-9)
    np.testing.assert_allclose(rec["logp_rejected"], lr, atol=1e-9)
    # relative to itself the base has zero implicit reward
    assert rec["metrics"]["margin"] == 0 and rec["metrics"]["reward_acc"] == 0.5
    assert game.cache.count("stage") == 0
    assert game.log.entries[0]["trained"] is False
    # the same in the sequential game
    assert make_game(fresh_cache, kind="sequential").utility(0) == pytest.approx(v0, abs=1e-12)


# ------------------------------------------------------------------ determinism

def test_utility_is_deterministic(tmp_path, make_game, session_cache):
    recs = []
    for i in range(2):
        root = tmp_path / f"c{i}"
        root.mkdir()
        (root / "models").symlink_to(session_cache / "models", target_is_directory=True)
        game = make_game(root, seed=0)
        recs.append(game.record(0b011))
        assert game.log.entries[0b011]["fresh"] is True
    a, b = recs
    assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-12)
    np.testing.assert_allclose(a["logp_chosen"], b["logp_chosen"], atol=1e-6)
    np.testing.assert_allclose(a["logp_rejected"], b["logp_rejected"], atol=1e-6)
    assert a["stats"]["first_loss"] == pytest.approx(np.log(2), abs=1e-6), "DPO starts at log 2"


# ------------------------------------------------------------------ sequential

def test_sequential_game_builds_on_prefix_stages(fresh_cache, make_game, tiny_base, tiny_task,
                                                tiny_partition):
    seq = make_game(fresh_cache, kind="sequential")
    seq.table()
    assert seq.cache.count("stage") == 7, "one stage per non-empty coalition"
    chain = seq.stages(0b011)
    assert len(chain) == 2
    assert _state_equal(chain[0]["state"], seq.stages(0b001)[0]["state"])
    assert len(seq.stages(0b111)) == 3 and len(seq.stages(0b101)) == 2
    assert _state_equal(seq.stages(0b101)[0]["state"], chain[0]["state"]), "{0,2} starts from {0}"

    # stage {0,1}: DPO on owner 1 from (and referenced to) the {0} model
    model, tok = tiny_base
    start = materialize(model, [chain[0]])
    stage, _ = dpo_stage(start, tok, SPEC, tiny_partition.owners[1], TRAIN, seed=0)
    lc, lr = sequence_logps(materialize(model, [chain[0], stage]), tok, SPEC, tiny_task.eval)
    rec = seq.record(0b011)
    np.testing.assert_allclose(rec["logp_chosen"], lc, atol=1e-5)
    np.testing.assert_allclose(rec["logp_rejected"], lr, atol=1e-5)

    # a singleton trains the same thing in both games
    uni = make_game(fresh_cache, kind="union")
    for m in (0b001, 0b010, 0b100):
        assert uni.key(m) != seq.key(m)
        a, b = uni.record(m), seq.record(m)
        assert a["metrics"]["pref_acc"] == b["metrics"]["pref_acc"]
        np.testing.assert_allclose(a["logp_chosen"], b["logp_chosen"], atol=1e-6)
    assert uni.cache.count("stage") == 7 + 3          # union keeps only singleton stages
    # ... but coalitions differ: the union of {0,1} is one run on pooled data
    assert not np.allclose(uni.record(0b011)["logp_chosen"], rec["logp_chosen"], atol=1e-4)
    assert uni.cache.count("stage") == 10, "union does not store non-singleton stages"


# ------------------------------------------------------------------ keys

def test_cache_key_covers_what_decides_a_utility(tmp_path, tiny_task, tiny_partition):
    def game(**kw):
        base = dict(partition=tiny_partition, model=SPEC, train=TRAIN, kind="union",
                    seed=0, metric="pref_acc", cache_dir=tmp_path, progress=False)
        kw = {**base, **kw}
        return Game(tiny_task, kw.pop("partition"), **kw)
    ref = game()
    full = 0b111
    k = ref.key(full)
    assert k == game().key(full)
    assert len({ref.key(m) for m in range(8)}) == 8
    assert game(seed=1).key(full) != k
    assert ref.with_seed(1).key(full) == game(seed=1).key(full)
    assert game(kind="sequential").key(full) != k
    for change in (dict(lr=1e-4), dict(beta=0.2), dict(epochs=2), dict(batch_size=4), dict(lora_r=4),
                   dict(max_length=64)):
        assert game(train=dataclasses.replace(TRAIN, **change)).key(full) != k, change
    assert game(model=dataclasses.replace(SPEC, n_embd=64)).key(full) != k
    # not: the metric, the scoring batch size, where the cache is, how many workers
    assert game(metric="margin").key(full) == k
    assert game(train=dataclasses.replace(TRAIN, score_batch_size=7)).key(full) == k
    assert game(cache_dir=tmp_path / "elsewhere").key(full) == k
    # owner data: one flipped example in owner 2 changes every coalition holding owner 2 only
    owners = [list(o) for o in tiny_partition.owners]
    p = owners[2][0]
    owners[2][0] = dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen)
    changed = game(partition=dataclasses.replace(tiny_partition, owners=owners))
    for m in range(8):
        assert (changed.key(m) != ref.key(m)) == bool(m & 0b100), m
    # a coalition is named by its data, not by owner numbers
    swapped = dataclasses.replace(tiny_partition, owners=[owners[1], owners[0], owners[2]])
    assert game(partition=swapped).key(0b001) == game().key(0b010)
    # union: pooled data, so renumbering owners changes nothing; sequential: the order is the game
    assert game(partition=swapped).key(0b011) == game().key(0b011)
    assert game(partition=swapped, kind="sequential").key(0b011) != game(kind="sequential").key(0b011)


def test_union_duplicate_owners_are_exact_twins(fresh_cache, make_game, tiny_task):
    """Union game: an exact copy of an owner is the same player (same data, same v)."""
    part = make_partition(tiny_task, "by_source", owner_sources=["capitals", "tone", "reversal"],
                          duplicate_pairs=[[3, 1]])
    game = make_game(fresh_cache, partition=part)
    assert game.key(0b0010) == game.key(0b1000)
    assert game.key(0b0011) == game.key(0b1001) and game.key(0b0111) == game.key(0b1101)
    assert game.key(0b1010) != game.key(0b0010), "two copies is more data than one"
    v1 = game.utility(0b0010)
    v3 = game.utility(0b1000)
    assert v1 == v3 and game.log.entries[0b1000]["fresh"] is False
    seq = make_game(fresh_cache, partition=part, kind="sequential")
    assert seq.key(0b0011) == seq.key(0b1001)          # same data in the same order
    assert seq.key(0b0110) != seq.key(0b1100)          # data1 then data2 vs data2 then data1
    assert game.key(0b0110) == game.key(0b1100)        # ... which the union game does not tell apart


def test_metric_shares_the_cache(fresh_cache, make_game):
    a = make_game(fresh_cache, metric="pref_acc")
    rec = a.record(0b001)
    b = make_game(fresh_cache, metric="bt_loglik")
    assert b.utility(0b001) == rec["metrics"]["bt_loglik"]
    assert b.log.entries[0b001]["fresh"] is False


# ------------------------------------------------------------------ scoring

def _odd_pairs(tiny_task):
    """Eval pairs plus a few of very different lengths (lots of padding in a batch)."""
    extra = [Pair(1000, "x", "Reverse the word apple.", "elppa", "elpap"),
             Pair(1001, "x", "Reply to: " + "My cat is sick. " * 4, "Of course, let me help." * 2, "No."),
             Pair(1002, "x", "a", "b", "c")]
    return list(tiny_task.eval[:12]) + extra


def _direct_logps(model, tok, pairs):
    """Full-vocabulary log-softmax of model(input_ids).logits, one unpadded sequence at a time."""
    out = []
    with torch.no_grad():
        for p in pairs:
            prompt = render_prompt(tok, SPEC, p.prompt)
            p_ids = tok(prompt)["input_ids"]
            row = []
            for resp in (p.chosen, p.rejected):
                ids = tok(prompt + render_response(SPEC, resp) + tok.eos_token)["input_ids"]
                assert ids[:len(p_ids)] == p_ids and ids[-1] == tok.eos_token_id
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
                lp = torch.log_softmax(logits, -1)
                row.append(sum(lp[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids))))
            out.append(row)
    a = np.array(out)
    return a[:, 0], a[:, 1]


@pytest.fixture(scope="module")
def trained_model(tiny_base, tiny_partition):
    """A model that has moved away from the base (scoring must hold for any weights)."""
    model, tok = tiny_base
    stage, _ = dpo_stage(model, tok, SPEC, tiny_partition.owners[1],
                         dataclasses.replace(TRAIN, lr=5e-3), seed=0)
    return materialize(model, [stage])


@pytest.mark.parametrize("which", ["base", "trained"])
def test_sequence_logps_matches_full_logits(tiny_base, tiny_task, trained_model, which):
    model, tok = tiny_base
    model = model if which == "base" else trained_model
    pairs = _odd_pairs(tiny_task)
    lc_ref, lr_ref = _direct_logps(model, tok, pairs)
    lc, lr = sequence_logps(model, tok, SPEC, pairs, batch_size=64)
    np.testing.assert_allclose(lc, lc_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lr, lr_ref, atol=1e-5, rtol=0)
    assert (lc < 0).all() and (lr < 0).all()
    # batch size and padding do not matter
    lc1, lr1 = sequence_logps(model, tok, SPEC, pairs, batch_size=1)
    lc3, lr3 = sequence_logps(model, tok, SPEC, pairs, batch_size=3)
    np.testing.assert_allclose(lc1, lc, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lr1, lr, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lc3, lc, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lr3, lr, atol=1e-5, rtol=0)
    # neither does which token pads, nor which other pairs share the batch
    old = tok.pad_token_id
    try:
        tok.pad_token_id = tok.convert_tokens_to_ids("a")
        lcp, lrp = sequence_logps(model, tok, SPEC, pairs, batch_size=64)
    finally:
        tok.pad_token_id = old
    np.testing.assert_allclose(lcp, lc, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lrp, lr, atol=1e-5, rtol=0)
    lcs, lrs = sequence_logps(model, tok, SPEC, pairs[-3:], batch_size=64)
    np.testing.assert_allclose(lcs, lc[-3:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(lrs, lr[-3:], atol=1e-5, rtol=0)


def _dpo_trainer(model, tok, pairs, out):
    from trl import DPOConfig, DPOTrainer
    s = TRAIN
    args = DPOConfig(output_dir=out, beta=s.beta, learning_rate=s.lr, num_train_epochs=s.epochs,
                     per_device_train_batch_size=s.batch_size, max_length=s.max_length,
                     weight_decay=s.weight_decay, lr_scheduler_type=s.scheduler, warmup_steps=s.warmup_ratio,
                     seed=0, data_seed=0, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0)
    return DPOTrainer(model=clone_model(model), ref_model=clone_model(model), args=args, processing_class=tok,
                      train_dataset=to_dataset(pairs, tok, SPEC))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("which", ["base", "trained"])
def test_sequence_logps_matches_trl_reference(tiny_base, tiny_task, trained_model, which):
    model, tok = tiny_base
    model = model if which == "base" else trained_model
    pairs = _odd_pairs(tiny_task)[9:]
    with tempfile.TemporaryDirectory() as out:
        trainer = _dpo_trainer(model, tok, pairs, out)
        ds = trainer.train_dataset
        for i, p in enumerate(pairs):   # the same tokenisation as TRL
            p_ids, c_ids, r_ids = tokenize_pair(tok, SPEC, p)
            assert (ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]) == (p_ids, c_ids, r_ids)
        batch = trainer.data_collator([ds[i] for i in range(len(pairs))])
        with torch.no_grad():
            ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        # and through the dataloader TRL trains from (shuffled): match by prompt length multiset
        dl_batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            dl_c, dl_r = trainer.compute_ref_log_probs(trainer.ref_model, dl_batch)
    lc, lr = sequence_logps(model, tok, SPEC, pairs)
    np.testing.assert_allclose(lc, ref_c.double().numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(lr, ref_r.double().numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(sorted(lc), sorted(dl_c.double().numpy()), atol=1e-4, rtol=0)
    np.testing.assert_allclose(sorted(lr), sorted(dl_r.double().numpy()), atol=1e-4, rtol=0)


def test_utility_metrics_definitions():
    lc, lr = np.array([-1.0, -2.0, -3.0, -4.0]), np.array([-2.0, -1.0, -3.0, -5.0])
    blc, blr = np.array([-1.5, -1.5, -3.0, -4.0]), np.array([-1.5, -1.5, -3.0, -4.0])
    m = utility_metrics(lc, lr, blc, blr, beta=0.5)
    assert m["pref_acc"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    d = (lc - blc) - (lr - blr)                        # [1, -1, 0, 1]
    assert m["reward_acc"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["margin"] == pytest.approx(np.mean(0.5 * d))
    assert m["bt_loglik"] == pytest.approx(np.mean(np.log(1 / (1 + np.exp(-0.5 * d)))))


# ------------------------------------------------------------------ training edge cases

def test_dpo_stage_leaves_start_model_alone(tiny_base, tiny_partition):
    model, tok = tiny_base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage, stats = dpo_stage(model, tok, SPEC, tiny_partition.owners[0], dataclasses.replace(TRAIN, lr=1e-2),
                             seed=0)
    assert _state_equal(model.state_dict(), before)
    assert not _state_equal(stage["state"], before), "a real learning rate must change the weights"
    assert stats["steps"] == 3                          # 20 pairs, batch 8, one epoch


def test_zero_learning_rate_changes_nothing(fresh_cache, make_game, tiny_base, tiny_partition):
    model, tok = tiny_base
    s0 = dataclasses.replace(TRAIN, lr=0.0)
    stage, stats = dpo_stage(model, tok, SPEC, tiny_partition.owners[0], s0, seed=0)
    assert _state_equal(stage["state"], model.state_dict())
    assert stats["final_loss"] == pytest.approx(np.log(2), abs=1e-6)
    # so in the game every coalition is worth v(∅) and every Shapley value is 0
    game = make_game(fresh_cache, train=s0)
    table = game.table([0, 0b101, 0b111])
    assert table[0b101] == table[0] and table[0b111] == table[0]
    assert game.record(0b111)["metrics"]["margin"] == pytest.approx(0, abs=1e-9)


def test_huge_learning_rate_never_returns_nan(fresh_cache, make_game, tiny_base, tiny_partition):
    model, tok = tiny_base
    s = dataclasses.replace(TRAIN, lr=1e6)
    try:
        stage, _ = dpo_stage(model, tok, SPEC, tiny_partition.owners[0], s, seed=0)
    except FineTuneDiverged as e:
        diverged = True
        assert "train.lr" in str(e) and "\n" not in str(e)
    else:
        diverged = False
        assert all(torch.isfinite(v).all() for v in stage["state"].values())
    game = make_game(fresh_cache, train=s)
    v0 = game.utility(0)
    assert np.isfinite(v0)
    if diverged:
        with pytest.raises(FineTuneDiverged):
            game.utility(0b001)
        assert game.cache.get_json("utility", game.key(0b001)) is None, "a failure is not cached"
        with pytest.raises(FineTuneDiverged):
            make_game(fresh_cache, train=s).table()
    else:
        table = game.table()
        assert np.isfinite(table).all()
        assert np.isfinite(exact_shapley(table)).all()
    for lr in (1e3,):                                     # large but finite: values stay finite
        g = make_game(fresh_cache, train=dataclasses.replace(TRAIN, lr=lr))
        try:
            rec = g.record(0b001)
        except FineTuneDiverged:
            continue
        assert all(np.isfinite(x) for x in rec["metrics"].values())
        assert np.isfinite(rec["logp_chosen"]).all() and np.isfinite(rec["logp_rejected"]).all()


def test_unknown_game_or_metric(tmp_path, tiny_task, tiny_partition):
    from bench.core.errors import ConfigError
    for kw in (dict(kind="nope"), dict(metric="nope")):
        with pytest.raises(ConfigError) as e:
            Game(tiny_task, tiny_partition, SPEC, TRAIN, cache_dir=tmp_path, **kw)
        assert "\n" not in str(e.value) and "nope" in str(e.value)


# ------------------------------------------------------------------ the science

def test_flipped_owner_hurts(fresh_cache, make_game, tiny_task):
    """Training on flipped reversal pairs lowers reversal preference accuracy vs training on clean ones."""
    clean = make_partition(tiny_task, "by_source", owner_sources=["capitals", "tone", "reversal"])
    noisy = make_partition(tiny_task, "by_source", owner_sources=["capitals", "tone", "reversal"],
                           noisy_owners=[2])
    s = dataclasses.replace(TRAIN, epochs=3, lr=3e-3)
    rev = np.array([p.source == "reversal" for p in tiny_task.eval])
    accs = {}
    for name, part in (("clean", clean), ("noisy", noisy)):
        rec = make_game(fresh_cache, partition=part, train=s).record(0b100)
        d = np.array(rec["logp_chosen"]) - np.array(rec["logp_rejected"])
        accs[name] = float(np.mean(d[rev]))
    print("reversal eval margin", accs)
    assert accs["noisy"] < accs["clean"], accs


def test_subsets_train_like_coalitions_and_are_cached(fresh_cache, make_game):
    """A training set given as pairs (LDS, SHED) is the same fine-tune as the coalition
    holding exactly those pairs, is cached by content, and the empty set is the base."""
    game = make_game(fresh_cache)
    owner0 = game.owners[0]
    v_sub = game.subset_record(owner0)["metrics"]["pref_acc"]
    assert v_sub == game.utility(0b001)            # same data, same seed, same training
    assert game.subset_record([])["metrics"] == game.record(0)["metrics"]
    half = owner0[: len(owner0) // 2]
    u = game.subset_utilities([half, owner0, []])
    assert u[1] == v_sub and u[2] == game.utility(0)
    assert game.log.entries[game._item_key(__import__("bench.core.game").core.game.Subset(tuple(half)))]["trained"]
    again = make_game(fresh_cache)
    again.subset_utilities([half])
    assert not any(e["fresh"] for e in again.log.entries.values())


def test_valuers_cannot_reach_the_ground_truth(fresh_cache, make_game):
    """The game holds owners' data and the eval set; no planted labels, no clean pool."""
    game = make_game(fresh_cache)
    public = {k for k in vars(game) if not k.startswith("_")}
    assert not {"partition", "truth", "task"} & public
    assert not any(hasattr(v, "noisy_owners") or hasattr(v, "corrupted_ids") for v in vars(game).values())


def test_with_eval_scores_on_other_pairs(fresh_cache, make_game, tiny_task):
    """A game over the same data scored on a held-out split: another eval set, other
    cache entries, the same seed and owners; with_seed keeps the eval set."""
    from bench.core.task import synthetic_pref
    from conftest import TASK_KW
    test = synthetic_pref(**TASK_KW, n_test_per_source=4).test
    game = make_game(fresh_cache)
    held = game.with_eval(test)
    assert held.eval == test and held.owners == game.owners and held.seed == game.seed
    assert held.key(1) != game.key(1)
    assert held.with_seed(3).eval == test
    rec = held.record(0b001)
    assert len(rec["logp_chosen"]) == len(test)
    assert len(game.record(0b001)["logp_chosen"]) == len(tiny_task.eval)
    from bench.core.errors import ConfigError
    with pytest.raises(ConfigError, match="eval pairs"):
        game.with_eval([])


def test_gradient_checkpointing_changes_only_the_arithmetic_order(make_game, fresh_cache):
    """``train.gradient_checkpointing=false`` (the default) skips the backward-pass
    recomputation: a setting in the cache key, and on the CPU the very same fine-tune
    (the recomputed activations equal the stored ones bit for bit)."""
    from dataclasses import replace
    assert TRAIN.gradient_checkpointing is False
    on = make_game(fresh_cache, train=replace(TRAIN, gradient_checkpointing=True))
    off = make_game(fresh_cache)
    assert on.key(0b001) != off.key(0b001)
    a, b = on.record(0b001), off.record(0b001)
    assert b["n_train"] == a["n_train"] > 0
    assert a["logp_chosen"] == b["logp_chosen"] and a["logp_rejected"] == b["logp_rejected"]


# ------------------------------------------------------------------ shared work once per game

def _trl_in_loop(model, tok, pairs, s, seed):
    """The fine-tune as TRL does it unaided: its own tokenisation, a reference copy of
    the model run in every training step, activation checkpointing on (TRL's default)."""
    from trl import DPOConfig, DPOTrainer
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, beta=s.beta, learning_rate=s.lr, num_train_epochs=s.epochs,
                         per_device_train_batch_size=s.batch_size, max_length=s.max_length,
                         weight_decay=s.weight_decay, lr_scheduler_type=s.scheduler, warmup_steps=s.warmup_ratio,
                         seed=seed, data_seed=seed, use_cpu=True, bf16=False, gradient_checkpointing=True,
                         precompute_ref_log_probs=False, report_to="none", save_strategy="no", logging_steps=1,
                         disable_tqdm=True, dataloader_num_workers=0)
        trainer = DPOTrainer(model=clone_model(model), ref_model=clone_model(model), args=args,
                             processing_class=tok, train_dataset=to_dataset(pairs, tok, SPEC))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return state, losses


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_shared_work_gives_the_fine_tune_trl_gives_unaided(make_game, fresh_cache, tiny_base, tiny_task):
    """The game tokenises once, computes the reference log-probs once (TRL's precompute,
    over the whole pool in pool order), trains without checkpointing and scores the
    model it trained. Against TRL unaided (in-loop reference, checkpointing on, its own
    tokenisation, the model rebuilt from the stage): the tokenisation and the scoring
    of given weights are bit-identical; the reference log-probs agree to 1e-5 nats
    (their forward runs over other batches: other padded lengths and row counts, so
    the matmuls sum in another order), and so the trained weights (to 1e-4 after 10
    Adam steps of lr 5e-3: Adam's normalised step turns the 1e-9 gradient differences
    of near-zero-gradient weights into visible ones), losses and eval log-probs agree
    to fp tolerance and the utilities exactly."""
    model, tok = tiny_base
    s = dataclasses.replace(TRAIN, epochs=2, lr=5e-3)
    game = make_game(fresh_cache, train=s)
    mask = 0b011
    pairs = game._pairs(mask)
    old_state, old_losses = _trl_in_loop(model, tok, pairs, s, seed=0)
    rec = game.record(mask)
    new_stage = game.stages(mask)[-1]
    # tokenisation: the pool's rows are TRL's own, bit for bit
    ready = game.examples(pairs)
    rows = ready.rows_for(pairs)
    for i, p in enumerate(pairs):
        assert (rows[i]["prompt_ids"], rows[i]["chosen_ids"], rows[i]["rejected_ids"]) == tokenize_pair(tok, SPEC, p)
    # reference log-probs: TRL's precompute over the pool vs this coalition's own batches
    lc, lr = sequence_logps(model, tok, SPEC, pairs)
    np.testing.assert_allclose(rows["ref_chosen_logps"], lc, atol=1e-5, rtol=0)
    np.testing.assert_allclose(rows["ref_rejected_logps"], lr, atol=1e-5, rtol=0)
    # the trained weights and losses
    for k, v in old_state.items():
        np.testing.assert_allclose(new_stage["state"][k].numpy(), v.numpy(), atol=1e-4, rtol=0, err_msg=k)
    assert rec["stats"]["steps"] == len(old_losses)
    assert rec["stats"]["first_loss"] == pytest.approx(old_losses[0], abs=1e-6)
    assert rec["stats"]["final_loss"] == pytest.approx(old_losses[-1], abs=1e-5)
    # scoring the live model == scoring the model rebuilt from its stage, bit for bit
    re_c, re_r = sequence_logps(materialize(model, [new_stage]), tok, SPEC, tiny_task.eval)
    assert rec["logp_chosen"] == re_c.tolist() and rec["logp_rejected"] == re_r.tolist()
    # and the utility the unaided fine-tune gives
    old_c, old_r = sequence_logps(materialize(model, [{"kind": "full", "state": old_state}]), tok, SPEC,
                                  tiny_task.eval)
    np.testing.assert_allclose(rec["logp_chosen"], old_c, atol=1e-4, rtol=0)
    np.testing.assert_allclose(rec["logp_rejected"], old_r, atol=1e-4, rtol=0)
    base = game.record(0)
    old_metrics = utility_metrics(old_c, old_r, np.array(base["logp_chosen"]), np.array(base["logp_rejected"]),
                                  s.beta)
    assert rec["metrics"]["pref_acc"] == old_metrics["pref_acc"]
    assert rec["metrics"]["margin"] == pytest.approx(old_metrics["margin"], abs=1e-5)


def test_pool_prepared_once_and_no_reference_pass_per_coalition(make_game, fresh_cache, monkeypatch):
    """Every coalition and seed of a game reads the pool TRL prepared once per process:
    no coalition re-tokenises or runs a reference forward pass."""
    import bench.core.game as G
    import bench.core.train as T
    from trl.trainer.dpo_trainer import DPOTrainer
    monkeypatch.setattr(G, "_PROCESS_EXAMPLES", {})
    calls = {"prepare": 0, "tokenise": 0, "reference": 0}
    prepare = T.prepare_examples

    def counting_prepare(*a, **k):
        calls["prepare"] += 1
        return prepare(*a, **k)
    monkeypatch.setattr(G, "prepare_examples", counting_prepare)
    for name, method in (("tokenise", "_prepare_dataset"), ("reference", "compute_ref_log_probs")):
        original = getattr(DPOTrainer, method)
        monkeypatch.setattr(DPOTrainer, method, lambda self, *a, _o=original, _n=name, **k:
                            (calls.__setitem__(_n, calls[_n] + 1), _o(self, *a, **k))[1])
    game = make_game(fresh_cache)
    game.table([0b001, 0b110])
    after_first = dict(calls)
    assert after_first["prepare"] == 1 and after_first["tokenise"] == 1 and after_first["reference"] >= 1
    game.with_seed(7).table([0b011, 0b101, 0b111])
    game.subset_utilities([game.flat_pairs()[:5]])
    assert calls == after_first, "coalitions, other seeds and subsets must reuse the prepared pool"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_one_worker_pool_per_job_loads_the_base_once(make_game, fresh_cache):
    """n_jobs = 2: the coalitions of two seeds (two phases) go through one pool whose
    workers keep their base and prepared pool; the wall time the game reports for its
    fresh fine-tunes is wall time (<= the elapsed time), not the workers' summed seconds."""
    import time as _time

    from bench.core.game import POOL_IDLE_S, _init_worker
    from bench.core.metering import fresh_compute_s
    from joblib.externals.loky import get_reusable_executor

    def worker_state():          # defined here: pickled by value into the worker
        import os as _os

        import bench.core.game as G
        return _os.getpid(), len(G._PROCESS_BASES), len(G._PROCESS_EXAMPLES)
    game = make_game(fresh_cache)
    game.n_jobs = 2
    t0 = _time.perf_counter()
    game.table([0b001, 0b010, 0b011, 0b100])
    game.with_seed(5).table([0b001, 0b010, 0b101, 0b110])
    wall = _time.perf_counter() - t0
    pool = get_reusable_executor(max_workers=2, timeout=POOL_IDLE_S, initializer=_init_worker, initargs=(2,))
    states = {pool.submit(worker_state).result() for _ in range(8)}
    assert all(bases <= 1 and pools <= 1 for _, bases, pools in states), states   # never reloaded
    assert any(bases == 1 for _, bases, _ in states), states
    assert game.log.busy_s <= wall
    assert fresh_compute_s(game.log) > 0
    assert game.with_seed(5).table([0b001])[0b001] == game.with_seed(5).utility(0b001)


def test_clone_model_is_an_equal_independent_tied_copy(tiny_base):
    """clone_model skips the random init it would overwrite: same weights, same tying
    (GPT-2 ties its output head to the embedding), same outputs, no shared storage."""
    model, _ = tiny_base
    new = clone_model(model)
    assert _state_equal(new.state_dict(), model.state_dict())
    tied = lambda m: m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    assert tied(new) == tied(model) and model.config.tie_word_embeddings
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(new(ids).logits, model(ids).logits)
        next(new.parameters()).add_(1.0)
    assert not _state_equal(new.state_dict(), model.state_dict())


# ------------------------------------------------------------------ packed coalitions (game.pack)

LORA = dataclasses.replace(TRAIN, lora_r=4, lora_alpha=8, lr=1e-2)


def test_packed_game_matches_one_by_one(make_game, fresh_cache, tiny_task, tiny_partition):
    """game.pack = 3: coalitions trained as adapters packed on one base give the
    utilities of the one-by-one game (eval log-probs to fp tolerance), under keys of
    their own (packing rounds differently, so the two never mix in the cache)."""
    from bench.core.game import Game
    solo = make_game(fresh_cache, train=LORA)
    packed = Game(tiny_task, tiny_partition, SPEC, LORA, seed=0, cache_dir=fresh_cache, progress=False, pack=3)
    masks = [0b000, 0b001, 0b010, 0b011, 0b110, 0b111]      # the base among them: not packed
    assert all(solo.key(m) != packed.key(m) for m in masks[1:])
    a, b = solo.table(masks), packed.table(masks)
    for m in masks[1:]:
        ra, rb = solo.record(m), packed.record(m)
        assert rb["packed"] in (2, 3) and rb["n_train"] == ra["n_train"]
        np.testing.assert_allclose(rb["logp_chosen"], ra["logp_chosen"], atol=2e-4, rtol=0)
        np.testing.assert_allclose(rb["logp_rejected"], ra["logp_rejected"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(a[masks], b[masks], atol=1.0 / len(tiny_task.eval) + 1e-9)
    # the kept stages (singletons, grand coalition) rebuild the model that was scored
    lc, _ = sequence_logps(packed.trained_model(0b111), *[packed.base()[1]], SPEC, tiny_task.eval)
    assert lc.tolist() == packed.record(0b111)["logp_chosen"]


def test_a_diverging_packed_coalition_fails_alone(make_game, fresh_cache, tiny_task, tiny_partition, monkeypatch):
    """One adapter of a pack diverges: its coalition is raised as FineTuneDiverged,
    the others of the pack are cached and not retrained."""
    import bench.core.packed as P
    from bench.core.game import Game
    real = P.dpo_train_packed

    def one_diverges(start, tok, spec, coalitions, s, seed, examples):
        out = real(start, tok, spec, coalitions, s, seed, examples)
        out[1] = FineTuneDiverged("non-finite loss after 2 steps (lr=0.01); lower train.lr")
        return out
    monkeypatch.setattr(P, "dpo_train_packed", one_diverges)
    game = Game(tiny_task, tiny_partition, SPEC, LORA, seed=0, cache_dir=fresh_cache, progress=False, pack=3)
    with pytest.raises(FineTuneDiverged, match="packed with 2 others"):
        game.prefetch([0b001, 0b010, 0b100])
    cached = [m for m in (0b001, 0b010, 0b100) if game.cache.get_json("utility", game.key(m)) is not None]
    assert cached == [0b001, 0b100]


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_twin_owners_in_one_pack_are_trained_and_locked_once(fresh_cache, tiny_task, n_jobs):
    """Owner 3 is an exact copy of owner 1, so coalitions {1} and {3} (and {0, 1} and
    {0, 3}) are one fine-tune under one cache key. Packed into one batch, the key is
    locked once and trained once (a second lock on the same file in one thread was a
    filelock 'Deadlock' error, and across processes a wait without end); in the
    process and through the worker pool."""
    from bench.core.game import Game
    part = make_partition(tiny_task, "by_source", owner_sources=["capitals", "tone", "reversal"],
                          duplicate_pairs=[[3, 1]])
    game = Game(tiny_task, part, SPEC, LORA, seed=0, cache_dir=fresh_cache, progress=False, pack=4, n_jobs=n_jobs)
    twins = [0b0010, 0b1000, 0b0011, 0b1001]
    assert game.key(0b0010) == game.key(0b1000) and game.key(0b0011) == game.key(0b1001)
    if n_jobs == 1:
        got = game._get_or_compute_batch(tuple(twins))
        assert sorted(it for it, _, _ in got) == sorted(twins)
        assert sum(fresh for _, _, fresh in got) == 2          # two fine-tunes for four coalitions
        rec = {it: r for it, r, _ in got}
        assert rec[0b0010] is rec[0b1000] and rec[0b0011] is rec[0b1001] and rec[0b0011]["packed"] == 2
    else:
        table = game.table(twins)
        assert table[0b0010] == table[0b1000] and table[0b0011] == table[0b1001]
        assert [game.record(m)["packed"] for m in twins] == [2, 2, 2, 2]


def test_a_kept_sequential_stage_is_trained_under_its_lock_and_read_after_it(fresh_cache, make_game, monkeypatch):
    """Shards that need the same sequential prefix: the stage is trained under a lock
    and a process that waited reads the stored weights instead of training its own
    (the last rename won before, and a GPU's rounding made the scored model differ)."""
    import contextlib

    from bench.core.cache import DiskCache
    game = make_game(fresh_cache, kind="sequential")
    taken = []
    real = DiskCache.lock

    @contextlib.contextmanager
    def spy(self, kind, key, **kw):
        taken.append(kind)
        with real(self, kind, key, **kw):
            if kind == "stage" and len(taken) == 2:      # "another process" finished it while we waited
                other = game._fit_stage(key, [], list(game.owners[0]), keep=True)
                other["stats"]["by"] = "the other process"
                game.cache.put_tensors("stage", key, other)
            yield
    monkeypatch.setattr(DiskCache, "lock", spy)
    rec = game.record(0b001)
    assert taken == ["utility", "stage"]
    assert game.cache.get_tensors("stage", game.key(0b001))["stats"]["by"] == "the other process"
    assert rec["stats"]["by"] == "the other process"            # scored the stored weights
