"""Graded planted noise: per-owner flip shares, fully garbled owners, exact and
reworded (near) duplicates, and the ``Planted`` record of it all; the ``graded``
preset composes and plants what its comment says."""
from __future__ import annotations

from collections import Counter

import pytest
from conftest import TASK_KW, one_line

from bench.core.errors import ConfigError
from bench.core.partition import Planted, make_partition
from bench.core.task import synthetic_pref

# 4 base owners of 20, 10, 15, 15 (TASK_KW's pool: 60), then owner 4 = exact copy of
# owner 0 and owner 5 = reworded copy of owner 2 (the half-flipped one) and owner 6 =
# reworded copy of owner 1 (clean)
GRADED = dict(kind="iid", n_owners=4, sizes=[20, 10, 15, 15], flip_fracs=[0, 0.3, 0.6, 0],
              garbled_owners=[3], duplicate_pairs=[[4, 0]], near_duplicate_pairs=[[5, 2], [6, 1]])
SHARES = [0.0, 0.3, 0.6, 1.0, 0.0, 0.6, 0.3]      # 3/10, 9/15, 15/15


@pytest.fixture(scope="module")
def task():
    return synthetic_pref(**TASK_KW)


def _rows(owner, prompt=True):
    return [(p.source, p.prompt if prompt else None, p.chosen, p.rejected) for p in owner]


def _kinds(owner, by_id):
    """(flipped ids, garbled ids, unchanged ids) of a base owner against the task's pairs."""
    flipped, garbled, same = set(), set(), set()
    for p in owner:
        q = by_id[p.id]
        assert (p.source, p.prompt) == (q.source, q.prompt), "noise never touches the prompt"
        if p == q:
            same.add(p.id)
        elif (p.chosen, p.rejected) == (q.rejected, q.chosen):
            flipped.add(p.id)
        else:
            assert sorted(p.chosen) == sorted(q.chosen) and sorted(p.rejected) == sorted(q.rejected), \
                "a garbled pair is an anagram of the task's pair"
            garbled.add(p.id)
    return flipped, garbled, same


def test_graded_shares_are_exact(task):
    part = make_partition(task, **GRADED, seed=0)
    by_id = {p.id: p for p in task.train}
    assert part.sizes() == [20, 10, 15, 15, 20, 15, 10]
    assert part.planted.corruption == pytest.approx(SHARES)
    assert part.planted.noisy_owners == [1, 2, 3, 5, 6]
    assert part.planted.duplicate_pairs == [[4, 0]]
    assert part.planted.near_duplicate_pairs == [[5, 2], [6, 1]]
    bad = set()
    for i in range(4):
        flipped, garbled, _ = _kinds(part.owners[i], by_id)
        if i == 3:
            assert flipped == set() and len(garbled) == 15
        else:
            assert garbled == set() and len(flipped) == round(GRADED["flip_fracs"][i] * len(part.owners[i]))
        assert (len(flipped) + len(garbled)) / len(part.owners[i]) == pytest.approx(SHARES[i])
        bad |= flipped | garbled
    # base ids are the task's, each in one owner
    base = Counter(p.id for o in part.owners[:4] for p in o)
    assert set(base) <= set(by_id) and max(base.values()) == 1
    # reworded copies' corrupted examples are named under their new ids
    near_bad = {q.id for c, o in ((5, 2), (6, 1))
                for p, q in zip(part.owners[o], part.owners[c]) if p.id in bad}
    assert len(near_bad) == 9 + 3
    assert sorted(part.planted.corrupted_ids) == part.planted.corrupted_ids
    assert set(part.planted.corrupted_ids) == bad | near_bad
    assert len(part.planted.corrupted_ids) == len(bad) + len(near_bad)


def test_exact_duplicate_equals_its_original(task):
    part = make_partition(task, **GRADED, seed=1)
    assert part.owners[4] == part.owners[0]      # same pairs, same ids


def test_near_duplicate_rewords_prompts_under_new_ids(task):
    part = make_partition(task, **GRADED, seed=2)
    max_train = max(p.id for p in task.train)
    for copy, orig in ([5, 2], [6, 1]):
        c, o = part.owners[copy], part.owners[orig]
        assert _rows(c, prompt=False) == _rows(o, prompt=False), "same source, chosen, rejected (and corruption)"
        assert all(p.prompt != q.prompt and q.prompt in p.prompt for p, q in zip(c, o)), "prompts reworded"
        assert all(p.id > max_train for p in c)
    ids = [p.id for o in part.owners for p in o]
    dup_ids = [p.id for p in part.owners[4]]
    assert Counter(ids) - Counter(dup_ids) == Counter(set(ids)), "ids are unique but for the exact copy's"


def test_graded_is_seeded(task):
    a, b, c = (make_partition(task, **GRADED, seed=s) for s in (3, 3, 4))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.planted == b.planted
    assert a.planted.corrupted_ids != c.planted.corrupted_ids
    assert [p.prompt for p in a.owners[5]] != [p.prompt for p in c.owners[5]]


def test_graded_noise_never_touches_task(task):
    fresh = synthetic_pref(**TASK_KW)
    make_partition(task, **GRADED, seed=0)
    assert task.fingerprint() == fresh.fingerprint() and task.train == fresh.train


def test_copies_of_garbled_owner_inherit_its_share(task):
    part = make_partition(task, kind="by_source", flip_fracs=[0, 0, 0], garbled_owners=[1],
                          duplicate_pairs=[[3, 1]], near_duplicate_pairs=[[4, 1], [5, 3]], seed=0)
    assert part.planted.corruption == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert part.planted.noisy_owners == [1, 3, 4, 5]
    assert len(part.planted.corrupted_ids) == 20 * 3     # owner 1's ids (owner 3 shares them), 4's, 5's
    assert _rows(part.owners[4], prompt=False) == _rows(part.owners[1], prompt=False)


def test_unshufflable_pairs_stay_clean():
    """One-digit sums cannot be garbled: no shuffle changes them, they are not counted."""
    t = synthetic_pref(sources=["arithmetic"], n_train_per_source=40, n_eval_per_source=4,
                       n_warmup_per_source=0, arith_max=4)
    part = make_partition(t, kind="iid", n_owners=1, flip_fracs=[0], garbled_owners=[0], seed=0)
    by_id = {p.id: p for p in t.train}
    _, garbled, same = _kinds(part.owners[0], by_id)
    assert same and all(len(set(by_id[i].chosen)) <= 1 and len(set(by_id[i].rejected)) <= 1 for i in same)
    assert set(part.planted.corrupted_ids) == garbled
    assert part.planted.corruption == [len(garbled) / 40]


def test_old_settings_keep_their_planted_record(task):
    part = make_partition(task, kind="by_source", noisy_owners=[2], flip_frac=0.5, duplicate_pairs=[[3, 2]], seed=0)
    assert part.planted.noisy_owners == [2, 3]
    assert part.planted.corruption == [0.0, 0.0, 0.5, 0.5]
    assert part.planted.near_duplicate_pairs == []
    old = Planted(noisy_owners=[1], corrupted_ids=[3], duplicate_pairs=[])   # a record from before
    assert old.corruption == [] and old.near_duplicate_pairs == []


@pytest.mark.parametrize("kw, field", [
    (dict(kind="iid", n_owners=3, flip_fracs=[0, 0.5]), "partition.flip_fracs: 2 shares for 3 owners"),
    (dict(kind="by_source", flip_fracs=[0, 0.5, 0, 0]), "partition.flip_fracs: 4 shares for 3 owners"),
    (dict(kind="by_source", flip_fracs=[0, 0.5, 0], noisy_owners=[1]), "partition.flip_fracs"),
    (dict(kind="by_source", flip_fracs=[0, 0.5, 0], flip_frac=0.5), "partition.flip_fracs"),
    (dict(kind="by_source", flip_fracs=[0, 0.5, 0], garble_frac=0.5), "partition.flip_fracs"),
    (dict(kind="by_source", flip_fracs=[0, 1.5, 0]), "partition.flip_fracs[1]: 1.5"),
    (dict(kind="by_source", flip_fracs=[0, -0.1, 0]), "partition.flip_fracs[1]: -0.1"),
    (dict(kind="by_source", flip_fracs=[0, 0.5, 0], garbled_owners=[1]), "partition.garbled_owners"),
    (dict(kind="by_source", noisy_owners=[1], garbled_owners=[1]), "partition.garbled_owners"),
    (dict(kind="by_source", garbled_owners=[0, 0]), "partition.garbled_owners"),
    (dict(kind="by_source", garbled_owners=[3]), "partition.garbled_owners: owner 3"),
    (dict(kind="by_source", garbled_owners=[-1]), "partition.garbled_owners[0]: -1"),
    (dict(kind="iid", n_owners=3, sizes=[10, 10, 10], flip_fracs=[0, 0.04, 0]), "partition.flip_fracs: owner 1"),
    (dict(kind="by_source", near_duplicate_pairs=[[4, 0]]), "partition.near_duplicate_pairs"),
    (dict(kind="by_source", duplicate_pairs=[[3, 0]], near_duplicate_pairs=[[3, 0]]),
     "partition.near_duplicate_pairs"),
    (dict(kind="by_source", near_duplicate_pairs=[[3, 5]]), "partition.near_duplicate_pairs"),
    (dict(kind="by_source", near_duplicate_pairs=[[3]]), "partition.near_duplicate_pairs: entry [3]"),
])
def test_bad_graded_settings_are_one_line_config_errors(task, kw, field):
    with pytest.raises(ConfigError) as e:
        make_partition(task, **kw)
    msg = str(e.value)
    assert one_line(msg) and field in msg, msg
    if "noisy_owners" in kw and "flip_fracs" in kw:
        assert "noisy_owners" in msg


def test_graded_preset_composes_and_plants_its_shares():
    from bench.core.partition import PartitionSettings
    from bench.harness.build import _kwargs, build_task, check_inputs, compose_config
    cfg = compose_config(["experiment=graded", "logger=none"])
    assert cfg.experiment_name == "graded" and cfg.partition.kind == "iid"
    task = build_task(cfg)
    part = make_partition(task, **PartitionSettings.of(_kwargs(cfg.partition, drop=()),
                                                       prefix="partition").to_dict())
    assert part.n_owners == 8
    assert part.sizes() == [20, 15, 20, 20, 20, 15, 20, 15]
    assert part.planted.corruption == [0, 0, 0.25, 0.5, 1.0, 1.0, 0, 0]
    assert part.planted.noisy_owners == [2, 3, 4, 5]
    assert len(part.planted.corrupted_ids) == 5 + 10 + 20 + 15
    check_inputs(cfg, task, part)
