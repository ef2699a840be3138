"""Tables (and a plot) of benchmark results, aggregated over seeds.

    python -m bench report                          # every experiment in results/runs
    python -m bench report --experiment smoke --markdown
    python -m bench report --plot results/smoke.png
    python -m bench report --out results/report.md     # tables + plots (make report)
    python -m bench report --results results/published --readme README.md   # the README's results

Rows are grouped by (experiment, game, valuer); for each seed only the newest
record counts. Cells show the mean over seeds ± the half-width of a 95 %
Student-t interval; failed runs are counted in the ``n`` column, not averaged.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bench.analysis.plots import plot_fidelity_cost
from bench.analysis.report import write_report
from bench.analysis.tables import format_table, summarize
from bench.analysis.verdicts import format_leaderboard
from bench.core.errors import fail
from bench.tracking import ResultsStore


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", metavar="DIR",
                    help="results folder holding runs/*.jsonl (default: results)")
    ap.add_argument("--experiment", metavar="NAME", help="only this experiment")
    ap.add_argument("--commit", metavar="SHA", help="only records of this commit (prefix ok)")
    ap.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    ap.add_argument("--brief", action="store_true", help="the main columns only (the README's tables)")
    ap.add_argument("--plot", metavar="OUT.png", help="also write a PNG of fidelity and cost")
    ap.add_argument("--out", metavar="REPORT.md",
                    help="write a markdown report with tables and PNG plots (frontier, owner values, "
                         "detection ROC, selection curves) in a folder next to it, e.g. results/report.md")
    ap.add_argument("--readme", metavar="FILE.md", nargs="+",
                    help="rewrite the generated blocks of these files (each block where its marker lines are) from the records (leaderboards, LDS, "
                         "consensus) and from the saved profiles in <results>/profile/*.json (the fine-tune cost "
                         "table); make report: from results/published")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="with --readme: publish records made from a dirty tree (marked †); refused by default, "
                         "as no commit reproduces them")
    args = ap.parse_args(argv)

    store = ResultsStore(args.results)
    records = store.read(args.experiment)
    if args.commit:
        records = [r for r in records if str(r.get("commit", "")).startswith(args.commit)]
    if not records:
        what = f" for experiment {args.experiment!r}" if args.experiment else ""
        what += f" at commit {args.commit}" if args.commit else ""
        fail(f"no results in {store.runs}{what}; run `python -m bench experiment=<name>` "
             "or pass --results DIR")
    if args.readme:
        from pathlib import Path

        from bench.analysis.report import read_profiles, read_truths, update_readme
        path = update_readme(args.readme, records, allow_dirty=args.allow_dirty, jobs=store.read_jobs(),
                             profiles=read_profiles(Path(args.results) / "profile"),
                             truths=read_truths(Path(args.results) / "truth"))
        print(f"wrote {', '.join(map(str, path))}", file=sys.stderr)
        return 0
    print(format_leaderboard(records, markdown=args.markdown))
    print()
    print(format_table(records, markdown=args.markdown, brief=args.brief))
    if args.out:
        print(f"wrote {write_report(records, args.out)}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_fidelity_cost(summarize(records), args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
