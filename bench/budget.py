"""Fidelity at equal fine-tune budget: point-level permutation Shapley vs SHED
(and any valuer as a single point at its own cost).

Reads the newest records of one experiment from the results store:
``point_mc_shapley`` carries its running values after every permutation
(``extras.trajectory``), SHED its per-pass proxy values (``extras.per_pass_values``,
a running mean over passes = SHED at k' < k passes). At every budget each curve
is scored against the exact retraining Shapley of the record's game: owner-level
Spearman, and point-level noisy-example AUROC (the planted labels are rebuilt
here from the record's config; valuers never saw them).

    python -m bench.budget --experiment quick_budget --out results/plots/budget_quick.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench import metrics as M
from bench.errors import ConfigError, fail
from valuers.base import owner_sums


def corrupted_mask(record: dict) -> np.ndarray:
    """Which training examples (in owner order) the partition corrupted."""
    from omegaconf import OmegaConf

    from bench.partition import make_partition
    from bench.run import _kwargs, build_task
    cfg = OmegaConf.create(record["config"])
    part = make_partition(build_task(cfg), **_kwargs(cfg.partition, drop=()))
    ids = [p.id for o in part.owners for p in o]
    return np.isin(ids, part.truth.corrupted_ids)


def curve_points(record: dict, bad: np.ndarray) -> list[dict]:
    """(fine-tunes, owner ρ, point AUROC) along a record's anytime trajectory."""
    truth = np.asarray(record["truth_values"], float)
    gain = float(record["utility_table"][-1] - record["utility_table"][0])
    ex = record.get("extras") or {}
    steps = []
    if "trajectory" in ex:                                   # point-level permutation Shapley
        steps = [(t["fine_tunes"], np.asarray(t["owner_values"]), np.asarray(t["point_values"]))
                 for t in ex["trajectory"]]
    elif "per_pass_values" in ex:                            # SHED: running mean over passes
        per_pass = np.asarray(ex["per_pass_values"], float)  # [k, C]
        labels = np.asarray(ex["clusters"], int)
        # a pass removes ceil(C/g) groups: all proxies (shared by every pass), then one
        # fine-tune per removal except the last (the empty set = the base model)
        per_pass_cost = len(ex["per_pass_groups"][0]) - 1
        for j in range(1, len(per_pass) + 1):
            phi = per_pass[:j].mean(0)
            pv = phi[labels]
            steps.append((1 + j * per_pass_cost, owner_sums(pv, record["owner_sizes"]), pv))
    elif record.get("owner_values"):                        # any other valuer: one point at its cost
        pv = record.get("point_values")
        steps = [(record["cost"]["fine_tunes"], np.asarray(record["owner_values"]),
                  None if pv is None else np.asarray(pv))]
    out = []
    for ft, ov, pv in steps:
        fid = M.fidelity(ov, truth, gain)
        out.append({"fine_tunes": int(ft), "spearman": fid["spearman"], "rel_l2": fid["rel_l2"],
                    "point_auroc": None if pv is None or not bad.any() else M.detection(pv, bad)["auroc"]})
    return out


def budget_table(records: list[dict]) -> dict:
    if not records:
        raise ConfigError("--experiment: no records; run it first (see the module docstring)")
    bad = corrupted_mask(records[0])
    ceiling = M.fidelity(records[0]["truth_values_seed2"], records[0]["truth_values"])["spearman"]
    curves = {r["valuer"]: curve_points(r, bad) for r in records if r["status"] == "ok"}
    if "retrain_shapley" not in curves:      # the owner-level truth itself: 2^n - 1 fine-tunes, rho 1
        n = len(records[0]["truth_values"])
        curves["retrain_shapley"] = [{"fine_tunes": 2 ** n - 1, "spearman": 1.0, "rel_l2": 0.0, "point_auroc": None}]
    return {"noise_ceiling_spearman": ceiling, "n_examples": int(len(bad)), "n_corrupted": int(bad.sum()),
            "curves": curves}


def plot_budget(table: dict, out: str | Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in table["curves"].items():
        x = [max(p["fine_tunes"], 1) for p in pts]
        style = "o-" if len(pts) > 1 else "s"
        axes[0].plot(x, [np.nan if p["spearman"] is None else p["spearman"] for p in pts], style, label=name)
        if any(p["point_auroc"] is not None for p in pts):
            axes[1].plot(x, [np.nan if p["point_auroc"] is None else p["point_auroc"] for p in pts], style,
                         label=name)
    axes[0].axhline(table["noise_ceiling_spearman"], color="k", ls=":", lw=1, label="noise ceiling")
    axes[1].axhline(0.5, color="k", ls=":", lw=1, label="chance")
    for ax, yl in zip(axes, ("owner Spearman vs exact retraining Shapley", "noisy-example AUROC")):
        ax.set_xscale("log")
        ax.set_xlabel("fine-tunes spent")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_budget(table: dict) -> str:
    lines = [f"{table['n_examples']} examples ({table['n_corrupted']} corrupted); "
             f"noise ceiling ρ {table['noise_ceiling_spearman']:.3f}",
             f"{'valuer':18s} {'fine-tunes':>10s} {'owner ρ':>8s} {'point AUROC':>11s}"]
    f = lambda x: "—" if x is None else f"{x:.3f}"   # noqa: E731
    for name, pts in table["curves"].items():
        for p in pts:
            lines.append(f"{name:18s} {p['fine_tunes']:>10d} {f(p['spearman']):>8s} {f(p['point_auroc']):>11s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.split("\n\n")[0])
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
    from bench.cache import atomic_write_bytes
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(table, indent=1).encode())
    print(format_budget(table))
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
