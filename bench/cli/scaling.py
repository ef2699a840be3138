"""Cost of Shapley by exact retraining, by permutation sampling and by DPO arithmetic as n grows.

    python -m bench scaling --owners 4 6 8 10           # make bench-scaling (tiny tier, n_jobs=2)
    python -m bench scaling --owners 4 10 12 16 32 --plan   # fine-tunes per method and n; trains nothing
    python -m bench scaling --owners 12                 # exact: 4,095 fine-tunes (see --plan first)
    python -m bench scaling --owners 16 32 --max-permutations 50   # sampling only (n > --exact-max)
    python -m bench scaling --owners 4 -- model.n_embd=64 game=sequential   # overrides of the preset

The game of each n: the model, trainer and task settings of ``experiment=<--experiment>``
(default ``scale_tiny``, Hydra overrides of it after ``--``) with n iid owners of
``--per-owner`` pairs each; one task (its training pool sized for the largest n), so the
base model is built once. Each n gets a cache of its own (a fresh temporary folder, or
``<--cache-dir>/n<n>``), so a method's wall seconds never profit from another n.

For each n, in this order on one cache:

  mc     permutation Monte Carlo Shapley (``bench.core.shapley.permutation_shapley``), one
         coalition at a time, stopped once the LARGEST standard error over owners is <=
         ``--target-se`` (after at least ``--min-permutations``), or at ``--max-permutations``
         (then marked ``*``: target not reached). It runs first, on an empty cache, so its
         wall seconds are its own.
  arith  DPO arithmetic: n single-owner fine-tunes, every coalition's utility by arithmetic
         on their eval margins (exact Shapley of that table for n <= 16; above, permutation
         sampling of the arithmetic utilities, 2,000 permutations, no fine-tunes).
  exact  exact retraining Shapley, 2^n - 1 fine-tunes: only for n <= ``--exact-max`` (12).

For n <= --exact-max, MC is "at matched error": the fine-tunes and seconds it needed to
reach the target SE, and its actual error against the exact values. For n > --exact-max
there is no ground truth: MC is the reference the arithmetic is compared with (Spearman),
with MC's SE (mean and max over owners) beside it.

--target-se is in utility units (the game's metric, pref_acc by default: 0.01 = one point of
preference accuracy). The natural target is the training noise (how much exact Shapley moves
between two training seeds), which this script does not measure (one seed); the
``scale_tiny`` job does (its ``metrics.one_seed_exact``, over seeds [0, 1]).

Costs: ``FT`` = fine-tunes a method used (trained now, or read from the cache where an
earlier method of the same n trained them); ``s`` = device seconds: the recorded
train+eval seconds of every coalition it used, cached or not (from-scratch compute,
comparable whatever was cached, and what the speedup divides). ``MC wall`` = MC's wall
seconds. ``--n-jobs`` trains exact's coalitions and the arithmetic's singletons in
parallel; MC's permutations are sequential (each prefix follows the last).

``--plan`` prints the fine-tunes of each method for each n (exact 2^n - 1; MC at most
min(2^n - 1, P(n - 1) + 1) distinct coalitions for P = --max-permutations, as every
permutation ends at the full coalition; arith n) and exits without training.

Writes one JSON line per n to ``<results>/runs/scaling.jsonl``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from bench.core.errors import ConfigError, fail

EXACT_LIMIT = 20            # 2^20 - 1 fine-tunes: --exact-max above this is refused
ARITH_EXACT_MAX = 16        # the arithmetic's 2^n x P margin table above this would not fit in memory
MIN_PERMUTATIONS = 10      # before the SE target may stop MC (an SE of fewer is itself too noisy)
ARITH_PERMUTATIONS = 2000   # permutations of the (free) arithmetic utilities beyond ARITH_EXACT_MAX


# ------------------------------------------------------------------ the plan

def exact_fine_tunes(n: int) -> int:
    return 2 ** n - 1


def mc_fine_tunes_at_most(n: int, max_permutations: int) -> int:
    """Distinct coalitions P permutations can visit: n each, the full coalition shared by all."""
    return min(2 ** n - 1, max_permutations * (n - 1) + 1)


def plan(owners: list[int], exact_max: int, max_permutations: int) -> list[dict]:
    """Per n: the fine-tunes each method needs (MC: at most), and the distinct fine-tunes
    of the whole n (the methods of one n share its cache)."""
    rows = []
    for n in owners:
        exact = exact_fine_tunes(n) if n <= exact_max else None
        mc = mc_fine_tunes_at_most(n, max_permutations)
        distinct = exact if exact is not None else min(2 ** n - 1, mc + n)
        rows.append({"n": n, "exact": exact, "mc_at_most": mc, "arith": n, "distinct_at_most": distinct})
    return rows


def format_plan(rows: list[dict], args) -> str:
    lines = [(f"plan (nothing trained): fine-tunes per method; MC at most min(2^n - 1, P(n - 1) + 1) for "
              f"P = --max-permutations = {args.max_permutations}, fewer once its largest SE <= --target-se "
              f"{args.target_se:g}; exact only for n <= --exact-max = {args.exact_max}"),
             f"{'n':>3} {'exact (2^n-1)':>14} {'MC (at most)':>13} {'arith (n)':>10} {'distinct (at most)':>19}"]
    for r in rows:
        exact = f"{r['exact']:,}" if r["exact"] is not None else "-"
        lines.append(f"{r['n']:>3} {exact:>14} {r['mc_at_most']:>13,} {r['arith']:>10,} "
                     f"{r['distinct_at_most']:>19,}")
    lines.append(f"total: at most {sum(r['distinct_at_most'] for r in rows):,} fine-tunes (+ the base model, built "
                 f"once, and its evaluation per n)")
    return "\n".join(lines)


# ------------------------------------------------------------------ arguments

def check_args(args) -> None:
    """Every option, before anything is composed or trained: one line naming it and the fix."""
    for n in args.owners:
        if n < 2:
            raise ConfigError(f"--owners: n = {n}; a Shapley value needs at least 2 owners, use n >= 2 "
                              f"(e.g. --owners 4 6 8)")
    twice = sorted({n for n in args.owners if args.owners.count(n) > 1})
    if twice:
        raise ConfigError(f"--owners: {twice} listed twice (a second run of the same n would only re-read "
                          f"its cache); name each n once")
    if args.per_owner < 1:
        raise ConfigError(f"--per-owner: {args.per_owner}; every owner needs at least 1 pair, use "
                          f"--per-owner >= 1 (e.g. 8)")
    if args.epochs is not None and not args.epochs > 0:
        raise ConfigError(f"--epochs: {args.epochs:g}; a fine-tune needs epochs > 0 (e.g. --epochs 3)")
    if args.n_jobs is not None and args.n_jobs < 1:
        raise ConfigError(f"--n-jobs: {args.n_jobs}; use >= 1 parallel workers")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: {args.threads}; use >= 1 torch thread")
    if args.exact_max < 0:
        raise ConfigError(f"--exact-max: {args.exact_max}; use >= 0 (0 = no exact retraining at any n)")
    if args.exact_max > EXACT_LIMIT:
        raise ConfigError(f"--exact-max: {args.exact_max} would retrain up to {exact_fine_tunes(args.exact_max):,} "
                          f"coalitions for one n; keep it <= {EXACT_LIMIT} and let permutation sampling "
                          f"cover larger n")
    if not args.target_se > 0:
        raise ConfigError(f"--target-se: {args.target_se:g}; use a standard error > 0 in utility units "
                          f"(e.g. 0.01 = one point of preference accuracy)")
    if args.max_permutations < 2:
        raise ConfigError(f"--max-permutations: {args.max_permutations}; a standard error needs >= 2 "
                          f"permutations, use --max-permutations >= 2")
    if args.min_permutations is None:       # default: 10, or all of them when fewer are allowed
        args.min_permutations = min(MIN_PERMUTATIONS, args.max_permutations)
    if args.min_permutations < 2:
        raise ConfigError(f"--min-permutations: {args.min_permutations}; a standard error needs >= 2 "
                          f"permutations, use --min-permutations >= 2")
    if args.min_permutations > args.max_permutations:
        raise ConfigError(f"--min-permutations: {args.min_permutations} > --max-permutations "
                          f"{args.max_permutations}; lower it or raise --max-permutations")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owners", type=int, nargs="+", default=[4, 6, 8, 10], metavar="N",
                    help="numbers of owners, each >= 2 and listed once (default: 4 6 8 10)")
    ap.add_argument("--exact-max", type=int, default=12,
                    help="exact retraining Shapley for n <= this; permutation sampling only above (default 12)")
    ap.add_argument("--target-se", type=float, default=0.01,
                    help="MC stops once its largest standard error over owners is <= this, in utility units "
                         "(default 0.01)")
    ap.add_argument("--max-permutations", type=int, default=100, help="MC permutations at most (default 100)")
    ap.add_argument("--min-permutations", type=int, default=None,
                    help=f"MC permutations before the SE target may stop it (>= 2; default "
                         f"{MIN_PERMUTATIONS}, or --max-permutations when lower)")
    ap.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                    help="print the fine-tunes of each method for each n and exit without training")
    ap.add_argument("--experiment", default="scale_tiny",
                    help="the preset whose model, trainer, task and game settings the games use")
    ap.add_argument("--game", choices=["union", "sequential"], default=None, help="default: the preset's")
    ap.add_argument("--per-owner", type=int, default=8, help="pairs per owner (default 8)")
    ap.add_argument("--epochs", type=float, default=None, help="default: the preset's train.epochs")
    ap.add_argument("--n-jobs", type=int, default=None, help="parallel workers (default: the preset's n_jobs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (default: CPU cores // n_jobs)")
    ap.add_argument("--seed", type=int, default=0, help="training, partition and permutation seed")
    ap.add_argument("--results", default=None, help="default: the preset's results_dir")
    ap.add_argument("--cache-dir", default=None,
                    help="keep each n's cache in <dir>/n<n> (resumes an interrupted run; wall seconds then "
                         "count only what was not cached, device seconds stay from scratch); default: a "
                         "temporary folder")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the preset, after -- "
                                                 "(e.g. -- model.n_embd=64 game=sequential)")
    def error(message: str):                     # one line, as every other refusal
        if "invalid" in message and "=" in message.rpartition(":")[2]:
            fail(f"arguments: {message}; put Hydra overrides after -- (python -m bench scaling --owners 4 -- "
                 f"model.n_embd=64)")
        fail(f"arguments: {message}; see python -m bench scaling --help")
    ap.error = error
    return ap


# ------------------------------------------------------------------ one n

def mc_to_target(game, n: int, rng, target_se: float, min_perm: int, max_perm: int):
    """Permutation sampling on ``game.utility`` until max_i SE_i <= target_se (after
    ``min_perm`` permutations) or ``max_perm``. The engine's callback sees the running
    mean after every permutation (``check_every=1``); each permutation's marginals are
    recovered from two consecutive means and their SE kept by Welford."""
    import numpy as np

    from bench.core.shapley import permutation_shapley
    state = {"prev": np.zeros(n), "k": 0, "mean": np.zeros(n), "m2": np.zeros(n), "hit": False}

    def reached(m: int, running: np.ndarray) -> bool:
        x = m * running - (m - 1) * state["prev"]          # this permutation's marginals
        state["prev"] = running.copy()
        state["k"] = k = state["k"] + 1
        d = x - state["mean"]
        state["mean"] = state["mean"] + d / k
        state["m2"] = state["m2"] + d * (x - state["mean"])
        if k >= max(min_perm, 2):
            se = np.sqrt(state["m2"] / (k - 1) / k)
            state["hit"] = bool(np.max(se) <= target_se)
        return state["hit"]

    res = permutation_shapley(game.utility, n, rng, max_permutations=max_perm, min_permutations=min_perm,
                              tol=None, callback=reached, check_every=1)
    return res, state["hit"]


def arithmetic_by_permutations(game, valuer, rng, n_perms: int):
    """DPO arithmetic beyond ARITH_EXACT_MAX: the n owner fine-tunes as the valuer makes
    them, then its coalition utilities sampled by permutation (no 2^n table)."""
    import numpy as np

    from bench.core.shapley import members, permutation_shapley
    from valuers.base import CostMeter
    from valuers.dpo_arithmetic import coalition_utilities
    meter = CostMeter(game)
    with meter.phase("owner_fine_tunes"):
        base_gap, margins = valuer.owner_margins(game)
    metric, n = valuer.metric or game.metric, game.n
    with meter.phase("arithmetic", own_compute=True):
        def utility(mask: int) -> float:
            w = np.zeros((1, n))
            w[0, list(members(mask, n))] = 1.0
            return float(coalition_utilities(base_gap, margins, w, game.train.beta)[metric][0])
        res = permutation_shapley(utility, n, rng, max_permutations=n_perms, tol=None)
    return res, meter.cost()


def run_one(n: int, args, task, spec, train, kind: str, metric: str, n_jobs: int, progress: bool,
            cache_root: Path) -> dict:
    import numpy as np

    from bench.core import metrics as M
    from bench.core.game import Game
    from bench.core.partition import make_partition
    from valuers.base import Budget, CostMeter
    from valuers.dpo_arithmetic import DPOArithmetic
    from valuers.retraining import RetrainShapley

    part = make_partition(task, "iid", n_owners=n, sizes=[args.per_owner] * n, seed=args.seed)
    cache = cache_root / f"n{n}"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():          # one base model for every n (the task is shared)
        (cache / "models").symlink_to(cache_root / "models", target_is_directory=True)
    game = Game(task, part, spec, train, kind=kind, seed=args.seed, metric=metric, cache_dir=cache,
                n_jobs=n_jobs, progress=progress)
    game.base()                                   # the base model and its evaluation, outside every timing
    game.record(0)

    # 1. MC first, on the empty cache: its wall seconds are its own
    with game.metered():
        meter = CostMeter(game)
        with meter.phase("fine_tune+score"):
            mc, hit = mc_to_target(game, n, np.random.default_rng([args.seed, n]), args.target_se,
                                   args.min_permutations, args.max_permutations)
        mc_cost = meter.cost()
    # 2. DPO arithmetic
    arith_valuer = DPOArithmetic()
    arith_se = None
    with game.metered():
        if n <= ARITH_EXACT_MAX:
            arith = arith_valuer.value(game, Budget())
            arith_values, arith_cost, arith_table = arith.owner_values, arith.cost, arith.table
        else:
            res, arith_cost = arithmetic_by_permutations(game, arith_valuer, np.random.default_rng([args.seed, n, 1]),
                                                         ARITH_PERMUTATIONS)
            arith_values, arith_table, arith_se = res.values, None, res.stderr
    # 3. exact retraining Shapley
    exact = None
    if n <= args.exact_max:
        with game.metered():
            exact = RetrainShapley().value(game, Budget())

    a, m = arith_cost, mc_cost
    row = {"n": n, "game": kind, "metric": metric, "seed": args.seed, "per_owner": args.per_owner,
           "epochs": train.epochs, "n_jobs": n_jobs, "exact_max": args.exact_max,
           "reference": "exact" if exact is not None else "mc",
           "fine_tunes_arith": a.fine_tunes, "device_s_arith": a.device_s, "wall_s_arith": a.wall_s,
           "arith_values": arith_values, "arith_method": "exact" if n <= ARITH_EXACT_MAX else
           f"permutations:{ARITH_PERMUTATIONS}", "arith_se_max": None if arith_se is None else float(np.max(arith_se)),
           "fine_tunes_mc": m.fine_tunes, "fine_tunes_mc_cached": m.fine_tunes_cached, "device_s_mc": m.device_s,
           "wall_s_mc": m.wall_s, "mc_permutations": mc.n_permutations, "mc_target_se": args.target_se,
           "mc_se_rule": "max over owners", "mc_reached_target": hit,
           "mc_se_max": float(np.max(mc.stderr)), "mc_se_mean": float(np.mean(mc.stderr)),
           "mc_values": mc.values, "mc_stderr": mc.stderr,
           "fidelity_arith_vs_mc": M.fidelity(arith_values, mc.values)}
    if exact is not None:
        e = exact.cost
        speedup = e.device_s / a.device_s
        target = 0.8 * (2 ** n - 1) / n
        err = np.abs(mc.values - exact.owner_values)
        table = np.asarray(exact.table)
        row.update({
            "fine_tunes_exact": e.fine_tunes, "device_s_exact": e.device_s, "wall_s_exact": e.wall_s,
            "exact_values": exact.owner_values, "total_gain": float(table[-1] - table[0]),
            "speedup": speedup, "target": target, "met": speedup >= target,
            "fidelity": M.fidelity(arith_values, exact.owner_values),
            "r2_utilities": M.r2(np.asarray(arith_table), table) if arith_table is not None else None,
            "mc_err_max": float(err.max()), "mc_err_rmse": float(np.sqrt(np.mean(err ** 2))),
            "mc_within_2se": float(np.mean(err <= 2 * mc.stderr)),
            "fidelity_mc": M.fidelity(mc.values, exact.owner_values),
            "speedup_mc": e.device_s / m.device_s if m.device_s > 0 else None})
    else:
        row.update({"fine_tunes_exact": None, "device_s_exact": None, "wall_s_exact": None,
                    "speedup_vs_mc": m.device_s / a.device_s if a.device_s > 0 else None})
    return row


# ------------------------------------------------------------------ the table

HEADER = (f"{'n':>3} {'exact FT':>8} {'exact s':>8} {'MC FT':>6} {'MC s':>7} {'MC wall':>7} {'perms':>6} "
          f"{'SE max':>7} {'SE mean':>7} {'MC err':>7} {'ρ MC':>5} {'arith FT':>8} {'arith s':>7} "
          f"{'speedup':>8} {'target':>7} {'met':>4} {'ρ arith':>7}")


def _f(x, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{width}{fmt}}"


def format_row(r: dict) -> str:
    exact = r["fine_tunes_exact"] is not None
    perms = f"{r['mc_permutations']}{'' if r['mc_reached_target'] else '*'}"
    rho_arith = (r["fidelity"] if exact else r["fidelity_arith_vs_mc"])["spearman"]
    speedup = r["speedup"] if exact else r["speedup_vs_mc"]
    return (f"{r['n']:>3} {_f(r['fine_tunes_exact'], ',', 8)} {_f(r['device_s_exact'], '.1f', 8)} "
            f"{r['fine_tunes_mc']:>6,} {r['device_s_mc']:>7.1f} {r['wall_s_mc']:>7.1f} {perms:>6} "
            f"{r['mc_se_max']:>7.4f} {r['mc_se_mean']:>7.4f} {_f(r.get('mc_err_max'), '.4f', 7)} "
            f"{_f(r['fidelity_mc']['spearman'] if exact else None, '.2f', 5)} "
            f"{r['fine_tunes_arith']:>8,} {r['device_s_arith']:>7.1f} {_f(speedup, '.1f', 8)} "
            f"{_f(r.get('target'), '.1f', 7)} {('yes' if r['met'] else 'NO') if exact else '-':>4} "
            f"{_f(rho_arith, '.2f', 7)}")


LEGEND = ("FT = fine-tunes used; s = device seconds (from-scratch train+eval of every coalition used); MC wall = "
          "MC's wall seconds; perms * = stopped at --max-permutations before max SE <= --target-se; SE = MC "
          "standard error over owners; MC err = max |MC - exact| over owners; ρ MC = Spearman(MC, exact); "
          "speedup = exact s (n > --exact-max: MC s) / arith s; target = 0.8(2^n - 1)/n; ρ arith = "
          "Spearman(arith, exact) (n > --exact-max: vs MC)")


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
    except ConfigError as e:
        fail(e)
    if args.plan:
        print(format_plan(plan(args.owners, args.exact_max, args.max_permutations), args))
        return 0

    import torch

    from bench.cli.run import compose
    from bench.core.env import quiet_libraries
    from bench.core.models import ModelSpec
    from bench.core.task import synthetic_pref
    from bench.core.train import TrainSettings
    from bench.harness.checks import check_config, task_settings
    from bench.tracking import ResultsStore, provenance, to_jsonable

    quiet_libraries()
    try:
        cfg = compose([f"experiment={args.experiment}", *args.overrides])
        if cfg is None:
            raise ConfigError(f"overrides: {args.overrides} are not key=value overrides; put Hydra overrides "
                              f"after -- (e.g. -- model.n_embd=64)")
        c, _ = check_config(cfg)
        if c["task"].get("kind") != "synthetic_pref":
            raise ConfigError(f"task.kind: {c['task'].get('kind')}; the scaling games generate their owners' "
                              f"pairs (task.kind=synthetic_pref)")
        task_kw = task_settings(c["task"]).to_dict()
        spec = ModelSpec.of(c["model"], prefix="model")
        train = TrainSettings.of({**c["train"], **({"epochs": args.epochs} if args.epochs else {})},
                                 prefix="train")
        store = ResultsStore(args.results or c["results_dir"])
        store.check_writable()
    except ConfigError as e:
        fail(e)
    kind, metric = args.game or c["game"]["kind"], c["game"]["metric"]
    n_jobs = args.n_jobs or int(c["n_jobs"])
    progress = bool(c["progress"])
    # one task for every n, sized for the largest: one base model
    task_kw["n_train_per_source"] = -(-max(args.owners) * args.per_owner // len(task_kw["sources"]))
    task = synthetic_pref(**task_kw)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // n_jobs))
    print(f"[dvbench] scaling: experiment={args.experiment} (model={spec.name}, epochs={train.epochs:g}), "
          f"{args.per_owner} pairs per owner, game={kind}, metric={metric}, n_jobs={n_jobs}, "
          f"target SE {args.target_se:g} (max over owners), exact for n <= {args.exact_max}", flush=True)
    print(HEADER, flush=True)
    rows = []
    t0 = time.perf_counter()
    try:
        with (nullcontext(args.cache_dir) if args.cache_dir else
              tempfile.TemporaryDirectory(prefix="dvbench-scaling-")) as root:
            root = Path(root)
            (root / "models").mkdir(parents=True, exist_ok=True)
            for n in args.owners:
                row = run_one(n, args, task, spec, train, kind, metric, n_jobs, progress, root)
                rows.append(row)
                print(format_row(row), flush=True)
                store.append(to_jsonable({"experiment": "scaling", "valuer": "dpo_arithmetic_vs_retrain",
                                          "status": "ok", "preset": args.experiment,
                                          **provenance({**vars(args), "train": train.key(), "model": spec.name}),
                                          **row}))
    except ConfigError as e:
        fail(e)
    finally:
        torch.set_num_threads(threads_before)
    print(LEGEND)
    print(f"[dvbench] scaling: n = {', '.join(map(str, args.owners))} in {time.perf_counter() - t0:.1f} s wall; "
          f"records appended to {store.path('scaling')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
