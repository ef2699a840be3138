"""Regression check: a commit's latest results against a baseline.

    python -m bench compare                         # HEAD vs results/baselines/<experiment>.jsonl, else
                                                    # this hardware's baseline (make bench's <slug>.jsonl)
    python -m bench compare --baseline 1a2b3c4      # HEAD vs another commit's records in results/runs
    python -m bench compare --baseline old.jsonl    # HEAD vs any JSONL file of records
    python -m bench compare --write-baseline        # freeze HEAD's latest records as the baseline

Rows are (experiment, valuer, game); per seed the newest record counts, and
metrics are averaged over the seeds both sides share. Exit status: 0 = no
regression, 1 = a quality metric got worse than --tolerance (Spearman,
Pearson or AUROC fell, rel-L2 rose), a valuer that worked now fails, or (with
--cost-tolerance) a cost ratio grew past 1 + tolerance; 2 = missing results.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from bench.analysis.compare import COST, QUALITY, _of_commit, compare_rows, resolve_commit, write_baseline
from bench.analysis.tables import render_table
from bench.core.errors import fail
from bench.tracking import ResultsStore, git_info, latest, read_jsonl


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", metavar="DIR",
                    help="results folder holding runs/ and baselines/ (default: results)")
    ap.add_argument("--experiment", metavar="NAME", help="only this experiment (default: all "
                    "experiments the commit has records for)")
    ap.add_argument("--commit", metavar="REF", help="the new side (default: current HEAD)")
    ap.add_argument("--baseline", metavar="FILE_OR_COMMIT", help="a JSONL file of records, or a "
                    "commit whose records in runs/ are the old side (default: "
                    "<results>/baselines/<experiment>.jsonl)")
    ap.add_argument("--baselines-dir", metavar="DIR",
                    help="where committed baselines live (default: <results>/baselines)")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="allowed drop of ρ/pearson/AUROC and rise of rel-L2 (default: 0.05)")
    ap.add_argument("--cost-tolerance", type=float, metavar="FRAC",
                    help="also fail if wall time or fine-tunes grow by more than this fraction "
                         "(e.g. 0.5 = 1.5×); by default costs are only reported")
    ap.add_argument("--write-baseline", action="store_true",
                    help="write the commit's latest ok records to the baselines dir and exit")
    args = ap.parse_args(argv)

    store = ResultsStore(args.results)
    base_dir = Path(args.baselines_dir) if args.baselines_dir else store.root / "baselines"
    records = store.read(args.experiment)
    if not records:
        what = f" for experiment {args.experiment!r}" if args.experiment else ""
        fail(f"no results in {store.runs}{what}; run `python -m bench experiment=<name>` "
             "or pass --results DIR")
    head = git_info()
    commit = resolve_commit(args.commit) if args.commit else head["commit"]
    new = _of_commit(records, commit)
    if not new:
        fail(f"no records of commit {commit[:12]} in {store.runs}; run the benchmark at this "
             "commit or pass --commit <sha>")
    experiments = sorted({str(r.get("experiment")) for r in new})

    if args.write_baseline:
        for exp in experiments:
            recs = latest(r for r in new if r.get("experiment") == exp)
            n = write_baseline(recs, base_dir / f"{exp}.jsonl")
            dirty = " (from a dirty tree)" if any(r.get("dirty") for r in recs) else ""
            print(f"wrote {n} records of {commit[:12]}{dirty} to {base_dir / f'{exp}.jsonl'}")
        return 0

    old_commit = None
    if args.baseline and not Path(args.baseline).is_file():
        if args.baseline.endswith(".jsonl") or os.sep in args.baseline:
            fail(f"--baseline: file {args.baseline} not found; pass an existing file or a commit")
        old_commit = resolve_commit(args.baseline)

    headers = ["valuer", "game", "seeds"] + [q[0] for q in QUALITY] + [c[0] for c in COST] \
        + ["verdict"]
    any_regressed, compared = False, 0
    for exp in experiments:
        if old_commit:
            old, src = _of_commit(store.read(exp), old_commit), f"commit {old_commit[:12]}"
        else:
            old, src = _baseline(exp, Path(args.baseline) if args.baseline else None, base_dir)
        if not old:
            print(f"{exp}: no baseline records in {src}; create one with --write-baseline "
                  f"(or, after make bench, commit its candidate as this hardware's baseline)", file=sys.stderr)
            continue
        new_exp = [r for r in new if r.get("experiment") == exp]
        hw_of = lambda r: (r.get("hardware") or {}).get("id")  # noqa: E731
        same_hw = [r for r in old if hw_of(r) in {hw_of(x) for x in new_exp}]
        old = same_hw or old          # like for like when the baseline has this hardware
        rows, regressed = compare_rows(new_exp, old, args.tolerance, args.cost_tolerance)
        hw_new = {(r.get("hardware") or {}).get("id") for r in new_exp}
        hw_old = {(r.get("hardware") or {}).get("id") for r in old}
        print(f"{exp}: {commit[:12]}{' (dirty)' if head['dirty'] and commit == head['commit'] else ''}"
              f" vs {src}  (tolerance {args.tolerance})")
        if hw_new != hw_old:
            print(f"  note: hardware differs ({', '.join(map(str, sorted(hw_new, key=str)))} vs "
                  f"{', '.join(map(str, sorted(hw_old, key=str)))}); cost ratios are not like for like")
        print(render_table(headers, rows) + "\n")
        compared += 1
        any_regressed |= regressed
    if not compared:
        fail("nothing to compare: no baseline records for "
             + ", ".join(experiments) + "; create one with --write-baseline or pass --baseline")
    print("REGRESSION" if any_regressed else "no regression beyond tolerance")
    return 1 if any_regressed else 0


def _baseline(exp: str, given: Path | None, base_dir: Path) -> tuple[list[dict], str]:
    """(records of ``exp``, where they came from): the file given, or the experiment's
    baseline ``<exp>.jsonl``, or else this machine's hardware baseline ``<slug>.jsonl`` (what
    ``make bench`` compares with); nothing found: ([], the files looked in)."""
    if given is not None:
        files = [given]
    else:
        from bench.tracking.system import hardware_fingerprint
        files = [base_dir / f"{exp}.jsonl", base_dir / f"{hardware_fingerprint(devices=True)['slug']}.jsonl"]
    for f in files:
        old = [r for r in read_jsonl(f) if r.get("experiment") == exp] if f.is_file() else []
        if old:
            return old, str(f)
    return [], " or ".join(map(str, files))


if __name__ == "__main__":
    sys.exit(main())
