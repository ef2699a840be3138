"""``python -m bench compact``: rewrite a results folder's record files so that the fields a
job repeats in every record (its config, consensus and LDS targets, each seed's utility
table) are stored once, as content-addressed JSON files under ``<results>/shared/``.

Jobs have written records this way since the store learned it; this converts files written
before (the published records, to keep them small enough for git). Reading gives the same
records before and after. Do not run it while a job appends to the same folder.

    python -m bench compact --results results/published
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compact", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", default="results", metavar="DIR", help="results folder holding runs/*.jsonl")
    ap.add_argument("--experiment", metavar="NAME", help="only this experiment's file")
    args = ap.parse_args(argv)
    from bench.core.errors import fail
    from bench.tracking import ResultsStore
    store = ResultsStore(args.results)
    names = [args.experiment] if args.experiment else store.experiments()
    missing = [n for n in names if not store.path(n).is_file()]
    if not names or missing:
        fail(f"--results: no records file {store.path(missing[0]) if missing else store.runs / '*.jsonl'}; "
             f"pass the folder that holds runs/<experiment>.jsonl")
    for name in names:
        before, after = store.compact(name)
        print(f"{store.path(name)}: {before / 2**20:.2f} MB -> {after / 2**20:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
