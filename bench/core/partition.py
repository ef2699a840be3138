"""Partitions: split a task's training pool among n owners and plant noise.

A partition never sees the evaluation set. Corrupted examples are *copies*
with their content changed; the task's pairs are never mutated. What was
planted (``Planted``) is kept by the harness and never handed to a valuer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from bench.core.errors import ConfigError
from bench.core.settings import Settings, setting
from bench.core.task import Pair, Task

KINDS = ("iid", "by_source", "dirichlet")


@dataclass(frozen=True)
class Planted:
    """The noise a partition planted: the labels detection is scored against."""
    noisy_owners: list[int] = field(default_factory=list)
    corrupted_ids: list[int] = field(default_factory=list)      # example ids (train pool ids)
    duplicate_pairs: list[list[int]] = field(default_factory=list)  # [copy, original]


@dataclass
class Partition:
    owners: list[list[Pair]]
    planted: Planted
    description: str = ""

    @property
    def n_owners(self) -> int:
        return len(self.owners)

    def sizes(self) -> list[int]:
        return [len(o) for o in self.owners]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for o in self.owners:
            h.update(json.dumps([asdict(p) for p in o], sort_keys=True).encode())
            h.update(b"|")
        return h.hexdigest()[:16]


def _garble(text: str, rng: np.random.Generator) -> str:
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def _garble_pair(chosen: str, rejected: str, rng: np.random.Generator) -> tuple[str, str]:
    """Both responses' characters shuffled; the rejected one is re-shuffled (a few times
    at most) should it come out equal to the chosen one, which would leave a pair with
    nothing to prefer (anagrams, e.g. a word reversed and its near miss)."""
    c, r = _garble(chosen, rng), _garble(rejected, rng)
    for _ in range(8):
        if c.strip() != r.strip():
            break
        r = _garble(rejected, rng)
    return c, r


@dataclass(frozen=True)
class PartitionSettings(Settings):
    """The ``partition`` config node (see ``make_partition``)."""
    prefix = "partition"
    kind: str = setting("by_source", "iid | by_source | dirichlet", choices=KINDS)
    n_owners: int | None = setting(None, "owners (iid, dirichlet); by_source: the first n_owners task sources "
                                         "when owner_sources is null", min=1)
    owner_sources: list[str] | None = setting(None, "by_source: owner i's source; a source named twice is split; "
                                                    "null = one owner per task source")
    sizes: list[int] | None = setting(None, "per-owner sizes (unequal sizes matter for some valuers)", min=0)
    alpha: float = setting(1.0, "dirichlet: concentration of the owners' shares", min=0, min_exclusive=True)
    noisy_owners: list[int] = setting([], "owners whose examples are corrupted (the planted noise)", min=0)
    flip_frac: float = setting(1.0, "share of a noisy owner's examples with chosen / rejected swapped",
                               min=0, max=1)
    garble_frac: float = setting(0.0, "share of a noisy owner's examples with both responses' characters "
                                      "shuffled", min=0, max=1)
    duplicate_pairs: list[list[int]] = setting([], "[copy, original]: append owner `copy` holding an exact "
                                                   "copy of owner `original`'s data")
    seed: int = setting(0, "seed of the split and of the noise", min=0)

    def check(self) -> None:
        if self.flip_frac + self.garble_frac > 1:
            raise self.error("flip_frac", f"{self.flip_frac} + garble_frac {self.garble_frac} > 1; their sum "
                                          f"is a share of a noisy owner's examples, keep it <= 1")
        twice = sorted({i for i in self.noisy_owners if self.noisy_owners.count(i) > 1})
        if twice:
            raise self.error("noisy_owners", f"owner(s) {twice} listed twice (a second pass would undo "
                                             f"the first's flips); name each owner once")
        if self.noisy_owners and self.flip_frac == 0 and self.garble_frac == 0:
            raise self.error("noisy_owners", f"{self.noisy_owners} are marked noisy but flip_frac=0 and "
                                             f"garble_frac=0 corrupt nothing; set flip_frac or garble_frac > 0, "
                                             f"or noisy_owners=[]")
        for pair in self.duplicate_pairs:
            if len(pair) != 2:
                raise self.error("duplicate_pairs", f"entry {pair} must be [copy, original]")


def _as_list(x):
    return [_as_list(v) for v in x] if isinstance(x, (list, tuple)) else x


def make_partition(task: Task, kind: str = "by_source", n_owners: int | None = None,
                   owner_sources: list[str] | None = None, sizes: list[int] | None = None,
                   alpha: float = 1.0, noisy_owners: list[int] | tuple = (), flip_frac: float = 1.0,
                   garble_frac: float = 0.0, duplicate_pairs: list[list[int]] | tuple = (),
                   seed: int = 0) -> Partition:
    """Build owners from ``task.train``.

    kind:
      ``iid``        shuffle the pool and deal it into ``n_owners`` (``sizes`` if given).
      ``by_source``  owner i gets examples of ``owner_sources[i]``; a source named by
                     several owners is split among them (``sizes`` caps each owner).
      ``dirichlet``  shuffled pool cut into ``n_owners`` chunks with Dirichlet(alpha) shares.
    Then: ``noisy_owners`` get ``flip_frac`` of their examples with chosen/rejected swapped
    and ``garble_frac`` with both responses' characters shuffled; each
    ``duplicate_pairs`` entry ``[copy, original]`` *appends* owner ``copy`` holding an
    exact copy of ``original``'s data (so ``copy`` = the next index).
    """
    noisy_owners, duplicate_pairs = _as_list(noisy_owners), _as_list(duplicate_pairs)
    PartitionSettings(kind=kind, n_owners=n_owners, owner_sources=_as_list(owner_sources), sizes=_as_list(sizes),
                      alpha=alpha, noisy_owners=noisy_owners, flip_frac=flip_frac, garble_frac=garble_frac,
                      duplicate_pairs=duplicate_pairs, seed=seed)
    rng = np.random.default_rng(seed)
    pool = list(task.train)
    if kind == "by_source":
        owner_sources = list(owner_sources or task.sources[: n_owners or len(task.sources)])
        owners = _by_source(pool, owner_sources, sizes, rng)
    elif kind in ("iid", "dirichlet"):
        if not n_owners or n_owners < 1:
            raise ConfigError(f"partition.n_owners: must be >= 1 for kind={kind}")
        if n_owners > len(pool):
            raise ConfigError(f"partition.n_owners: {n_owners} owners but only {len(pool)} training "
                              f"examples; lower n_owners or raise task.n_train_per_source")
        order = rng.permutation(len(pool))
        if kind == "iid" and sizes is None:
            cuts = np.array_split(order, n_owners)
        else:
            if sizes is None:
                sizes = dirichlet_sizes(len(pool), n_owners, alpha, rng)
            _check_sizes(sizes, n_owners, len(pool))
            cuts = np.split(order[: sum(sizes)], np.cumsum(sizes)[:-1])
        owners = [[pool[i] for i in sorted(c)] for c in cuts]
    else:
        raise ConfigError(f"partition.kind: unknown {kind!r}; choose iid, by_source or dirichlet")

    for i, o in enumerate(owners):
        if not o:
            raise ConfigError(f"partition: owner {i} got no examples; give it a size >= 1 "
                              f"or use fewer owners")

    # -- noise: copies with changed content; ids kept so ``Planted`` can name them
    corrupted = []
    for i in noisy_owners:
        if not 0 <= i < len(owners):
            raise ConfigError(f"partition.noisy_owners: owner {i} does not exist (have {len(owners)})")
        o = owners[i]
        idx = rng.permutation(len(o))
        n_flip, n_garble = int(round(flip_frac * len(o))), int(round(garble_frac * len(o)))
        if n_flip + n_garble == 0:
            raise ConfigError(f"partition.noisy_owners: owner {i} is marked noisy but flip_frac={flip_frac} and "
                              f"garble_frac={garble_frac} of its {len(o)} examples round to none corrupted; "
                              f"raise flip_frac / garble_frac or drop owner {i} from noisy_owners")
        for j in idx[:n_flip]:
            o[j] = replace(o[j], chosen=o[j].rejected, rejected=o[j].chosen)
        for j in idx[n_flip:n_flip + n_garble]:
            c, r = _garble_pair(o[j].chosen, o[j].rejected, rng)
            o[j] = replace(o[j], chosen=c, rejected=r)
        corrupted += [o[j].id for j in idx[:n_flip + n_garble]]

    dups = []
    for pair in duplicate_pairs:
        copy, orig = int(pair[0]), int(pair[1])
        if copy != len(owners) or not 0 <= orig < len(owners):
            raise ConfigError(f"partition.duplicate_pairs: entry {list(pair)} must be [next owner index "
                              f"({len(owners)}), an existing owner]")
        owners.append(list(owners[orig]))
        dups.append([copy, orig])

    noisy_all = sorted(set(noisy_owners) | {c for c, o in dups if o in noisy_owners})
    planted = Planted(noisy_owners=noisy_all, corrupted_ids=sorted(corrupted), duplicate_pairs=dups)
    return Partition(owners=owners, planted=planted, description=f"{kind}:{[len(o) for o in owners]}")


def dirichlet_sizes(n_pool: int, n_owners: int, alpha: float, rng: np.random.Generator) -> list[int]:
    """Owner sizes with Dirichlet(alpha) shares, each >= 1, summing to exactly ``n_pool``
    (one example each, the rest split by largest remainder)."""
    if alpha <= 0:
        raise ConfigError(f"partition.alpha: must be > 0 (got {alpha})")
    share = rng.dirichlet([alpha] * n_owners)
    rest = n_pool - n_owners
    raw = share * rest
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes))[: rest - sizes.sum()]:
        sizes[i] += 1
    return [int(s) + 1 for s in sizes]


def _check_sizes(sizes, n_owners, n_pool):
    if len(sizes) != n_owners:
        raise ConfigError(f"partition.sizes: {len(sizes)} sizes for {n_owners} owners; give one per owner")
    if any(int(s) < 1 for s in sizes):
        raise ConfigError("partition.sizes: every owner needs at least 1 example")
    if sum(sizes) > n_pool:
        raise ConfigError(f"partition.sizes: ask for {sum(sizes)} examples but the pool has {n_pool}; "
                          f"lower the sizes or raise task.n_train_per_source")


def _by_source(pool, owner_sources, sizes, rng):
    by_src: dict[str, list[Pair]] = {}
    for p in pool:
        by_src.setdefault(p.source, []).append(p)
    for s in owner_sources:
        if s not in by_src:
            raise ConfigError(f"partition.owner_sources: source {s!r} is not in the task "
                              f"(has {sorted(by_src)})")
    if sizes is not None and len(sizes) != len(owner_sources):
        raise ConfigError(f"partition.sizes: {len(sizes)} sizes for {len(owner_sources)} owners; "
                          f"give one per owner")
    owners: list[list[Pair]] = []
    for s in dict.fromkeys(owner_sources):
        members = [i for i, t in enumerate(owner_sources) if t == s]
        items = [by_src[s][k] for k in rng.permutation(len(by_src[s]))]
        if sizes is None:
            chunks = np.array_split(np.arange(len(items)), len(members))
        else:
            want = [int(sizes[i]) for i in members]
            if sum(want) > len(items):
                raise ConfigError(f"partition.sizes: owners of source {s!r} want {sum(want)} examples "
                                  f"but it has {len(items)}; raise task.n_train_per_source")
            chunks = np.split(np.arange(sum(want)), np.cumsum(want)[:-1])
        for i, c in zip(members, chunks):
            while len(owners) <= i:
                owners.append([])
            owners[i] = sorted((items[k] for k in c), key=lambda p: p.id)
    return owners
