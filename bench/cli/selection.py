"""``python -m bench selection``: one valuation's data-selection curve outside a job.

Builds the game with Hydra compose, values it (SHED by default), fine-tunes QOCS /
QWCS / random / all subsets per size and seed (``bench/core/selection.py`` says how),
plots the curve and writes a JSON next to the plot:

    python -m bench selection --experiment quick --seeds 0 1 2 \\
        --out results/plots/selection_quick.png results_dir=/tmp/r n_jobs=2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.core.errors import ConfigError
from bench.analysis.plots import plot_selection
from bench.core.selection import METHODS, curve_for_valuation, format_curve


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench selection", description=__doc__.split("\n\n")[0])
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

    from bench.core.errors import fail
    from bench.core.env import quiet_libraries
    quiet_libraries()
    try:
        from omegaconf import OmegaConf

        from bench.harness.build import build_game, build_task, build_valuer, compose_config
        from bench.harness.job import selection_clusters
        from valuers.base import Budget
        cfg = compose_config([f"experiment={args.experiment}", *args.overrides])
        task = build_task(cfg)
        game, _ = build_game(cfg, task)
        all_args = OmegaConf.to_container(cfg.valuer, resolve=True) or {}
        valuer, vcfg = build_valuer(args.valuer, all_args.get(args.valuer))
        val = valuer.value(game, Budget(**OmegaConf.to_container(cfg.budget)))
        if not task.test:
            print("[dvbench] no test split (task.n_test_per_source / task.test_path): subsets are judged on "
                  "the eval set the valuer used", file=sys.stderr)
        shed = build_valuer("shed", all_args.get("shed"))[0] if val.clusters is None else None
        clusters = selection_clusters(game, val, shed)
        curve = curve_for_valuation(game, val, task.test, clusters, sizes=args.sizes,
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
    from bench.core.cache import atomic_write_bytes
    from bench.tracking import to_jsonable
    atomic_write_bytes(jpath, json.dumps(to_jsonable(curve), indent=1).encode())
    print(format_curve(curve))
    print(f"plot: {out}\njson: {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
