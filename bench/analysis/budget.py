"""Fidelity at equal fine-tune budget from recorded runs (the program: ``bench/cli/budget.py``;
the plot: ``bench.analysis.plots.plot_budget``)."""
from __future__ import annotations

import numpy as np

from bench.core import metrics as M
from bench.core.errors import ConfigError
from bench.tracking.schema import corrupted_mask, reference_values


def curve_points(record: dict, bad: np.ndarray | None) -> list[dict]:
    """(fine-tunes, owner ρ, point AUROC) along a record's anytime trajectory."""
    exact = np.asarray(reference_values(record), float)
    gain = float(record["utility_table"][-1] - record["utility_table"][0])
    trajectory = (record.get("valuation") or {}).get("trajectory") or []
    steps = []
    if trajectory:                                           # sampling methods: values by fine-tunes spent
        steps = [(t["fine_tunes"], np.asarray(t["owner_values"]),
                  None if t.get("point_values") is None else np.asarray(t["point_values"])) for t in trajectory]
    elif record.get("owner_values"):                        # any other valuer: one point at its cost
        pv = record.get("point_values")
        steps = [(record["cost"]["fine_tunes"], np.asarray(record["owner_values"]),
                  None if pv is None else np.asarray(pv))]
    out = []
    for ft, ov, pv in steps:
        fid = M.fidelity(ov, exact, gain)
        auroc = None if pv is None or bad is None or not bad.any() else M.detection(pv, bad)["auroc"]
        out.append({"fine_tunes": int(ft), "spearman": fid["spearman"], "rel_l2": fid["rel_l2"],
                    "point_auroc": auroc})
    return out


def budget_table(records: list[dict]) -> dict:
    if not records:
        raise ConfigError("--experiment: no records; run it first (see the module docstring)")
    bad = corrupted_mask(records[0])       # None for a v1 record: no point-level AUROC
    ceiling = ((records[0].get("metrics") or {}).get("one_seed_exact") or {}).get("spearman")
    curves = {r["valuer"]: curve_points(r, bad) for r in records if r["status"] == "ok"}
    if "retrain_shapley" not in curves:      # the owner-level reference itself: 2^n - 1 fine-tunes, rho 1
        n = len(records[0]["exact_values"])
        curves["retrain_shapley"] = [{"fine_tunes": 2 ** n - 1, "spearman": 1.0, "rel_l2": 0.0, "point_auroc": None}]
    return {"one_seed_exact_spearman": ceiling, "n_examples": int(sum(records[0]["owner_sizes"])),
            "n_corrupted": None if bad is None else int(bad.sum()),
            "curves": curves}


def format_budget(table: dict) -> str:
    lines = [f"{table['n_examples']} examples ({table['n_corrupted']} corrupted); "
             f"one-seed exact ρ {table['one_seed_exact_spearman']:.3f}",
             f"{'valuer':18s} {'fine-tunes':>10s} {'owner ρ':>8s} {'point AUROC':>11s}"]
    f = lambda x: "—" if x is None else f"{x:.3f}"   # noqa: E731
    for name, pts in table["curves"].items():
        for p in pts:
            lines.append(f"{name:18s} {p['fine_tunes']:>10d} {f(p['spearman']):>8s} {f(p['point_auroc']):>11s}")
    return "\n".join(lines)
