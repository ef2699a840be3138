"""SHED (He et al., NeurIPS 2024): cluster-proxy Shapley values and cluster sampling.

Stage 1  embed every training example (prompt + chosen + rejected) with
         all-MiniLM-L6-v2 (``bench.core.embed``, cached on disk), K-means (seeded, fixed
         n_init) into C clusters; a cluster's *proxy* is its member nearest the
         centroid (ties: the lowest example index).
Stage 2  Shapley values of the C proxies as players of the game "DPO from the base
         on these proxies, scored on the eval set" (``game.subset_utilities``;
         the empty set is the game's base model, never 0):
           removal  k passes; each pass starts from all proxies and removes a random
                    group of g proxies at a time until none is left; every member of
                    the removed group is credited the utility drop (paper convention,
                    ``drop_share=full``; ``split`` divides it by the group's size, which
                    makes every pass efficient). Average over passes. Nominal cost
                    k·⌈C/g⌉ utilities; distinct fine-tunes ≤ 1 + k·(⌈C/g⌉ − 1) (all
                    proxies is shared, the empty set is the base). With g = 1 this is
                    permutation-sampling Shapley (each pass = one reversed permutation).
           exact    exact Shapley over the 2^C proxy subsets (small C only).
Stage 3  a cluster's score = its proxy's value; an example's value = its cluster's
         score; an owner's value = the sum over its examples. Zero-valued proxies are
         kept (the official code drops them). Selection: ``qocs`` / ``qwcs`` below,
         run by ``bench.core.selection``.

Training sets are always listed in the canonical example order
``[p for o in game.owners for p in o]`` so equal sets share one cache entry.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence

import numpy as np

from bench.core import shapley
from bench.core.embed import Clustering, check_n_clusters, cluster  # noqa: F401 (SHED's stage 1)
from bench.core.errors import ConfigError
from bench.core.settings import Settings, setting
from bench.core.selection import qocs, qwcs, softmax_weights, target_count  # noqa: F401 (SHED's stage 3)
from valuers.base import Budget, CostMeter, Step, Valuation, owner_sums

METHODS = ("removal", "exact")
DROP_SHARES = ("full", "split")
MAX_EXACT_CLUSTERS = 12

Coalition = tuple  # sorted tuple of player indices


# ------------------------------------------------------------------ stage 1: clusters

# ------------------------------------------------------------------ stage 2: proxy Shapley

@dataclass
class RemovalResult:
    values: np.ndarray                  # [n] mean credited drop over passes
    stderr: np.ndarray                  # [n] std over passes / sqrt(k) (NaN for k = 1)
    per_pass: np.ndarray                # [k, n] credited drop of each player in each pass
    passes: list = field(default_factory=list)   # per pass: groups, utilities (all … ∅), drops
    n_utility_calls: int = 0            # distinct coalitions asked for


def removal_groups(n: int, g: int, rng: np.random.Generator) -> list[Coalition]:
    """A random order of the n players cut into consecutive groups of g (the last may be smaller)."""
    order = rng.permutation(n)
    return [tuple(sorted(int(i) for i in order[s:s + g])) for s in range(0, n, g)]


def _check_removal_args(g: int, passes: int, drop_share: str) -> None:
    """The removal arguments of ``group_removal_shapley`` called on its own (the valuer's
    are checked by ``ShedSettings``)."""
    if g < 1:
        raise ConfigError(f"valuer.shed.group_size: {g}; use a value >= 1")
    if passes < 1:
        raise ConfigError(f"valuer.shed.passes: {passes}; use a value >= 1")
    if drop_share not in DROP_SHARES:
        raise ConfigError(f"valuer.shed.drop_share: unknown {drop_share!r}; choose one of {list(DROP_SHARES)}")


def group_removal_shapley(utilities: Callable[[list[Coalition]], Sequence[float]], n: int, g: int,
                          passes: int, rng: np.random.Generator, drop_share: str = "full",
                          stop: Callable[[int], bool] | None = None) -> RemovalResult:
    """SHED's proxy Shapley by random group removal.

    ``utilities(coalitions)`` returns v of each coalition (a sorted tuple of player
    indices; ``()`` is the empty set and must be the game's v(∅)). It is called once per
    pass with that pass's ⌈n/g⌉ + 1 coalitions, so a caller can compute them in parallel.
    ``stop(done_passes)`` is asked after every pass; a truthy answer ends the run early.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 players, got {n}")
    _check_removal_args(g, passes, drop_share)
    seen: set[Coalition] = set()
    per_pass, log = [], []
    for k in range(passes):
        groups = removal_groups(n, g, rng)
        remaining, chain = set(range(n)), [tuple(range(n))]
        for grp in groups:
            remaining -= set(grp)
            chain.append(tuple(sorted(remaining)))
        assert chain[-1] == ()
        u = np.asarray(utilities(chain), dtype=float)
        if u.shape != (len(chain),) or not np.isfinite(u).all():
            raise ValueError(f"utilities returned {u!r} for {len(chain)} coalitions")
        seen.update(chain)
        drops = u[:-1] - u[1:]             # drop when each group leaves; the last one is v(last) − v(∅)
        credit = np.zeros(n)
        for grp, dv in zip(groups, drops):
            credit[list(grp)] = dv / len(grp) if drop_share == "split" else dv
        per_pass.append(credit)
        log.append({"groups": [list(x) for x in groups], "utilities": u.tolist(), "drops": drops.tolist()})
        if stop is not None and k + 1 < passes and stop(k + 1):
            break
    pp = np.array(per_pass)
    se = pp.std(axis=0, ddof=1) / math.sqrt(len(pp)) if len(pp) > 1 else np.full(n, np.nan)
    return RemovalResult(pp.mean(axis=0), se, pp, log, len(seen))


def exact_proxy_shapley(utilities: Callable[[list[Coalition]], Sequence[float]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Shapley over all 2^n coalitions of proxies; returns (values, table)."""
    if n > MAX_EXACT_CLUSTERS:
        raise ConfigError(f"valuer.shed.n_clusters: {n} is too many for method=exact (2^{n} fine-tunes); "
                          f"use <= {MAX_EXACT_CLUSTERS} or valuer.shed.method=removal")
    coalitions = [shapley.members(m, n) for m in range(1 << n)]
    table = np.asarray(utilities(coalitions), dtype=float)
    phi = shapley.exact_shapley(table)
    shapley.check_efficiency(phi, table, atol=1e-9)
    return phi, table


# ------------------------------------------------------------------ the valuer

def _metrics() -> tuple:
    from bench.core.train import METRICS
    return tuple(METRICS)


@dataclass(frozen=True)
class ShedSettings(Settings):
    prefix = "valuer.shed"
    n_clusters: int = setting(10, "C, the number of K-means clusters; at most the number of (distinct) "
                                  "training examples", min=1)
    method: str = setting("removal", "removal: k passes of random group removal | exact: all 2^C proxy "
                                     f"subsets (C <= {MAX_EXACT_CLUSTERS})", choices=METHODS)
    group_size: int = setting(1, "g; removal cost = passes x ceil(C / g) utilities (the empty set is the "
                                 "base model)", min=1)
    passes: int = setting(5, "k, removal passes", min=1)
    drop_share: str = setting("full", "full: each removed member gets the whole drop (paper) | split: the drop "
                                      "divided by the group's size", choices=DROP_SHARES)
    seed: int = setting(0, "K-means seed (and, with the game's seed, the removal order)", min=0)
    n_init: int = setting(10, "K-means restarts (fixed, so clusters are reproducible)", min=1)
    embed_batch_size: int = setting(64, "examples per embedding batch", min=1)
    metric: str | None = setting(None, "utility metric of the proxy game; null = the game's metric",
                                 choices=_metrics())

    def check(self) -> None:
        if self.method == "exact" and self.n_clusters > MAX_EXACT_CLUSTERS:
            raise self.error("n_clusters", f"{self.n_clusters} is too many for method=exact (2^{self.n_clusters} "
                                           f"fine-tunes); use <= {MAX_EXACT_CLUSTERS} or method=removal")


class SHED:
    """Cluster-proxy Shapley (see module docstring). ``metric`` null = the game's metric."""

    def __init__(self, name: str = "shed", **settings):
        self.name = name
        self.settings = s = ShedSettings.of(settings, prefix=f"valuer.{name}")
        self.n_clusters, self.method = s.n_clusters, s.method
        self.group_size, self.passes, self.drop_share = s.group_size, s.passes, s.drop_share
        self.seed, self.n_init, self.embed_batch_size, self.metric = s.seed, s.n_init, s.embed_batch_size, s.metric

    def check(self, game) -> None:
        """Settings that depend on the game, checked by the harness before any training."""
        from bench.core.embed import pair_text
        pairs = game.flat_pairs()
        # before any embedding: equal texts embed equally (duplicated owners)
        check_n_clusters(self.n_clusters, len(pairs), len({pair_text(p) for p in pairs}),
                         key=f"valuer.{self.name}.n_clusters")

    # -- stage 1 (no training; also used by bench.core.selection)
    def clusters(self, game, meter: CostMeter | None = None) -> tuple[Clustering, dict]:
        from contextlib import nullcontext

        from bench.core.embed import embed_pairs
        self.check(game)                   # fail before loading the embedding model
        pairs = game.flat_pairs()
        ph = meter.phase if meter else (lambda *a, **k: nullcontext())
        with ph("embed", own_compute=True):
            emb, info = embed_pairs(pairs, game.artefacts_dir("embeddings"), self.embed_batch_size,
                                    game.device)
        with ph("cluster", own_compute=True):
            cl = cluster(emb, self.n_clusters, self.seed, self.n_init)
        return cl, info

    def value(self, game, budget: Budget) -> Valuation:
        metric = self.metric or game.metric
        meter = CostMeter(game)
        cl, emb_info = self.clusters(game, meter)
        pairs = game.flat_pairs()
        C, g = self.n_clusters, self.group_size
        proxy_order = np.argsort(cl.proxies, kind="stable")     # clusters in canonical example order

        def proxy_pairs(coalition: Coalition) -> list:
            keep = set(coalition)
            return [pairs[cl.proxies[c]] for c in proxy_order if c in keep]

        def utilities(coalitions: list[Coalition]) -> np.ndarray:
            sets = [proxy_pairs(co) for co in coalitions]
            u = game.subset_utilities(sets)
            if metric != game.metric:
                u = np.array([float(game.subset_record(s)["metrics"][metric]) for s in sets])
            return u

        extras = {"method": self.method, "n_clusters": C, "metric": metric, "kmeans_seed": self.seed,
                  "n_init": self.n_init, "inertia": cl.inertia, "embedding": emb_info,
                  "clusters": cl.labels.tolist(), "cluster_sizes": cl.sizes.tolist(),
                  "proxies": cl.proxies.tolist(), "proxy_ids": [pairs[i].id for i in cl.proxies]}
        per_pass = None
        with meter.phase("fine_tune+score"):
            if self.method == "exact":
                phi, table = exact_proxy_shapley(utilities, C)
                extras.update(proxy_table=table.tolist(), v_empty=float(table[0]), v_all=float(table[-1]),
                              nominal_utilities=1 << C)
            else:
                groups_per_pass = math.ceil(C / g)
                k = self.passes
                cap = budget.max_fine_tunes
                if cap is not None and groups_per_pass > 1:
                    k = max(1, min(k, (cap - 1) // (groups_per_pass - 1)))
                rng = np.random.default_rng(self.seed + 7919 * game.seed)
                t0 = time.perf_counter()
                stop = (lambda done: time.perf_counter() - t0 > budget.max_seconds) \
                    if budget.max_seconds is not None else None
                res = group_removal_shapley(utilities, C, g, k, rng, self.drop_share, stop)
                phi, per_pass = res.values, res.per_pass
                extras.update(group_size=g, passes_requested=self.passes, passes=len(res.per_pass),
                              drop_share=self.drop_share, nominal_utilities=len(res.per_pass) * groups_per_pass,
                              v_empty=res.passes[0]["utilities"][-1], v_all=res.passes[0]["utilities"][0],
                              per_pass_groups=[p["groups"] for p in res.passes],
                              per_pass_drops=[p["drops"] for p in res.passes],
                              per_pass_utilities=[p["utilities"] for p in res.passes],
                              per_pass_values=per_pass.tolist(),
                              proxy_stderr=res.stderr.tolist())
        with meter.phase("values", own_compute=True):
            point_values = phi[cl.labels].astype(float)
            owner_values = owner_sums(point_values, game.owner_sizes)
            stderr = None
            if per_pass is not None and len(per_pass) > 1:
                counts = np.zeros((game.n, C))            # examples of owner i in cluster c
                np.add.at(counts, (np.repeat(np.arange(game.n), game.owner_sizes), cl.labels), 1.0)
                owner_pp = per_pass @ counts.T            # [k, n] owner values per pass
                stderr = owner_pp.std(axis=0, ddof=1) / math.sqrt(len(owner_pp))
        if emb_info["cached"]:     # the embedding's from-scratch cost, recorded when it was computed
            extras["embed_s_recorded"] = emb_info["embed_s"]
            meter.add_own(emb_info["embed_s"])
        return Valuation(owner_values, point_values=point_values, stderr=stderr, cost=meter.cost(),
                         clusters=cl.labels, cluster_scores=phi, trajectory=self.trajectory(res, cl.labels, game)
                         if per_pass is not None else (), extras=extras)

    @staticmethod
    def trajectory(res, labels, game) -> tuple:
        """SHED after k' <= k passes (the running mean of the per-pass values), by the
        fine-tunes spent: one per removal but the last of a pass (the empty set = the
        base model), once for the shared all-proxies set."""
        per_pass_cost = len(res.passes[0]["groups"]) - 1
        steps = []
        for j in range(1, len(res.per_pass) + 1):
            pv = res.per_pass[:j].mean(0)[labels].astype(float)
            steps.append(Step(1 + j * per_pass_cost, owner_sums(pv, game.owner_sizes), pv))
        return tuple(steps)
