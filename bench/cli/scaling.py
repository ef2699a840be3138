"""Cost of DPO-arithmetic Shapley vs exact retraining Shapley as n grows, in one run.

    python -m bench scaling --owners 4 6 8 --game union

For each n: a tiny-tier game with n iid owners (fresh cache), the arithmetic
valuer (n fine-tunes + arithmetic) and exact retraining Shapley (2^n − 1
fine-tunes) on the same game. Reports fine-tunes, from-scratch compute seconds
(``device_s``: the recorded train+eval seconds of every utility used, so the
singletons the two share are charged to both), the speedup and the target
0.8·(2^n − 1)/n, plus fidelity of the arithmetic values. Writes a JSON line per
n to ``<results>/runs/scaling.jsonl``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owners", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--game", choices=["union", "sequential"], default="union")
    ap.add_argument("--per-owner", type=int, default=15, help="examples per owner")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="results")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from bench.core import metrics as M
    from bench.core.game import Game
    from bench.core.models import ModelSpec
    from bench.core.partition import make_partition
    from bench.core.task import synthetic_pref
    from bench.tracking import ResultsStore, provenance, to_jsonable
    from bench.core.env import quiet_libraries
    from bench.core.train import TrainSettings
    from valuers.base import Budget
    from valuers.dpo_arithmetic import DPOArithmetic
    from valuers.retraining import RetrainShapley

    quiet_libraries()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.n_jobs))
    store = ResultsStore(args.results)
    store.check_writable()
    sources = ["arithmetic", "capitals", "tone", "reversal"]
    header = f"{'n':>3} {'fits arith':>10} {'fits exact':>10} {'arith s':>8} {'exact s':>8} {'speedup':>8} " \
             f"{'target':>7} {'met':>4} {'ρ':>6} {'rel-L2':>7} {'R² v(S)':>8}"
    print(header)
    rows = []
    for n in args.owners:
        n_pool = n * args.per_owner
        task = synthetic_pref(sources=sources, n_train_per_source=-(-n_pool // len(sources)),
                              n_eval_per_source=30, n_warmup_per_source=150, arith_max=9, seed=0)
        part = make_partition(task, "iid", n_owners=n, sizes=[args.per_owner] * n, seed=args.seed)
        with tempfile.TemporaryDirectory(prefix="dvbench-scaling-") as cache:
            game = Game(task, part, ModelSpec(), TrainSettings(lora_r=None, lr=1e-3, epochs=args.epochs),
                        kind=args.game, seed=args.seed, cache_dir=cache, n_jobs=args.n_jobs, progress=True)
            game.base()   # build the base model outside both timings
            game.record(0)
            game.log.entries.clear()
            arith = DPOArithmetic().value(game, Budget())
            game.log.entries.clear()
            exact = RetrainShapley().value(game, Budget())
        a, e = arith.cost, exact.cost
        speedup = e.device_s / a.device_s
        target = 0.8 * (2 ** n - 1) / n
        fid = M.fidelity(arith.owner_values, exact.owner_values)
        r2 = M.r2(np.array(arith.extras["table"]), np.array(exact.extras["table"]))
        row = {"n": n, "game": args.game, "fine_tunes_arith": a.fine_tunes, "fine_tunes_exact": e.fine_tunes,
               "device_s_arith": a.device_s, "device_s_exact": e.device_s, "wall_s_arith": a.wall_s,
               "wall_s_exact": e.wall_s, "speedup": speedup, "target": target, "met": speedup >= target,
               "fidelity": fid, "r2_utilities": r2}
        rows.append(row)
        print(f"{n:>3} {a.fine_tunes:>10} {e.fine_tunes:>10} {a.device_s:>8.1f} {e.device_s:>8.1f} "
              f"{speedup:>8.1f} {target:>7.1f} {'yes' if row['met'] else 'NO':>4} {fid['spearman']:>6.2f} "
              f"{fid['rel_l2']:>7.2f} {r2:>8.2f}", flush=True)
        store.append(to_jsonable({"experiment": "scaling", "valuer": "dpo_arithmetic_vs_retrain",
                                  "status": "ok", **provenance(vars(args)), **row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
