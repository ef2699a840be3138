"""The data-selection experiment: fine-tune on a value-selected subset vs a random
subset of the same size vs all data.

For each subset size and seed, ``selection_curve`` builds

  qocs    SHED's quality-ordered cluster sampling (whole clusters by score)
  qwcs    SHED's quality-weighted cluster sampling (clusters ~ softmax(β·score))
  random  a uniform subset of the same size
  all     every training example (one per seed, independent of the size)

and scores each with the game's utility (``game.subset_utilities``: DPO from the
base on exactly those examples, cached by content, parallel when n_jobs > 1).
A seed drives the subset draw *and* the training seed (the game ``with_seed(seed0 +
seed)``), so the confidence intervals include training noise; ``all`` then varies by
seed too. Cluster scores come from a SHED ``Valuation`` (its proxy values) or, for
any per-example values, the mean value of each cluster's members.

The program: ``python -m bench selection`` (``bench/cli/selection.py``).
"""
from __future__ import annotations


import numpy as np

from bench.core.errors import ConfigError

METHODS = ("qocs", "qwcs", "random", "all")
SIZED = ("qocs", "qwcs", "random")


# ------------------------------------------------------------------ cluster sampling (SHED's QOCS / QWCS)

def target_count(target: float, n: int, field_name: str = "target") -> int:
    """A selection size: a float is a fraction of the n examples in (0, 1] (rounded,
    at least 1), an int is a count in [1, n]."""
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{field_name}: {target!r} must be a fraction in (0, 1] or a count in [1, {n}]")
    if isinstance(target, (float, np.floating)):
        if not 0 < target <= 1:
            raise ConfigError(f"{field_name}: fraction {target} must be in (0, 1] (an int is a count)")
        return max(1, int(round(float(target) * n)))
    if not 1 <= int(target) <= n:
        raise ConfigError(f"{field_name}: count {target} must be in [1, {n}] (the number of examples)")
    return int(target)


def _check_scores(scores, clusters) -> tuple[np.ndarray, np.ndarray]:
    s, c = np.asarray(scores, dtype=float), np.asarray(clusters, dtype=int)
    if s.ndim != 1 or c.ndim != 1:
        raise ValueError("scores ([C]) and clusters ([N] cluster of each example) must be 1-D")
    if len(c) and (c.min() < 0 or c.max() >= len(s)):
        raise ValueError(f"cluster labels must be in [0, {len(s)}), got [{c.min()}, {c.max()}]")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, c


def qocs(scores, clusters, target, rng: np.random.Generator | None = None) -> np.ndarray:
    """Quality-ordered cluster sampling: whole clusters in decreasing score (ties: lower
    cluster index first) until ``target`` examples. The last cluster needed is cut to
    the missing count by a uniform draw of its members (``rng``; default seed 0).
    Returns the selected example indices, sorted."""
    s, c = _check_scores(scores, clusters)
    count = target_count(target, len(c))
    rng = rng if rng is not None else np.random.default_rng(0)
    chosen: list[int] = []
    for k in np.argsort(-s, kind="stable"):
        members = np.flatnonzero(c == k)
        need = count - len(chosen)
        if len(members) <= need:
            chosen.extend(members.tolist())
        else:
            chosen.extend(rng.choice(members, size=need, replace=False).tolist())
        if len(chosen) == count:
            break
    return np.sort(np.array(chosen, dtype=int))


def softmax_weights(scores, beta: float) -> np.ndarray:
    z = beta * np.asarray(scores, dtype=float)
    z -= z.max()
    w = np.exp(z)
    return w / w.sum()


def qwcs(scores, clusters, target, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Quality-weighted cluster sampling: repeatedly draw a cluster with probability
    softmax(β·score), then a uniform member of it without replacement; a drawn cluster
    that is already empty is redrawn (done exactly by renormalising the weights over the
    non-empty clusters). Returns the selected example indices, sorted."""
    s, c = _check_scores(scores, clusters)
    count = target_count(target, len(c))
    w = softmax_weights(s, beta)
    pools = [list(rng.permutation(np.flatnonzero(c == k))) for k in range(len(s))]
    alive = np.array([len(p) > 0 for p in pools])
    chosen: list[int] = []
    while len(chosen) < count:
        p = np.where(alive, w, 0.0)
        if p.sum() <= 0:       # every non-empty cluster has weight 0 after underflow: uniform over them
            p = alive.astype(float)
        k = int(rng.choice(len(s), p=p / p.sum()))
        chosen.append(int(pools[k].pop()))
        if not pools[k]:
            alive[k] = False
    return np.sort(np.array(chosen, dtype=int))



# ------------------------------------------------------------------ the curve

def cluster_scores(values, clusters) -> np.ndarray:
    """A valuation's per-cluster scores: its own (SHED's proxy values), or the mean point
    value per cluster."""
    own = getattr(values, "cluster_scores", None)
    if own is not None:
        return np.asarray(own, dtype=float)
    pv = np.asarray(getattr(values, "point_values", values), dtype=float)
    c = np.asarray(clusters, dtype=int)
    if pv.shape != c.shape:
        raise ValueError(f"point values {pv.shape} and clusters {c.shape} must have one entry per example")
    n_c = int(c.max()) + 1
    sums = np.bincount(c, weights=pv, minlength=n_c)
    counts = np.bincount(c, minlength=n_c)
    return np.divide(sums, counts, out=np.zeros(n_c), where=counts > 0)


def _standardize(s: np.ndarray) -> np.ndarray:
    sd = s.std()
    return (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)


def selection_curve(game, point_values_or_valuation, clusters=None, sizes=(0.05, 0.1, 0.2, 0.5),
                    seeds=(0, 1, 2), methods=METHODS, beta: float = 1.0, standardize: bool = True,
                    train_seeds: bool = True, eval_game=None) -> dict:
    """Utilities of QOCS / QWCS / random subsets per size and seed, and of all data.

    ``clusters``: the cluster of each example in ``[p for o in game.owners for p in o]``
    order (default: the valuation's own ``clusters``, as SHED's). ``sizes``: fractions
    (floats) or counts (ints). QWCS draws clusters with softmax(beta · score), scores
    z-scored first when ``standardize`` (so beta is unit-free). Returns a JSON-able
    dict: ``rows`` (one per method, size, seed), ``summary`` (mean and 95% CI per
    method and size), ``paired`` (method − random and method − all, paired by seed).

    ``eval_game`` scores the subsets (default ``game``). SHED's scores come from the
    game's eval set, so scoring the selection on that same set selects on the test
    metric; pass a game over the same training data with a held-out eval set to avoid it.
    """
    from bench.core.metrics import mean_ci
    from bench.core.metering import fresh_compute_s

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"selection.methods: unknown {unknown}; choose from {list(METHODS)}")
    if not seeds:
        raise ConfigError("selection.seeds: need at least one seed")
    if clusters is None:
        clusters = getattr(point_values_or_valuation, "clusters", None)
        if clusters is None:
            raise ConfigError("selection: no clusters given and the valuation has none of its own")
    labels = np.asarray(clusters, dtype=int)
    pairs = game.flat_pairs()
    n = len(pairs)
    if len(labels) != n:
        raise ValueError(f"clusters has {len(labels)} entries for {n} training examples")
    raw = cluster_scores(point_values_or_valuation, labels)
    scores = _standardize(raw) if standardize else raw
    counts = [target_count(s, n, "selection.sizes") for s in sizes]

    scorer = game if eval_game is None else eval_game
    if eval_game is not None and len(eval_game.flat_pairs()) != n:
        raise ValueError("eval_game must hold the same training examples as game")
    rows = []
    used = {}          # the games that trained here, for the job's fresh-compute accounting
    for seed in seeds:
        g = scorer.with_seed(scorer.seed + int(seed)) if train_seeds else scorer
        plan = []   # (method, size, count, indices)
        for j, (size, count) in enumerate(zip(sizes, counts)):
            for m in SIZED:
                if m not in methods:
                    continue
                rng = np.random.default_rng([int(seed), j, SIZED.index(m), 20240])
                if m == "qocs":
                    idx = qocs(raw, labels, count, rng)
                elif m == "qwcs":
                    idx = qwcs(scores, labels, count, beta, rng)
                else:
                    idx = np.sort(rng.choice(n, size=count, replace=False))
                plan.append((m, float(size), count, idx))
        if "all" in methods:
            plan.append(("all", 1.0, n, np.arange(n)))
        u = g.subset_utilities([[pairs[i] for i in idx] for *_, idx in plan])
        used[id(g)] = g
        for (m, size, count, idx), ui in zip(plan, u):
            rows.append({"method": m, "size": size, "count": count, "seed": int(seed), "train_seed": g.seed,
                         "utility": float(ui), "indices": idx.tolist()})

    def ci(xs):
        mean, lo, hi = mean_ci(xs)
        return {"mean": mean, "lo": lo, "hi": hi, "n": len(xs)}

    summary = {}
    for m in methods:
        if m == "all":
            summary[m] = ci([r["utility"] for r in rows if r["method"] == "all"])
            continue
        summary[m] = {"sizes": [float(s) for s in sizes], "counts": counts, "stats": [
            ci([r["utility"] for r in rows if r["method"] == m and r["count"] == c]) for c in counts]}
    by = {(r["method"], r["count"], r["seed"]): r["utility"] for r in rows}
    paired = {}
    for m in [x for x in methods if x in ("qocs", "qwcs")]:
        for ref in ("random", "all"):
            if ref not in methods:
                continue
            paired[f"{m}-{ref}"] = [ci([by[(m, c, s)] - by[(ref, n if ref == "all" else c, s)] for s in seeds])
                                    for c in counts]
    return {"metric": scorer.metric, "n_examples": n, "held_out_eval": eval_game is not None,
            "sizes": [float(s) for s in sizes], "counts": counts,
            "seeds": [int(s) for s in seeds], "methods": list(methods), "beta": beta, "standardize": standardize,
            "train_seeds": train_seeds, "base_utility": float(scorer.subset_utilities([[]])[0]),
            "cluster_scores": raw.tolist(), "cluster_sizes": np.bincount(labels, minlength=len(raw)).tolist(),
            "qwcs_weights": softmax_weights(scores, beta).tolist(),
            "rows": rows, "summary": summary, "paired": paired,
            "fresh_compute_s": sum(fresh_compute_s(g.log) for g in used.values()),
            "fresh_wall_s": sum(g.log.busy_s for g in used.values())}


def format_curve(curve: dict) -> str:
    """A plain-text table: mean [95% CI] per method and size, and the paired differences."""
    def f(st):
        lo = "" if not np.isfinite(st["lo"]) else f" [{st['lo']:.3f}, {st['hi']:.3f}]"
        return f"{st['mean']:.3f}{lo}"
    lines = [(f"metric {curve['metric']}, {curve['n_examples']} examples, seeds {curve['seeds']}, "
              f"base {curve['base_utility']:.3f}")]
    if "all" in curve["summary"]:
        lines.append(f"  all data: {f(curve['summary']['all'])}")
    for m in [x for x in curve["methods"] if x != "all"]:
        s = curve["summary"][m]
        for size, c, st in zip(s["sizes"], s["counts"], s["stats"]):
            lines.append(f"  {m:6s} {size:>5g} ({c:3d}): {f(st)}")
    for k, sts in curve["paired"].items():
        for c, st in zip(curve["counts"], sts):
            lines.append(f"  {k:12s} ({c:3d}): {f(st)}")
    return "\n".join(lines)


def curve_for_valuation(game, val, test_pairs=None, clusters=None, sizes=(0.05, 0.1, 0.2, 0.5),
                        seeds=(0, 1, 2), methods=METHODS, beta: float = 1.0) -> dict:
    """The selection curve of one valuation, as the harness runs it.

    Clusters: the valuation's own (SHED), else ``clusters`` (the caller's
    clustering of the examples; cluster scores = mean point value). Subsets are judged on ``test_pairs`` (a
    held-out split the valuer never saw) when given; without one the curve is
    marked ``held_out_eval: false``, because the valuer's scores came from the
    same eval set."""
    if val.point_values is None:
        raise ConfigError(f"selection.valuers: {val.name!r} has no per-example values to select with; "
                          f"remove it from selection.valuers")
    clusters = val.clusters if val.clusters is not None else clusters
    eval_game = game.with_eval(test_pairs) if test_pairs else None
    return selection_curve(game, val, clusters, sizes=tuple(sizes), seeds=tuple(seeds), methods=tuple(methods),
                           beta=beta, eval_game=eval_game)


def compact(curve: dict) -> dict:
    """A curve without per-row subset indices (what goes into a run record)."""
    return {**{k: v for k, v in curve.items() if k not in ("rows",)},
            "rows": [{k: v for k, v in r.items() if k != "indices"} for r in curve["rows"]]}
