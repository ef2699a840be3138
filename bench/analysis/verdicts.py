"""The leaderboard: which valuers a preset can tell apart, with what confidence.

Per (experiment, game) and per valuer, over the job's seeds (each seed's valuation
scored against the consensus of the other seeds):

- fidelity (Spearman ρ to the held-out consensus): mean and 95% t-interval;
- ``vs random``: the paired per-seed difference with ``random`` (same seeds, same
  games), its interval, and a mark: ``+`` better (the interval excludes 0 above),
  ``−`` worse, ``~`` not shown either way;
- ``vs best``: the same against the valuer with the highest mean fidelity;
- ``ceiling``: the same against the noise ceiling (that seed's exact retraining
  Shapley scored the same way); ``~`` or ``+`` = within the ceiling;
- detection by noise level (Kendall τ between −value and each owner's corrupted
  share), the per-pair LDS and its ratio to its ceiling, fine-tunes and compute.

Rows are sorted by mean fidelity. The table is a reading aid, not a test: with S
seeds the intervals have S − 1 degrees of freedom, and nothing here picks settings.
"""
from __future__ import annotations

import math

import numpy as np

from bench.analysis.stats import ok
from bench.analysis.tables import render_table, summarize
from bench.core.metrics import mean_ci
from bench.core.uncertainty import Paired, bootstrap_ci, paired_ci
from bench.tracking.store import get_metric


def by_seed(records: list[dict], section: str, key: str) -> dict[int, float | None]:
    return {int(r["seed"]): get_metric(r, section, key) for r in ok(records)}


def paired(a: list[dict], b: list[dict], section: str = "fidelity", key: str = "spearman",
           b_section: str | None = None) -> Paired:
    """Per-seed difference of a metric between two valuers' records (seeds both have)."""
    xa, xb = by_seed(a, section, key), by_seed(b, b_section or section, key)
    seeds = sorted(set(xa) & set(xb))
    return paired_ci([xa[s] for s in seeds], [xb[s] for s in seeds])


def pair_lds_cell(records: list[dict], section: str = "lds_pair") -> dict | None:
    """The per-pair LDS of a valuer over its seeds: per eval pair, the mean over seeds
    of its LDS; then the mean over pairs with a bootstrap interval over pairs, and the
    ceiling (the same for every seed: the targets are shared)."""
    rows = [(r.get("metrics") or {}).get(section) for r in ok(records)]
    rows = [x for x in rows if x and x.get("per_pair")]
    if not rows:
        return None
    per_pair = np.nanmean(np.array([x["per_pair"] for x in rows], float), axis=0)
    m, lo, hi = bootstrap_ci(per_pair)
    ceiling = rows[0].get("ceiling")
    ratio = m / ceiling if ceiling and ceiling > 0 else float("nan")
    return {"lds": m, "lo": lo, "hi": hi, "ceiling": ceiling, "ratio": ratio, "n_seeds": len(rows)}


def _ci(m: float, lo: float, hi: float, spec: str = ".2f", bound: float | None = None) -> str:
    """``m [lo, hi]``; ``bound``: clip the interval to [−bound, bound] (a correlation's
    range, which a t-interval over 3 seeds can pass)."""
    if math.isnan(m):
        return "—"
    if bound is not None and not math.isnan(lo):
        lo, hi = max(lo, -bound), min(hi, bound)
    return f"{m:{spec}}" if math.isnan(lo) else f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _diff(p: Paired | None) -> str:
    if p is None or p.n == 0 or math.isnan(p.mean):
        return "—"
    if p.n < 2 or math.isnan(p.lo):
        return f"{p.mean:+.2f}"
    return f"{p.sign} {p.mean:+.2f} [{p.lo:+.2f}, {p.hi:+.2f}]"


def leaderboard_rows(by_valuer: dict[str, list[dict]]) -> list[dict]:
    """One dict per valuer with its fidelity, paired comparisons and the rest, sorted by
    mean fidelity (best first; valuers without a fidelity last)."""
    fid = {v: mean_ci([get_metric(r, "fidelity", "spearman") for r in ok(rs)]) for v, rs in by_valuer.items()}
    ranked = sorted(by_valuer, key=lambda v: (-fid[v][0] if not math.isnan(fid[v][0]) else math.inf, v))
    best = next((v for v in ranked if v != "retrain_shapley" and not math.isnan(fid[v][0])), None)
    rows = []
    for v in ranked:
        rs = by_valuer[v]
        good = ok(rs)
        rows.append({
            "valuer": v, "n": len(good), "of": len(rs), "fidelity": fid[v],
            "vs_random": paired(rs, by_valuer["random"]) if "random" in by_valuer and v != "random" else None,
            "vs_best": paired(rs, by_valuer[best]) if best and v != best else None,
            "vs_ceiling": paired(rs, rs, "fidelity", "spearman", b_section="noise_ceiling"),
            "tau": mean_ci([get_metric(r, "detection_graded", "kendall_tau") for r in good]),
            "pair_lds": pair_lds_cell(rs),
            "fine_tunes": mean_ci([get_metric(r, "cost", "fine_tunes") for r in good])[0],
            "compute_s": mean_ci([get_metric(r, "cost", "device_s") for r in good])[0],
            "best": v == best,
        })
    return rows


HEADERS = ["valuer", "seeds", "fidelity ρ [95% CI]", "vs random", "vs best", "vs ceiling", "noise τ",
           "pair LDS / ceiling", "fine-tunes", "compute s"]


def format_leaderboard(records: list[dict], markdown: bool = False) -> str:
    """The leaderboard of every (experiment, game) in ``records`` (see the module docstring)."""
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        rows = leaderboard_rows(by_valuer)
        per_seed = {s: c for rs in by_valuer.values() for s, c in by_seed(rs, "noise_ceiling", "spearman").items()}
        ceiling = mean_ci(list(per_seed.values()))      # one value per seed (the same for every valuer)
        seeds = sorted({int(r["seed"]) for rs in by_valuer.values() for r in ok(rs)})
        cells = []
        for row in rows:
            lds = row["pair_lds"]
            lds_s = "—" if lds is None else (f"{_ci(lds['lds'], lds['lo'], lds['hi'])} / {lds['ceiling']:.2f}"
                                             if lds["ceiling"] is not None else _ci(lds["lds"], lds["lo"], lds["hi"]))
            n = str(row["n"]) if row["n"] == row["of"] else f"{row['n']}/{row['of']}"
            cells.append([row["valuer"] + (" (best)" if row["best"] else ""), n, _ci(*row["fidelity"], bound=1),
                          _diff(row["vs_random"]), _diff(row["vs_best"]), _diff(row["vs_ceiling"]),
                          _ci(*row["tau"], bound=1), lds_s,
                          "—" if math.isnan(row["fine_tunes"]) else f"{row['fine_tunes']:.0f}",
                          "—" if math.isnan(row["compute_s"]) else f"{row['compute_s']:.1f}"])
        head = (f"{exp} · game={game} · seeds {seeds} · noise ceiling ρ {_ci(*ceiling, bound=1)} · marks: + / − "
                f"the paired 95% interval over seeds excludes 0, ~ it does not; intervals of ρ and τ clipped to "
                f"[−1, 1]")
        out.append((f"**{head}**\n\n" if markdown else f"{head}\n") + render_table(HEADERS, cells, markdown))
    return "\n\n".join(out)


LDS_HEADERS = ["valuer", "seeds", "pair LDS (margin) [95% CI]", "ceiling", "LDS / ceiling", "pair LDS (log σ)",
               "ceiling (log σ)", "aggregate LDS", "aggregate ceiling"]


def format_lds(records: list[dict], markdown: bool = False) -> str:
    """Per-pair LDS (both targets) beside its noise ceiling and the aggregate LDS beside
    its own, for every valuer with a score matrix or point values; '' when none has."""
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        rows = []
        for v, rs in by_valuer.items():
            margin, bt = pair_lds_cell(rs, "lds_pair"), pair_lds_cell(rs, "lds_pair_bt")
            agg = mean_ci([get_metric(r, "lds", "lds") for r in ok(rs)])
            if margin is None and math.isnan(agg[0]):
                continue
            agg_ceiling = mean_ci([get_metric(r, "lds", "ceiling") for r in ok(rs)])[0]
            f = lambda x: "—" if x is None or math.isnan(x) else f"{x:.2f}"   # noqa: E731
            rows.append([v, str(len(ok(rs))),
                         "—" if margin is None else _ci(margin["lds"], margin["lo"], margin["hi"]),
                         "—" if margin is None else f(margin["ceiling"]), "—" if margin is None else f(margin["ratio"]),
                         "—" if bt is None else _ci(bt["lds"], bt["lo"], bt["hi"]),
                         "—" if bt is None else f(bt["ceiling"]), _ci(*agg), f(agg_ceiling)])
        if not rows:
            continue
        lds = next((r.get("lds_targets") for rs in by_valuer.values() for r in ok(rs) if r.get("lds_targets")), {})
        head = (f"{exp} · game={game} · LDS over {lds.get('n_subsets')} subsets of {lds.get('subset_size')} "
                f"examples, each retrained under seeds {lds.get('seeds')}; pair LDS interval: bootstrap over eval "
                f"pairs; aggregate: over seeds")
        out.append((f"**{head}**\n\n" if markdown else f"{head}\n") + render_table(LDS_HEADERS, rows, markdown))
    return "\n\n".join(out)
