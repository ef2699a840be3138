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

Command line (builds the game with Hydra compose, values it with SHED, writes a JSON
next to the plot):

    python -m bench.selection --experiment quick --seeds 0 1 2 \\
        --out results/plots/selection_quick.png results_dir=/tmp/r n_jobs=2
"""
from __future__ import annotations

import os
import sys

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
               "WANDB_MODE": "offline"}.items():
    os.environ.setdefault(_k, _v)

import argparse
import json
from pathlib import Path

import numpy as np

from bench.errors import ConfigError

METHODS = ("qocs", "qwcs", "random", "all")
SIZED = ("qocs", "qwcs", "random")


def cluster_scores(values, clusters) -> np.ndarray:
    """A valuation's per-cluster scores: SHED's proxy values, or the mean point value per cluster."""
    extras = getattr(values, "extras", None)
    if extras is not None and extras.get("proxy_values") is not None:
        return np.asarray(extras["proxy_values"], dtype=float)
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
    order (default: a SHED valuation's ``extras["clusters"]``). ``sizes``: fractions
    (floats) or counts (ints). QWCS draws clusters with softmax(beta · score), scores
    z-scored first when ``standardize`` (so beta is unit-free). Returns a JSON-able
    dict: ``rows`` (one per method, size, seed), ``summary`` (mean and 95% CI per
    method and size), ``paired`` (method − random and method − all, paired by seed).

    ``eval_game`` scores the subsets (default ``game``). SHED's scores come from the
    game's eval set, so scoring the selection on that same set selects on the test
    metric; pass a game over the same training data with a held-out eval set to avoid it.
    """
    from bench.metrics import mean_ci
    from bench.run import fresh_compute_s
    from valuers.shed import flat_pairs, qocs, qwcs, softmax_weights, target_count

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"selection.methods: unknown {unknown}; choose from {list(METHODS)}")
    if not seeds:
        raise ConfigError("selection.seeds: need at least one seed")
    if clusters is None:
        clusters = (getattr(point_values_or_valuation, "extras", None) or {}).get("clusters")
        if clusters is None:
            raise ConfigError("selection: no clusters given and the valuation has no extras['clusters']")
    labels = np.asarray(clusters, dtype=int)
    pairs = flat_pairs(game)
    n = len(pairs)
    if len(labels) != n:
        raise ValueError(f"clusters has {len(labels)} entries for {n} training examples")
    raw = cluster_scores(point_values_or_valuation, labels)
    scores = _standardize(raw) if standardize else raw
    counts = [target_count(s, n, "selection.sizes") for s in sizes]

    scorer = game if eval_game is None else eval_game
    if eval_game is not None and len(flat_pairs(eval_game)) != n:
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
            "fresh_compute_s": sum(fresh_compute_s(g.log) for g in used.values())}


def plot_selection(curve: dict, out_png: str | Path, title: str | None = None) -> Path:
    """Utility vs subset size per method (mean, 95% CI band), full-data and base lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = curve["n_examples"]
    colors = {"qocs": "tab:blue", "qwcs": "tab:orange", "random": "tab:gray"}
    for m in [x for x in curve["methods"] if x != "all"]:
        s = curve["summary"][m]
        x = np.array(s["counts"]) / n
        mean = np.array([st["mean"] for st in s["stats"]])
        lo = np.array([st["lo"] for st in s["stats"]], dtype=float)
        hi = np.array([st["hi"] for st in s["stats"]], dtype=float)
        ax.plot(x, mean, "o-", color=colors.get(m), label=m.upper() if m != "random" else "random")
        if np.isfinite(lo).all():
            ax.fill_between(x, lo, hi, color=colors.get(m), alpha=0.18)
    if "all" in curve["summary"]:
        a = curve["summary"]["all"]
        ax.axhline(a["mean"], color="black", lw=1.2, label=f"all data ({n})")
        if np.isfinite(a["lo"]):
            ax.axhspan(a["lo"], a["hi"], color="black", alpha=0.08)
    ax.axhline(curve["base_utility"], color="black", ls=":", lw=1, label="base model")
    ax.set_xscale("log")
    xs = np.array(curve["counts"]) / n
    ax.set_xticks(xs, [f"{v:.0%}" for v in xs])
    ax.minorticks_off()
    ax.set_xlabel("subset size (share of the training examples)")
    ax.set_ylabel(f"utility ({curve['metric']})")
    ax.set_title(title or f"SHED data selection, {len(curve['seeds'])} seeds, 95% CI")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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


def curve_for_valuation(game, val, test_pairs=None, shed_args: dict | None = None, sizes=(0.05, 0.1, 0.2, 0.5),
                        seeds=(0, 1, 2), methods=METHODS, beta: float = 1.0) -> dict:
    """The selection curve of one valuation, as the harness runs it.

    Clusters: the valuation's own (SHED), else SHED's clustering with ``shed_args``
    (cluster scores = mean point value). Subsets are judged on ``test_pairs`` (a
    held-out split the valuer never saw) when given; without one the curve is
    marked ``held_out_eval: false``, because the valuer's scores came from the
    same eval set."""
    if val.point_values is None:
        raise ConfigError(f"selection.valuers: {val.name!r} has no per-example values to select with; "
                          f"remove it from selection.valuers")
    clusters = val.extras.get("clusters")
    if clusters is None:
        from bench.run import build_valuer
        shed, _ = build_valuer("shed", shed_args)
        clusters = shed.clusters(game)[0].labels
    eval_game = game.with_eval(test_pairs) if test_pairs else None
    return selection_curve(game, val, clusters, sizes=tuple(sizes), seeds=tuple(seeds), methods=tuple(methods),
                           beta=beta, eval_game=eval_game)


def compact(curve: dict) -> dict:
    """A curve without per-row subset indices (what goes into a run record)."""
    return {**{k: v for k, v in curve.items() if k not in ("rows",)},
            "rows": [{k: v for k, v in r.items() if k != "indices"} for r in curve["rows"]]}


# ------------------------------------------------------------------ command line

def compose_config(experiment: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from bench.run import CONF_DIR
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}", *overrides])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5],
                    help="fractions of the training examples")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--beta", type=float, default=1.0, help="QWCS temperature on z-scored cluster scores")
    ap.add_argument("--valuer", default="shed", help="a conf/valuer name whose valuation gives the scores")
    ap.add_argument("--out", default="results/plots/selection.png")
    ap.add_argument("--json", default=None, help="default: --out with .json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. results_dir=/tmp/r n_jobs=2")
    args = ap.parse_args(argv)

    from bench.errors import fail
    from bench.train import quiet_libraries
    quiet_libraries()
    try:
        from omegaconf import OmegaConf

        from bench.run import build_game, build_task, build_valuer
        from valuers.base import Budget
        cfg = compose_config(args.experiment, args.overrides)
        task = build_task(cfg)
        game, _ = build_game(cfg, task)
        all_args = OmegaConf.to_container(cfg.valuer_args, resolve=True) or {}
        valuer, vcfg = build_valuer(args.valuer, all_args.get(args.valuer))
        val = valuer.value(game, Budget(**OmegaConf.to_container(cfg.budget)))
        if not task.test:
            print("[dvbench] no test split (task.n_test_per_source / task.test_path): subsets are judged on "
                  "the eval set the valuer used", file=sys.stderr)
        curve = curve_for_valuation(game, val, task.test, all_args.get("shed"), sizes=args.sizes,
                                    seeds=args.seeds, methods=args.methods, beta=args.beta)
    except ConfigError as e:
        fail(e)
    curve.update(experiment=str(cfg.experiment_name), valuer=args.valuer, valuer_config=vcfg,
                 owner_values=np.asarray(val.owner_values).tolist(), valuation_cost=val.cost.to_dict(),
                 valuation_extras={k: v for k, v in val.extras.items() if k in (
                     "n_clusters", "group_size", "passes", "method", "proxies", "cluster_sizes", "proxy_values",
                     "proxy_stderr", "v_empty", "v_all")})
    out = plot_selection(curve, args.out, title=f"{cfg.experiment_name}: {args.valuer} selection "
                                                 f"({len(args.seeds)} seeds, 95% CI)")
    jpath = Path(args.json) if args.json else out.with_suffix(".json")
    from bench.cache import atomic_write_bytes
    from bench.tracking import to_jsonable
    atomic_write_bytes(jpath, json.dumps(to_jsonable(curve), indent=1).encode())
    print(format_curve(curve))
    print(f"plot: {out}\njson: {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
