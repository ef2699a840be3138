"""Partitions: owners cover the pool exactly, noise is planted as declared and
only on copies, the evaluation set is never touched."""
from __future__ import annotations

from collections import Counter

import pytest
from conftest import TASK_KW, TINY_SOURCES, one_line

from bench.core.errors import ConfigError
from bench.core.partition import make_partition
from bench.core.task import synthetic_pref


@pytest.fixture
def task():
    return synthetic_pref(**TASK_KW)


def _rows(split):
    return [(p.id, p.source, p.prompt, p.chosen, p.rejected) for p in split]


KINDS = {
    "iid": dict(kind="iid", n_owners=4),
    "iid_sizes": dict(kind="iid", n_owners=3, sizes=[10, 20, 30]),
    "by_source": dict(kind="by_source"),
    "by_source_split": dict(kind="by_source", owner_sources=["capitals", "tone", "reversal", "tone"]),
    "dirichlet": dict(kind="dirichlet", n_owners=4, alpha=0.5),
    "dirichlet_flat": dict(kind="dirichlet", n_owners=3, alpha=50.0),
}


@pytest.mark.parametrize("name", [k for k in KINDS if not k.startswith("dirichlet")])
def test_owners_cover_pool_exactly(task, name):
    part = make_partition(task, **KINDS[name], seed=1)
    ids = [p.id for o in part.owners for p in o]
    assert Counter(ids) == Counter(p.id for p in task.train), "lost or duplicated examples"
    by_id = {p.id: p for p in task.train}
    assert all(p == by_id[p.id] for o in part.owners for p in o), "clean owners hold the task's pairs"
    assert all(len(o) > 0 for o in part.owners)


@pytest.mark.parametrize("name", ["dirichlet", "dirichlet_flat"])
def test_dirichlet_covers_pool_exactly(task, name):
    lost = []
    for seed in range(4):
        part = make_partition(task, **KINDS[name], seed=seed)
        ids = [p.id for o in part.owners for p in o]
        assert len(ids) == len(set(ids)), "duplicated examples"
        lost.append(len(task.train) - len(ids))
    assert lost == [0] * 4, f"examples lost per seed: {lost}"


def test_dirichlet_no_duplication_and_skewed_sizes(task):
    part = make_partition(task, **KINDS["dirichlet"], seed=0)
    ids = [p.id for o in part.owners for p in o]
    assert len(ids) == len(set(ids)) and set(ids) <= {p.id for p in task.train}
    assert len(ids) >= len(task.train) - part.n_owners
    # alpha=0.5 gives visibly unequal shares, alpha=50 nearly equal ones
    flat = make_partition(task, **KINDS["dirichlet_flat"], seed=0).sizes()
    assert max(part.sizes()) - min(part.sizes()) > max(flat) - min(flat)


def test_by_source_owner_holds_only_its_source(task):
    srcs = ["capitals", "tone", "reversal", "tone"]
    part = make_partition(task, kind="by_source", owner_sources=srcs, seed=0)
    for o, s in zip(part.owners, srcs):
        assert {p.source for p in o} == {s}
    assert part.sizes() == [20, 10, 20, 10]


def test_partition_is_seeded(task):
    a = make_partition(task, kind="iid", n_owners=3, seed=0)
    b = make_partition(task, kind="iid", n_owners=3, seed=0)
    c = make_partition(task, kind="iid", n_owners=3, seed=1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("name", list(KINDS))
def test_duplicate_owner_is_exact_copy(task, name):
    kw = KINDS[name]
    n = len(make_partition(task, **kw, seed=2).owners)
    part = make_partition(task, **kw, duplicate_pairs=[[n, 1]], seed=2)
    assert part.n_owners == n + 1
    assert _rows(part.owners[n]) == _rows(part.owners[1])
    assert part.planted.duplicate_pairs == [[n, 1]]
    ids = Counter(p.id for o in part.owners for p in o)
    assert {i for i, c in ids.items() if c > 1} == {p.id for p in part.owners[1]}
    assert all(c <= 2 for c in ids.values())


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("flip_frac", [1.0, 0.5, 0.3])
def test_flipped_examples(task, name, flip_frac):
    noisy = 1
    clean = make_partition(task, **KINDS[name], seed=3)
    part = make_partition(task, **KINDS[name], noisy_owners=[noisy], flip_frac=flip_frac, seed=3)
    by_id = {p.id: p for p in task.train}
    o = part.owners[noisy]
    assert [p.id for p in o] == [p.id for p in clean.owners[noisy]], "noise must not move examples"
    flipped = {p.id for p in o if (p.chosen, p.rejected) == (by_id[p.id].rejected, by_id[p.id].chosen)}
    unchanged = {p.id for p in o if p == by_id[p.id]}
    assert flipped | unchanged == {p.id for p in o} and not flipped & unchanged
    assert all(p.prompt == by_id[p.id].prompt and p.source == by_id[p.id].source for p in o)
    assert len(flipped) == round(flip_frac * len(o))
    assert set(part.planted.corrupted_ids) == flipped and len(part.planted.corrupted_ids) == len(flipped)
    assert part.planted.noisy_owners == [noisy]
    for i, other in enumerate(part.owners):   # other owners are untouched
        if i != noisy:
            assert all(p == by_id[p.id] for p in other)


def test_garbled_examples_are_permutations(task):
    part = make_partition(task, kind="by_source", noisy_owners=[0, 2], flip_frac=0.25,
                          garble_frac=0.5, seed=4)
    by_id = {p.id: p for p in task.train}
    total_flip = total_garble = 0
    for i in (0, 2):
        o = part.owners[i]
        flipped = [p for p in o if (p.chosen, p.rejected) == (by_id[p.id].rejected, by_id[p.id].chosen)]
        garbled = [p for p in o if p != by_id[p.id] and p not in flipped]
        assert len(flipped) == round(0.25 * len(o))
        assert len(garbled) == round(0.5 * len(o))
        for p in garbled:
            q = by_id[p.id]
            assert (p.chosen, p.rejected) != (q.chosen, q.rejected)
            assert sorted(p.chosen) == sorted(q.chosen) and sorted(p.rejected) == sorted(q.rejected)
            assert p.prompt == q.prompt
        total_flip += len(flipped)
        total_garble += len(garbled)
        assert {p.id for p in flipped + garbled} <= set(part.planted.corrupted_ids)
    assert len(part.planted.corrupted_ids) == total_flip + total_garble
    assert part.planted.noisy_owners == [0, 2]
    assert all(p == by_id[p.id] for p in part.owners[1])


def test_duplicate_of_noisy_owner_is_noisy_too(task):
    part = make_partition(task, kind="by_source", noisy_owners=[2], duplicate_pairs=[[3, 2]], seed=0)
    assert _rows(part.owners[3]) == _rows(part.owners[2])
    assert part.planted.noisy_owners == [2, 3]


@pytest.mark.parametrize("name", list(KINDS))
def test_noise_never_touches_task(task, name):
    fresh = synthetic_pref(**TASK_KW)
    before_fp = task.fingerprint()
    base = make_partition(task, **KINDS[name], seed=5)
    noisy = [i for i, n in enumerate(base.sizes()) if n >= 2][:2]   # a 1-example owner rounds to no noise
    make_partition(task, **KINDS[name], noisy_owners=noisy, flip_frac=0.5, garble_frac=0.5,
                   duplicate_pairs=[[base.n_owners, 0]], seed=5)
    assert _rows(task.train) == _rows(fresh.train)
    assert _rows(task.eval) == _rows(fresh.eval)
    assert _rows(task.warmup) == _rows(fresh.warmup)
    assert task.fingerprint() == before_fp == fresh.fingerprint()


@pytest.mark.parametrize("kw, field", [
    (dict(kind="iid", n_owners=61), "n_owners"),
    (dict(kind="dirichlet", n_owners=1000), "n_owners"),
    (dict(kind="iid", n_owners=3, sizes=[0, 10, 10]), "sizes"),
    (dict(kind="iid", n_owners=3, sizes=[10, 10]), "sizes"),
    (dict(kind="iid", n_owners=3, sizes=[30, 30, 30]), "sizes"),
    (dict(kind="by_source", owner_sources=list(TINY_SOURCES), sizes=[0, 10, 10]), "owner 0"),
    (dict(kind="by_source", owner_sources=["capitals", "tone"], sizes=[10]), "sizes"),
    (dict(kind="by_source", owner_sources=["capitals", "tone", "tone"], sizes=[5, 15, 15]), "sizes"),
    (dict(kind="by_source", owner_sources=["capitals", "arithmetic"]), "arithmetic"),
    (dict(kind="by_source", duplicate_pairs=[[1, 0]]), "duplicate_pairs"),
    (dict(kind="by_source", duplicate_pairs=[[3, 7]]), "duplicate_pairs"),
    (dict(kind="by_source", duplicate_pairs=[[5, 0]]), "duplicate_pairs"),
    (dict(kind="by_source", noisy_owners=[3]), "noisy_owners"),
    (dict(kind="by_source", noisy_owners=[-1]), "noisy_owners"),
    (dict(kind="by_source", noisy_owners=[0], flip_frac=0.7, garble_frac=0.7), "flip_frac"),
    (dict(kind="nope"), "kind"),
    (dict(kind="iid", n_owners=0), "n_owners"),
    (dict(kind="by_source", noisy_owners=[1, 1]), "partition.noisy_owners: owner(s) [1] listed twice"),
    (dict(kind="by_source", noisy_owners=[1], flip_frac=0.0), "corrupt nothing"),
    (dict(kind="iid", n_owners=3, sizes=[1, 10, 10], noisy_owners=[0], flip_frac=0.4), "owner 0 is marked noisy"),
    (dict(kind="iid", n_owners="3"), "partition.n_owners: '3' is not an integer"),
    (dict(kind="by_source", sizes=[10, -1, 10]), "partition.sizes[1]: -1"),
    (dict(kind="by_source", noisy_owners=["1"]), "partition.noisy_owners[0]: '1' is not an integer"),
    (dict(kind="by_source", duplicate_pairs=[[3]]), "partition.duplicate_pairs: entry [3]"),
    (dict(kind="by_source", duplicate_pairs=[3, 0]), "partition.duplicate_pairs[0]: 3 is not a list"),
    (dict(kind="dirichlet", n_owners=3, alpha=0), "partition.alpha: 0"),
    (dict(kind="by_source", seed=-1), "partition.seed: -1"),
])
def test_bad_partitions_are_one_line_config_errors(task, kw, field):
    with pytest.raises(ConfigError) as e:
        make_partition(task, **kw)
    msg = str(e.value)
    assert one_line(msg) and field in msg, msg


def test_dirichlet_many_owners_does_not_blame_sizes(task):
    """Skewed Dirichlet shares over as many owners as examples still give every owner
    one example; one owner more is refused for n_owners, not for sizes."""
    n = len(task.train)
    for n_owners in (50, n):
        part = make_partition(task, kind="dirichlet", n_owners=n_owners, alpha=0.05, seed=0)
        ids = [p.id for o in part.owners for p in o]
        assert len(ids) == len(set(ids)) == n and min(part.sizes()) >= 1 and part.n_owners == n_owners
    with pytest.raises(ConfigError) as e:
        make_partition(task, kind="dirichlet", n_owners=n + 1, alpha=0.05, seed=0)
    assert one_line(str(e.value)) and str(e.value).startswith("partition.n_owners"), str(e.value)


def test_garbled_pairs_keep_something_to_prefer(task):
    """Garbling shuffles both responses' characters; anagrams (a reversed word and its
    near miss) could come out equal: the rejected one is re-shuffled instead."""
    part = make_partition(task, kind="by_source", noisy_owners=[0, 1, 2], flip_frac=0.0, garble_frac=1.0, seed=3)
    garbled = [p for o in part.owners for p in o]
    assert garbled and all(p.chosen.strip() != p.rejected.strip() for p in garbled)
    import numpy as np

    from bench.core.partition import _garble_pair
    rng = np.random.default_rng(0)
    for _ in range(200):
        c, r = _garble_pair("abc", "cab", rng)
        assert c != r and sorted(c) == sorted(r) == ["a", "b", "c"]
