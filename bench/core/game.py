"""The valuation game: players = owners, v(S) = score of the base fine-tuned on S.

Two games (``kind``):
  union       DPO on the pooled data of S (owners in index order), from the base,
              reference = base.
  sequential  DPO stage by stage over S's owners in ascending index, each stage
              starting from and referenced to the previous stage's model
              (the game in which the DPO arithmetic identity holds). Prefix
              stages are cached and shared: {0,2} is a stage on top of {0}.
v(∅) is the base model's score. Every v(S) lands in the on-disk cache under a
key covering the task, the coalition's data (content), the eval set, the model,
the trainer settings, the game, the seed and the code version, so every valuer
and every rerun share it.

A ``Game`` is picklable: worker processes rebuild the base model from the
model cache and compute coalitions in parallel (joblib) when ``n_jobs > 1``.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.core.cache import DiskCache, content_key
from bench.core.errors import ConfigError
from bench.core.devices import gpu_peak_bytes, reset_gpu_peak, resolve_precision, set_cuda_determinism
from bench.core.models import ModelSpec, load_base, resolve_device
from bench.core.partition import Partition
from bench.core.shapley import members
from bench.core.resources import peak_rss_bytes
from bench.core.task import Task
from bench.core.metering import Metered, UseLog
from bench.core.train import (METRICS, FineTuneDiverged, ReadyExamples, TrainSettings, dpo_train, materialize,
                              prepare_examples, sequence_logps, utility_metrics)

GAMES = ("union", "sequential")
# the key fields of v(S) that say how it was computed, not what it is (``Game.definition``)
DRIFT = ("code", "device", "deterministic", "pack")

# Per process: base models and prepared training pools, shared by every game on
# them (seeds, eval sets) and by every task a pool worker runs.
_PROCESS_BASES: dict = {}
_PROCESS_EXAMPLES: dict = {}


def _freeze_long_lived() -> None:
    """Move every object alive now (the imported stack, the base, the prepared pool)
    out of reach of Python's cyclic garbage collector. Each ``Trainer.train`` starts
    with accelerate's ``gc.collect()``, which otherwise scans the ~0.5M objects of
    the stack every fine-tune (0.25 s on the tiny tier here, ~15 % of its fine-tune);
    afterwards it scans what the fine-tunes create. Frozen objects are still freed by
    reference counting."""
    import gc
    gc.collect()
    gc.freeze()


def _code_fingerprint(path: Path) -> str:
    """The source of a file as its syntax tree prints it, docstrings out
    (``ast.unparse``: comments, formatting and docstring edits keep the cache, any
    change to what the code does drops it; unlike ``ast.dump`` it does not change with
    the Python version's AST fields)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def utility_sources(root_module: str = "bench.core.game") -> list[Path]:
    """Every ``bench`` source file the game's module imports, transitively (imports
    inside functions included): the code a utility can depend on, found from the
    import graph rather than listed by hand."""
    package = Path(__file__).resolve().parents[1]          # .../bench
    seen: dict[str, Path] = {}
    todo = [root_module]
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith("bench."):
            continue
        rel = Path(*name.split(".")[1:])
        path = package / rel.with_suffix(".py")
        if not path.exists():
            path = package / rel / "__init__.py"
            if not path.exists():
                continue                   # a name imported from a module, not a module
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return sorted(seen.values())


# the libraries whose version can change a fine-tune's numbers or its data
NUMERIC_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "numpy",
                     "safetensors")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the sources on the utility path (``utility_sources``) and of the
    numerically relevant library versions, computed once per process: a worker
    compares its own with the job's (``_compute_in_worker``), so code edited while a
    job runs is refused rather than filed under the wrong key."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in utility_sources():
        h.update(str(path.relative_to(root)).encode() + b"\0" + _code_fingerprint(path).encode())
    h.update(json.dumps(library_versions(), sort_keys=True).encode())
    return h.hexdigest()[:12]


def _owner_fp(pairs) -> str:
    return content_key([asdict(p) for p in pairs])[:16]


@dataclass(frozen=True)
class Subset:
    """An arbitrary training set (not an owner coalition), e.g. an LDS subset."""
    pairs: tuple


@dataclass
class Finetuned:
    """A coalition's model with its last stage's trainable weights live (a LoRA
    adapter left unmerged, or full weights requiring grad) and that stage's
    reference model (None = the base with the adapter disabled), for methods that
    differentiate the fine-tuned model (influence functions)."""
    model: object
    reference: object | None
    tokenizer: object
    kind: str          # "lora" | "full"
    key: str           # the coalition's cache key (names its artefacts)
    reference_key: str = ""   # what the reference π0 is (the game's base: same for every coalition and seed)


class Game(Metered):
    def __init__(self, task: Task, owners: "list[list] | Partition", model: ModelSpec, train: TrainSettings,
                 kind: str = "union", seed: int = 0, metric: str = "pref_acc",
                 cache_dir: str | Path = "results/cache", n_jobs: int = 1, progress: bool = True,
                 eval_pairs=None, device: str = "auto", pack: int = 1, deterministic: bool = True):
        if kind not in GAMES:
            raise ConfigError(f"game.kind: unknown {kind!r}; choose one of {list(GAMES)}")
        if metric not in METRICS:
            raise ConfigError(f"game.metric: unknown {metric!r}; choose one of {list(METRICS)}")
        # A valuer sees the owners' data and the eval pairs, never the partition's
        # ground truth nor the task's clean training pool (kept private in _task).
        owners = owners.owners if isinstance(owners, Partition) else owners
        self.owners: list[list] = [list(o) for o in owners]
        self.eval = list(task.eval if eval_pairs is None else eval_pairs)
        self.kind, self.seed, self.metric = kind, seed, metric
        self.cache_dir, self.n_jobs, self.progress = str(cache_dir), n_jobs, progress
        self.device, self.pack = resolve_device(device), int(pack)   # every pass of the game runs on ``device``
        self.deterministic = bool(deterministic)
        # ``auto`` precision resolved here, so the key says what the fine-tunes ran in
        train = replace(train, precision=resolve_precision(train.precision, self.device_kind))
        self._task, self.model_spec, self.train = task, model, train
        self.n = len(self.owners)
        self._check_pack()
        self.owner_sizes = [len(o) for o in self.owners]
        self._owner_fps = [_owner_fp(o) for o in self.owners]
        self._static = {"code": code_version(), "task": task.fingerprint(),
                        "eval": _owner_fp(self.eval), "model": model.key(), "train": train.key(),
                        "game": kind, "seed": seed, "device": torch.device(self.device).type}
        if self.pack > 1:     # packed adapters equal solo ones to fp rounding, not bit for bit: kept apart
            self._static["pack"] = self.pack
        if self.device_kind == "cuda":   # CPU kernels are deterministic either way
            self._static["deterministic"] = self.deterministic
        # a shipped ground truth (core.truth.Truth), served before the cache; private: a valuer reaches
        # its utilities only through the metered utility()/record(), like any cached one
        self._shipped = None
        self._base = None   # (model, tokenizer), loaded lazily in each process
        self._trained = {}  # id(stage) -> the model a fresh stage trained, until it is scored
        self._fits = 0      # stages trained by this object (weights a shipped utility did not bring)
        self._init_meters()

    def _check_pack(self) -> None:
        if self.pack < 1:
            raise ConfigError(f"game.pack: {self.pack}; use a value >= 1")
        if self.pack == 1:
            return
        coalitions = 2 ** self.n - 1
        if self.pack > coalitions:
            raise ConfigError(f"game.pack: {self.pack} is more than the {coalitions} coalitions of {self.n} owners; "
                              f"use game.pack <= {coalitions}")
        if self.train.lora_r is None:
            raise ConfigError(f"game.pack: {self.pack} packs LoRA adapters on one base, and train.lora_r is null "
                              f"(a full fine-tune); set train.lora_r (e.g. 8) or game.pack=1")
        if self.kind == "sequential":
            raise ConfigError(f"game.pack: {self.pack} trains adapters on one base, and the sequential game starts "
                              f"each stage from its own prefix model; use game=union or game.pack=1")

    # -- pickling: never ship the loaded model to workers
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_base"] = None
        d["_trained"] = {}
        d["log"] = UseLog()
        d["_meters"] = []
        return d

    def _admit(self, items) -> None:
        self._admit_keys({self._log_id(it): self._trains(it) for it in items})

    def _note(self, item, rec: dict, fresh: bool) -> None:
        self._note_key(self._log_id(item), rec, fresh)

    @staticmethod
    def _trains(item) -> bool:
        return bool(item.pairs) if isinstance(item, Subset) else item != 0

    @property
    def device_kind(self) -> str:
        return torch.device(self.device).type

    @property
    def cache(self) -> DiskCache:
        return DiskCache(self.cache_dir)

    def flat_pairs(self) -> list:
        """Every training example in the canonical order of point values (owner by owner)."""
        return [p for o in self.owners for p in o]

    def _like(self, **changes) -> "Game":
        kw = dict(task=self._task, owners=self.owners, model=self.model_spec, train=self.train, kind=self.kind,
                  seed=self.seed, metric=self.metric, cache_dir=self.cache_dir, n_jobs=self.n_jobs,
                  progress=self.progress, eval_pairs=self.eval, device=self.device, pack=self.pack,
                  deterministic=self.deterministic)
        game = Game(**{**kw, **changes})
        game._shipped = self._shipped
        return game

    def with_seed(self, seed: int) -> "Game":
        return self._like(seed=seed)

    def with_eval(self, pairs) -> "Game":
        """The same game scored on other eval pairs (e.g. a held-out test split, so a
        selection made with this game's utilities is not judged on the set it was
        tuned on). Fine-tunes are retrained: utilities are cached per eval set."""
        if not pairs:
            raise ConfigError("eval pairs: empty; give the held-out split at least one pair")
        return self._like(eval_pairs=pairs)

    # ----------------------------------------------------------- keys
    def ordered(self, mask: int) -> list[int]:
        """S's owners in training order. Union: sorted by data fingerprint, so v(S)
        depends only on the multiset of S's data (identical owners are exact
        twins, and renumbering owners changes nothing). Sequential: by index."""
        m = list(members(mask, self.n))
        return sorted(m, key=lambda i: (self._owner_fps[i], i)) if self.kind == "union" else m

    def key(self, mask: int) -> str:
        """Content key of v(S): the coalition is named by its owners' data, in training order."""
        return self._keyed(self._static, mask)

    def _keyed(self, static: dict, item) -> str:
        if isinstance(item, Subset):
            if not item.pairs:
                return self._keyed(static, 0)
            return content_key({**static, "game": "union", "data": ["pairs", _owner_fp(item.pairs)]})
        return content_key({**static, "data": [self._owner_fps[i] for i in self.ordered(item)]})

    # -- what the game is, apart from how it was computed (a shipped ground truth, core.truth)
    def definition(self) -> dict:
        """What decides v(S) under a seed, less what may drift between machines and code
        versions (``DRIFT``: the utility path's code and library versions, the device,
        CUDA determinism, packing): the task's data, the eval pairs, the base model, the
        trainer settings (precision included), the game kind, and the owners' data."""
        return {k: v for k, v in self._static.items() if k not in DRIFT + ("seed",)} | {"owners": self._owner_fps}

    def definition_key(self, item) -> str:
        """The key of an item's utility by the game's definition (``definition``) and seed:
        what a shipped ground truth (``core.truth``) files its utilities under."""
        return self._keyed({k: v for k, v in self._static.items() if k not in DRIFT}, item)

    def _lookup(self, item) -> dict | None:
        """The utility record of a coalition (mask) or ``Subset`` without computing it:
        from the shipped ground truth (``self._shipped``), else from the cache."""
        return self._served(item) or self.cache.get_json("utility", self._item_key(item))

    def _served(self, item) -> dict | None:
        """The shipped record of an item, or None (no table, or not in it)."""
        return self._shipped.get(self.definition_key(item)) if self._shipped is not None else None

    # ----------------------------------------------------------- public
    def utility(self, mask: int) -> float:
        return float(self.record(mask)["metrics"][self.metric])

    def record(self, mask: int) -> dict:
        """The cached record of v(S) (metrics, per-pair eval log-probs, timings)."""
        self._admit([mask])
        rec, fresh = self._get_or_compute(mask)
        self._note(mask, rec, fresh)
        return rec

    def table(self, masks=None) -> np.ndarray:
        """Utilities of ``masks`` (default: all 2^n), computing missing ones in
        parallel; returns the full-length table with NaN where not asked."""
        masks = list(range(2 ** self.n)) if masks is None else list(masks)
        self.prefetch(masks)
        out = np.full(2 ** self.n, np.nan)
        for m in masks:
            out[m] = self.utility(m)
        return out

    def subset_record(self, pairs) -> dict:
        """v of an arbitrary training set (LDS subsets, SHED's proxy sets): DPO on
        ``pairs`` (in the given order) from the base, reference = base, scored like
        any coalition and cached by content. An empty set is the base model."""
        item = Subset(tuple(pairs))
        self._admit([item])
        rec, fresh = self._get_or_compute(item)
        self._note(item, rec, fresh)
        return rec

    def subset_utilities(self, subsets) -> np.ndarray:
        """Utilities of many training sets, missing ones computed in parallel."""
        items = [Subset(tuple(p)) for p in subsets]
        self.prefetch(items)
        return np.array([float(self.subset_record(it.pairs)["metrics"][self.metric]) for it in items])

    def prefetch(self, items) -> None:
        """Compute the missing coalitions (masks) or ``Subset``s among ``items``, in
        parallel when n_jobs > 1 (by coalition size for the sequential game, whose
        stages build on smaller prefixes). Past the budget of an open meter, raises
        BudgetExhausted before training anything."""
        items = list(dict.fromkeys(items))
        self._admit(items)
        missing = [m for m in items if self._lookup(m) is None]
        if not missing:
            return
        size = lambda m: bin(m).count("1") if isinstance(m, int) else 0
        levels = [missing] if self.kind == "union" else \
            [[m for m in missing if size(m) == k] for k in range(self.n + 1)]
        from tqdm.auto import tqdm
        bar = tqdm(total=len(missing), desc=f"fine-tunes ({self.kind}, seed {self.seed})",
                   disable=not self.progress, unit="fit")
        try:
            for level in filter(None, levels):
                # the unit of work: one item, or ``pack`` items trained together
                batches = [tuple(level[i:i + self.pack]) for i in range(0, len(level), self.pack)]
                if self.n_jobs > 1 and len(batches) > 1:
                    t0 = time.perf_counter()
                    try:
                        for m, rec in _in_pool(self, batches):
                            self._note(m, rec, True)
                            bar.update(1)
                    finally:
                        self._add_busy(time.perf_counter() - t0)
                else:
                    for batch in batches:
                        for m, rec, fresh in self._get_or_compute_batch(batch):
                            self._note(m, rec, fresh)
                            bar.update(1)
        finally:
            bar.close()

    # ----------------------------------------------------------- internals
    def base(self):
        """(model, tokenizer), loaded once per process: every game of this process on the
        same base (other seeds, eval sets, worker tasks) shares it, and nothing trains it."""
        if self._base is None:
            if self.device_kind == "cuda":   # per process: pool workers are fresh processes
                set_cuda_determinism(self.deterministic)
            key = (str(Path(self.cache_dir).resolve()), content_key(asdict(self.model_spec)), self._static["task"])
            key += (self.device,)
            if key not in _PROCESS_BASES:
                model, tok = load_base(self.model_spec, self._task, self.cache_dir)
                _PROCESS_BASES[key] = (model.to(self.device), tok)
                _freeze_long_lived()
            self._base = _PROCESS_BASES[key]
        return self._base

    def examples(self, pairs) -> ReadyExamples:
        """The game's training pairs as TRL prepares them, once per process: tokenised,
        with their reference log-probs under the base (``train.prepare_examples``).
        Every coalition, seed and subset of this pool reads its rows from it; pairs
        outside the pool (rare) get a preparation of their own."""
        key = content_key({k: self._static[k] for k in ("code", "task", "model")}
                          | {"train": {k: self.train.key()[k] for k in ("max_length", "batch_size")},
                             "pool": _owner_fp(self.flat_pairs()), "device": self.device})
        ready = _PROCESS_EXAMPLES.get(key)
        if ready is None:
            model, tok = self.base()
            ready = _PROCESS_EXAMPLES[key] = prepare_examples(model, tok, self.model_spec, self.flat_pairs(), self.train)
            _freeze_long_lived()
        if ready.covers(pairs):
            return ready
        model, tok = self.base()
        return prepare_examples(model, tok, self.model_spec, pairs, self.train)

    def _base_logps(self):
        key = content_key({**self._static, "data": "base-eval", "seed": None})
        rec = self.cache.get_json("base_eval", key)
        if rec is None:
            model, tok = self.base()
            lc, lr = sequence_logps(model, tok, self.model_spec, self.eval, self.train.score_batch_size,
                                    self.train.max_length)
            rec = {"logp_chosen": lc.tolist(), "logp_rejected": lr.tolist()}
            self.cache.put_json("base_eval", key, rec)
        return np.array(rec["logp_chosen"]), np.array(rec["logp_rejected"])

    def _log_id(self, item):
        """Coalitions are logged by mask, other training sets by cache key."""
        return item if isinstance(item, int) else self._item_key(item)

    def _item_key(self, item) -> str:
        return self._keyed(self._static, item)

    def _get_or_compute_batch(self, batch: tuple) -> list[tuple]:
        """``[(item, record, fresh)]`` for a batch of items: one by one, or (``pack`` > 1)
        the ones to train as LoRA adapters packed on one base (``core.packed``). Items
        that share a cache key (an owner that is an exact copy of another makes two
        coalitions one fine-tune) are trained once and locked once, the locks taken in
        key order (two batches never wait on each other crosswise). A packed coalition
        that diverges is raised after the others are cached."""
        if len(batch) == 1:
            return [(batch[0], *self._get_or_compute(batch[0]))]
        from contextlib import ExitStack
        out, by_key = [], {}
        for it in batch:
            if not self._trains(it) or self._served(it) is not None:      # the base, or shipped: nothing to pack
                out.append((it, *self._get_or_compute(it)))
            else:
                by_key.setdefault(self._item_key(it), []).append(it)
        missing = set()
        with ExitStack() as locks:
            for key in sorted(by_key):
                rec = self.cache.get_json("utility", key)
                if rec is None:           # one writer per entry, as in _get_or_compute
                    locks.enter_context(self.cache.lock("utility", key))
                    rec = self.cache.get_json("utility", key)
                if rec is not None:
                    out += [(it, rec, False) for it in by_key[key]]
                else:
                    missing.add(key)
            todo = [items[0] for key, items in by_key.items() if key in missing]     # in the batch's order
            if todo:
                t0 = time.perf_counter()
                try:
                    trained = self._train_packed(todo)
                finally:
                    self._add_busy(time.perf_counter() - t0)
                for it, rec, fresh in trained:   # a twin shares its coalition's fine-tune and record
                    out += [(twin, rec, fresh and twin == it) for twin in by_key[self._item_key(it)]]
        return out

    def _train_packed(self, items: list) -> list[tuple]:
        from bench.core.packed import dpo_train_packed
        model, tok = self.base()
        pairs = [list(it.pairs) if isinstance(it, Subset) else self._pairs(it) for it in items]
        reset_gpu_peak()
        t0 = time.perf_counter()
        results = dpo_train_packed(model, tok, self.model_spec, pairs, self.train, self.seed,
                                   self.examples([p for ps in pairs for p in ps]))
        train_s = (time.perf_counter() - t0) / len(items)     # the pack's wall time, shared equally
        out, failed = [], []
        for it, ps, res in zip(items, pairs, results):
            if isinstance(res, Exception):
                failed.append((it, res))
                continue
            stage, stats, trained = res
            key = self._item_key(it)
            stage["train_s"], stage["stats"], stage["meta"] = train_s, stats, self.stage_meta()
            if isinstance(it, int) and self.kept(it):
                self.cache.put_tensors("stage", key, stage)
            rec = self._score(lambda: [stage], n_train=len(ps), info={**self._info(it), "packed": len(items)},
                              trained=trained)
            self.cache.put_json("utility", key, rec)
            out.append((it, rec, True))
        if failed:
            it, err = failed[0]
            raise FineTuneDiverged(f"{self._log_id(it)} (packed with {len(items) - 1} others, which are cached): "
                                   f"{err}")
        return out

    def _get_or_compute(self, item) -> tuple[dict, bool]:
        rec = self._lookup(item)
        if rec is not None:
            return rec, False
        key = self._item_key(item)
        # one writer per entry: another process (a second job or worker on the same
        # cache) training this coalition holds the lock; we wait and read its result
        with self.cache.lock("utility", key):
            rec = self.cache.get_json("utility", key)
            if rec is not None:
                return rec, False
            t0 = time.perf_counter()
            try:
                if isinstance(item, Subset) and item.pairs:
                    rec = self._score(lambda: [self._train_stage(key, [], list(item.pairs), keep=False)],
                                      n_train=len(item.pairs), info=self._info(item))
                else:
                    rec = self._compute(0 if isinstance(item, Subset) else item)
                self.cache.put_json("utility", key, rec)
            finally:
                self._add_busy(time.perf_counter() - t0)
        return rec, True

    def stages(self, mask: int) -> list[dict]:
        """The weight stages whose chain gives the model of coalition ``mask``."""
        if mask == 0:
            return []
        if self.kind == "union":
            return [self._stage(mask, start_stages=[], pairs=self._pairs(mask))]
        last = members(mask, self.n)[-1]
        prefix = mask & ~(1 << last)
        chain = self.stages(prefix)
        return chain + [self._stage(mask, start_stages=chain, pairs=list(self.owners[last]))]

    def stage_meta(self) -> dict:
        """What a stage's weights are only valid with: combining stages trained with
        another beta, base model or tokenizer is meaningless (see valuers/dpo_arithmetic)."""
        _, tok = self.base()
        vocab = sorted(tok.get_vocab().items())
        return {"beta": self.train.beta, "model": content_key(self.model_spec.key())[:16],
                "base_task": self._static["task"] if self.model_spec.kind == "tiny" else None,
                "tokenizer": content_key(vocab)[:16]}

    # ----------------------------------------------------------- models, for valuers
    def kept(self, mask: int) -> bool:
        """Whether the game keeps the weights of coalition ``mask`` (every sequential
        prefix; in the union game the single owners and the grand coalition)."""
        return mask != 0 and (self.kind == "sequential" or bin(mask).count("1") == 1 or mask == (1 << self.n) - 1)

    def _check_kept(self, mask: int) -> None:
        if not self.kept(mask):
            raise ValueError(f"coalition {mask}: the {self.kind} game keeps the weights of single owners and "
                             f"the grand coalition only; ask for one of those")

    def chain_masks(self, mask: int) -> list[int]:
        """The coalitions whose stages make up ``mask``'s model: ``[mask]`` in the union
        game, every sequential prefix (``mask`` last) in the sequential one."""
        if mask == 0:
            return []
        if self.kind == "union":
            return [mask]
        ms = members(mask, self.n)
        return [sum(1 << i for i in ms[:k]) for k in range(1, len(ms) + 1)]

    def weights_to_train(self, mask: int) -> int:
        """How many stages loading coalition ``mask``'s weights would train now: those of
        its chain not on disk (a shipped ground truth carries utilities, not weights)."""
        return sum(not self.cache.has_tensors("stage", self.key(m)) for m in self.chain_masks(mask))

    def _kept_stages(self, mask: int) -> list[dict]:
        self._check_kept(mask)
        rec = self.record(mask)            # trains it if needed, counted and budgeted like any utility
        fits, t0 = self._fits, time.perf_counter()
        chain = self.stages(mask)
        if self._fits > fits:              # a shipped utility brings no weights: they were trained now,
            dt = time.perf_counter() - t0  # a fresh fine-tune of this valuer's
            self._trained.clear()
            self._add_busy(dt)
            self._note(mask, {**rec, "train_s": dt, "eval_s": 0.0}, True)
        return chain

    def ensure_weights(self, mask: int) -> None:
        """Coalition ``mask``'s utility and weights, trained now if missing (counted as a
        fine-tune), so a valuer times fetching them apart from loading them."""
        self._kept_stages(mask)

    def trained_model(self, mask: int):
        """A fresh copy of coalition ``mask``'s fine-tuned model (every stage merged),
        in eval mode, on the game's device."""
        return materialize(self.base()[0], self._kept_stages(mask))

    def coalition_meta(self, mask: int) -> dict | None:
        """What the coalition's weights were trained with (beta, base model,
        tokenizer; see ``stage_meta``), or None for weights from before it was recorded.
        A coalition served by a shipped ground truth whose weights are not here is not
        trained for this: the truth was matched on the game's definition (base model, task,
        trainer settings with beta), which fixes the meta, so it is this game's own."""
        self._check_kept(mask)
        if self._served(mask) is not None and self.weights_to_train(mask):
            self.record(mask)                  # the utility read is metered as before
            return self.stage_meta()
        return self._kept_stages(mask)[-1].get("meta")

    def finetuned(self, mask: int, dtype=torch.float32, device=None) -> Finetuned:
        """Coalition ``mask``'s model with its last stage live (see ``Finetuned``), on
        ``device`` (default: the game's)."""
        device = self.device if device is None else device
        from bench.core.train import clone_model
        chain = self._kept_stages(mask)
        base, tok = self.base()
        last = chain[-1]
        if last["kind"] == "lora":
            import warnings

            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
            start = materialize(base, chain[:-1]) if len(chain) > 1 else clone_model(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(start, LoraConfig(**last["config"]))
                set_peft_model_state_dict(model, last["state"])
            ref = None if len(chain) == 1 else base
        elif last["kind"] == "full":
            model = materialize(base, chain)
            model.requires_grad_(True)
            ref = base
        else:
            raise ValueError(f"coalition {mask}: unknown stage kind {last['kind']!r} (expected lora or full)")
        model.to(device=device, dtype=dtype).eval()
        if ref is not None and (dtype != torch.float32 or torch.device(device) != torch.device(self.device)):
            ref = clone_model(ref).to(device=device, dtype=dtype).eval()
        # π0 is the base under every chain: the adapter disabled on a copy of the base
        # (one stage), or the base itself (earlier stages merged, or a full fine-tune)
        base_key = content_key({k: self._static[k] for k in ("code", "task", "model")} | {"base": True})
        return Finetuned(model, ref, tok, last["kind"], self.key(mask), base_key)

    def artefacts_dir(self, name: str) -> Path:
        """A folder for a valuer's own cached artefacts (gradient logs, embeddings),
        beside the game's cache; content-address what goes in it."""
        return Path(self.cache_dir) / name

    def _pairs(self, mask: int):
        return [p for i in self.ordered(mask) for p in self.owners[i]]

    def _stage(self, mask: int, start_stages: list[dict], pairs) -> dict:
        # keep the stages others need: every sequential prefix; union singletons
        # (per-owner models) and the grand coalition (the model influence methods study)
        return self._train_stage(self.key(mask), start_stages, pairs, self.kept(mask))

    def _train_stage(self, key: str, start_stages: list[dict], pairs, keep: bool) -> dict:
        """The stage of ``key``: from the cache, or trained (and kept when ``keep``). A
        kept stage is trained under its lock, so shards that need the same sequential
        prefix train it once and score the weights that were stored (stage locks are
        only ever taken inside a utility's lock, never the other way round)."""
        if not keep:
            return self._cached_stage(key) or self._fit_stage(key, start_stages, pairs, keep)
        st = self._cached_stage(key)
        if st is not None:
            return st
        with self.cache.lock("stage", key):
            return self._cached_stage(key) or self._fit_stage(key, start_stages, pairs, keep)

    def _cached_stage(self, key: str) -> dict | None:
        st = self.cache.get_tensors("stage", key)
        theirs = (st or {}).get("meta", {}).get("model")
        if theirs is not None and theirs != (ours := self.stage_meta()["model"]):   # stage_meta hashes the vocab
            print(f"[dvbench] stage {key[:12]}: trained on another base than this game's ({theirs} vs {ours}); "
                  f"retraining it", flush=True)
            return None
        return st

    def _fit_stage(self, key: str, start_stages: list[dict], pairs, keep: bool) -> dict:
        model, tok = self.base()
        start = materialize(model, start_stages) if start_stages else model
        t0 = time.perf_counter()
        # the pool's reference log-probs are the base's: valid for stages that start from it
        stage, stats, trained = dpo_train(start, tok, self.model_spec, pairs, self.train, seed=self.seed,
                                          examples=self.examples(pairs), reference_given=not start_stages)
        stage["train_s"], stage["stats"] = time.perf_counter() - t0, stats
        stage["meta"] = self.stage_meta()
        if keep:
            self.cache.put_tensors("stage", key, stage)
        self._trained = {id(stage): trained}    # scored next, without rebuilding it from the base
        self._fits += 1
        return stage

    def _compute(self, mask: int) -> dict:
        return self._score(lambda: self.stages(mask), n_train=len(self._pairs(mask)) if mask else 0,
                           info=self._info(mask))

    def _info(self, item) -> dict:
        """What a utility record says it is: a coalition (mask, members) or a training set."""
        return {"subset": True} if isinstance(item, Subset) else {"mask": item, "members": list(members(item, self.n))}

    def _score(self, make_chain, n_train: int, info: dict, trained=None) -> dict:
        """Train (``make_chain`` returns the stages; none = the base) and score on the eval
        pairs: ``trained`` (the model the last stage trained), else the model a stage just
        trained inside ``make_chain``, else the chain rebuilt from the base."""
        model, tok = self.base()
        base_lc, base_lr = self._base_logps()
        train_s, stats = 0.0, {}
        if trained is None:        # a packed fine-tune opened its window before training
            reset_gpu_peak()
        chain = make_chain() if n_train else []
        if not chain:
            lc, lr, eval_s = base_lc, base_lr, 0.0
        else:
            train_s, stats = chain[-1]["train_s"], chain[-1]["stats"]
            policy = trained if trained is not None else self._trained.pop(id(chain[-1]), None)
            self._trained.clear()
            if policy is None:                                   # stage from the cache: rebuild it
                policy = materialize(model, chain)
            t0 = time.perf_counter()
            lc, lr = sequence_logps(policy, tok, self.model_spec, self.eval, self.train.score_batch_size,
                                    self.train.max_length)
            eval_s = time.perf_counter() - t0
            if not (np.isfinite(lc).all() and np.isfinite(lr).all()):
                raise FineTuneDiverged(f"{info}: non-finite eval log-probs; lower train.lr")
        return {**info, "game": self.kind, "seed": self.seed,
                "metrics": utility_metrics(lc, lr, base_lc, base_lr, self.train.beta),
                "logp_chosen": np.asarray(lc).tolist(), "logp_rejected": np.asarray(lr).tolist(),
                "n_train": n_train, "train_s": train_s, "eval_s": eval_s, "stats": stats,
                "peak_rss": peak_rss_bytes(), "device": self.device_kind, "precision": self.train.precision,
                # this utility's fine-tune + scoring (a packed one: its whole pack's training)
                "peak_gpu_mem": gpu_peak_bytes()}


# ------------------------------------------------------------------ worker pool

def _in_pool(game: Game, batches: list[tuple]):
    """Compute the ``batches`` of items of ``game`` (one item each, or ``game.pack``)
    in the job's worker pool; yields ``(item, record)`` as they finish. One pool per
    process (loky's reusable executor, kept while a job runs, ``release_pool`` at its
    end): its workers import the stack and load the base once (``Game.base``, per
    process) and serve every phase (ground truth, noise seed, LDS, proxies, curves).

    A worker that dies (killed, out of memory) breaks the pool, and the coalitions
    the other workers were training with it; those are resubmitted once to a fresh
    pool (finished ones are in the cache and are not retrained). If the pool breaks
    again the error propagates: a coalition that kills every worker it runs on is not
    retried forever, and a rerun resumes from the cache. Any other way out (an error,
    Ctrl-C, no batch finishing within ``stall_timeout``) stops the workers, running
    fine-tunes included, so nothing trains on behind the caller's back."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.process_executor import BrokenProcessPool

    pending = list(batches)
    for attempt in (0, 1):
        pool = get_reusable_executor(max_workers=game.n_jobs, timeout=POOL_IDLE_S, initializer=_init_worker,
                                     initargs=(game.n_jobs,))
        futures = {pool.submit(_compute_in_worker, game, b): b for b in pending}
        ok = False
        try:
            waiting = set(futures)
            while waiting:
                limit = stall_timeout(game)
                done, waiting = wait(waiting, timeout=limit, return_when=FIRST_COMPLETED)
                if not done:
                    raise TimeoutError(f"no fine-tune finished in {limit:.0f} s ({STALL_FACTOR}x the slowest so "
                                       f"far, pack {game.pack}): a worker is stuck; its pool is stopped, finished "
                                       f"coalitions are cached: rerun to resume")
                for f in done:
                    result = f.result()
                    pending.remove(futures[f])
                    yield from result
            ok = True
            return
        except BrokenProcessPool as e:
            ok = True                         # the pool is gone already; a fresh one is made above
            if attempt:
                raise RuntimeError(f"a fine-tune worker died twice (killed, or out of memory; {len(pending)} "
                                   f"coalition(s) unfinished); finished ones are cached: rerun to resume, or "
                                   f"lower n_jobs") from e
        finally:
            for f in futures:
                f.cancel()
            if not ok:                        # error, interrupt, stall, or the caller stopped reading
                pool.shutdown(wait=False, kill_workers=True)


STALL_FACTOR = 20          # a batch may take this many times the slowest fine-tune seen so far
STALL_MIN_S = 1800         # ... and never less than this (the first fine-tunes, a busy machine)


def stall_timeout(game: Game) -> float:
    """Seconds to wait for the next batch before the pool is taken for stuck:
    ``STALL_FACTOR`` x the slowest fine-tune of this process's records so far x the
    pack, at least ``STALL_MIN_S``."""
    slowest = max((e.get("compute_s") or 0.0 for e in game.log.entries.values()), default=0.0)
    return max(STALL_MIN_S, STALL_FACTOR * slowest * max(game.pack, 1))


def release_pool() -> None:
    """End the process's worker pool, if it has one (at the end of a job: idle workers
    holding a loaded base are not left for the next 30 minutes)."""
    import joblib.externals.loky.reusable_executor as reusable
    if reusable._executor is not None:
        reusable._executor.shutdown(wait=True)


POOL_IDLE_S = 1800     # a pool worker left idle this long exits (the next call starts a new one)


def _init_worker(n_jobs: int) -> None:
    import joblib.externals.loky.process_executor as loky_worker

    from bench.core.env import quiet_libraries
    from bench.core.workers import exit_with_parent
    quiet_libraries()
    exit_with_parent()          # a worker of a killed job ends instead of training on as an orphan
    # loky restarts a worker whose memory grew 300 MB past its size after its first
    # task, taking it for a leak; a worker here keeps what it loaded on purpose (the
    # base, the prepared pool, tokenisations) and the allocator keeps freed pages, so
    # it was restarted mid-job (and reloaded everything). Restart only past 4 GB.
    loky_worker._MAX_MEMORY_LEAK_SIZE = 4 * 2**30
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))


def _compute_in_worker(game: Game, batch: tuple):
    if code_version() != game._static["code"]:
        raise RuntimeError(f"the code on the utility path changed on disk since this job started (job "
                           f"{game._static['code']}, worker {code_version()}): its fine-tunes would be filed under "
                           f"the wrong key; finished ones are cached: rerun the job")
    return [(item, rec) for item, rec, _ in game._get_or_compute_batch(batch)]
