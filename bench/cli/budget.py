"""Fidelity at equal fine-tune budget: point-level permutation Shapley vs SHED
(and any valuer as a single point at its own cost).

Reads the newest records of one experiment from the results store:
``point_mc_shapley`` carries its running values after every permutation
(``extras.trajectory``), SHED its per-pass proxy values (``extras.per_pass_values``,
a running mean over passes = SHED at k' < k passes). At every budget each curve
is scored against the exact retraining Shapley of the record's game: owner-level
Spearman, and point-level noisy-example AUROC (the planted labels are rebuilt
here from the record's config; valuers never saw them).

    python -m bench budget --experiment quick_budget --out results/plots/budget_quick.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.analysis.budget import budget_table, format_budget
from bench.analysis.plots import plot_budget
from bench.core.errors import ConfigError, fail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench budget", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--results", default="results")
    ap.add_argument("--valuers", nargs="*", default=None, help="default: every valuer in the experiment")
    ap.add_argument("--out", default=None, help="plot path (default results/plots/budget_<experiment>.png)")
    args = ap.parse_args(argv)
    try:
        from bench.tracking import ResultsStore, latest
        recs = latest(ResultsStore(args.results).read(args.experiment))
        if args.valuers:
            recs = [r for r in recs if r["valuer"] in args.valuers]
        table = budget_table(recs)
    except ConfigError as e:
        fail(e)
    out = plot_budget(table, args.out or Path(args.results) / "plots" / f"budget_{args.experiment}.png",
                      f"{args.experiment}: fidelity at equal fine-tune budget")
    from bench.core.cache import atomic_write_bytes
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(table, indent=1).encode())
    print(format_budget(table))
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
