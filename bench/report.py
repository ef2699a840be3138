"""Tables (and a plot) of benchmark results, aggregated over seeds.

    python -m bench.report                          # every experiment in results/runs
    python -m bench.report --experiment smoke --markdown
    python -m bench.report --plot results/smoke.png

Rows are grouped by (experiment, game, valuer); for each seed only the newest
record counts. Cells show the mean over seeds ± the half-width of a 95 %
Student-t interval; failed runs are counted in the ``n`` column, not averaged.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from bench.errors import fail
from bench.tracking import ResultsStore, get_metric, latest

# (header, section, key, format, with CI)
COLUMNS = [
    ("fidelity ρ", "fidelity", "spearman", ".3f", True),
    ("pearson", "fidelity", "pearson", ".3f", True),
    ("rel-L2", "fidelity", "rel_l2", ".3f", True),
    ("ceiling ρ", "noise_ceiling", "spearman", ".3f", False),
    ("ceiling rel-L2", "noise_ceiling", "rel_l2", ".3f", False),
    ("R² v(S)", "utilities", "r2", ".3f", True),
    ("ceiling R²", "utilities", "r2_seed2", ".3f", False),
    ("detection AUROC", "detection", "auroc", ".3f", True),
    ("P@k", "detection", "precision_at_k", ".2f", False),
    ("point AUROC", "detection_points", "auroc", ".3f", False),
    ("LDS", "lds", "lds", ".3f", False),
    ("fine-tunes", "cost", "fine_tunes", ".0f", False),
    ("compute s", "cost", "device_s", ".1f", False),
    ("wall s", "cost", "wall_s", ".1f", False),
    ("GPU-h", "cost", "gpu_hours", ".3g", False),
]


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and Student-t CI half-width (NaN half-width for fewer than 2 values)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    from scipy import stats

    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, float(stats.t.ppf((1 + level) / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))


def _cell(values: list, spec: str, ci: bool) -> str:
    m, h = mean_ci(values)
    if math.isnan(m):
        return "—"
    return f"{m:{spec}} ± {h:{spec}}" if ci and not math.isnan(h) else f"{m:{spec}}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    cols = list(zip(headers, *rows)) if rows else [(h,) for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def summarize(records: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """{(experiment, game): {valuer: [newest record per seed]}}, sorted."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in latest(records):
        groups[(str(r.get("experiment")), str(r.get("game")))][str(r.get("valuer"))].append(r)
    return {k: dict(sorted(v.items())) for k, v in sorted(groups.items())}


BRIEF = ("fidelity ρ", "pearson", "rel-L2", "ceiling ρ", "ceiling rel-L2", "R² v(S)", "ceiling R²",
         "detection AUROC", "fine-tunes", "compute s")


def format_table(records: list[dict], markdown: bool = False, brief: bool = False) -> str:
    """One table per (experiment, game): a row per valuer, cells mean ± CI over seeds."""
    cols = [c for c in COLUMNS if not brief or c[0] in BRIEF]
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        rows = []
        for valuer, recs in by_valuer.items():
            ok = [r for r in recs if r.get("status", "ok") == "ok"]
            n = f"{len(ok)}/{len(recs)}" if len(ok) < len(recs) else str(len(ok))
            rows.append([valuer, n] + [_cell([get_metric(r, s, k) for r in ok], spec, ci)
                                       for _, s, k, spec, ci in cols])
        title = f"{exp} · game={game}"
        out.append((f"**{title}**\n\n" if markdown else f"{title}\n")
                   + render_table(["valuer", "n"] + [c[0] for c in cols], rows, markdown))
    return "\n\n".join(out)


def plot(records: list[dict], out: str | Path) -> Path:
    """Per valuer: fidelity ρ (± CI) with the noise ceiling, and fine-tunes (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summarize(records)
    fig, axes = plt.subplots(len(groups), 2, squeeze=False,
                             figsize=(11, 3.6 * len(groups)), constrained_layout=True)
    for (ax_f, ax_c), ((exp, game), by_valuer) in zip(axes, groups.items()):
        names = list(by_valuer)
        ok = [[r for r in by_valuer[v] if r.get("status", "ok") == "ok"] for v in names]
        stat = lambda s, k: [mean_ci([get_metric(r, s, k) for r in rs]) for rs in ok]  # noqa: E731
        rho, ceil, ft = stat("fidelity", "spearman"), stat("noise_ceiling", "spearman"), \
            stat("cost", "fine_tunes")
        x = range(len(names))
        ax_f.bar(x, [m for m, _ in rho], yerr=[0 if math.isnan(h) else h for _, h in rho],
                 color="tab:blue", capsize=3)
        for i, (c, _) in enumerate(ceil):
            if not math.isnan(c):
                ax_f.hlines(c, i - 0.4, i + 0.4, colors="k", linestyles="--",
                            label="noise ceiling" if i == 0 else None)
        ax_f.set(title=f"{exp} · {game}: fidelity", ylabel="Spearman ρ vs exact Shapley",
                 ylim=(min([-0.05] + [m - 0.05 for m, _ in rho if not math.isnan(m)]), 1.05))
        bars = ax_c.bar(x, [0 if math.isnan(m) else m for m, _ in ft], color="tab:orange")
        ax_c.bar_label(bars, fmt="%.0f")
        ax_c.set_yscale("symlog", linthresh=1)
        ax_c.set(title=f"{exp} · {game}: cost", ylabel="fine-tunes (log)")
        for ax in (ax_f, ax_c):
            ax.set_xticks(list(x), names, rotation=30, ha="right")
        if any(not math.isnan(c) for c, _ in ceil):
            ax_f.legend(loc="lower right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", metavar="DIR",
                    help="results folder holding runs/*.jsonl (default: results)")
    ap.add_argument("--experiment", metavar="NAME", help="only this experiment")
    ap.add_argument("--commit", metavar="SHA", help="only records of this commit (prefix ok)")
    ap.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    ap.add_argument("--brief", action="store_true", help="the main columns only (the README's tables)")
    ap.add_argument("--plot", metavar="OUT.png", help="also write a PNG of fidelity and cost")
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
    print(format_table(records, markdown=args.markdown, brief=args.brief))
    if args.plot:
        print(f"wrote {plot(records, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
