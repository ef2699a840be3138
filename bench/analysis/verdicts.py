"""The leaderboard: which valuers a preset can tell apart, with what confidence.

Per (experiment, game) and per valuer, over the job's seeds (each seed's valuation
scored against the consensus exact Shapley of the *other* seeds):

- fidelity (Spearman ρ to that held-out consensus): mean and a 95 % t-interval whose
  spread is floored at the rounding of ρ over n owners (steps of 12/(n(n²−1)): 0.2 at
  n = 4, so equal values are not zero variance) and clipped to [−1, 1];
- two *fixed* comparators, per-seed paired differences (same seeds, same games):
  ``vs random`` and ``vs one-seed exact`` (that seed's exact retraining Shapley scored
  the same way: what one retraining run reaches, not a ceiling; an estimator that
  averages training noise away can be above it);
- marks: the exact sign-flip test of the paired differences (no normality; its
  smallest two-sided p is 2/2^S, so with S = 3 seeds nothing can be marked), with
  Benjamini–Hochberg adjusted q within the table: ``+`` / ``−`` a difference shown at
  q ≤ α; ``≈`` equivalent within the declared margin δ (two one-sided sign-flip tests,
  TOST, BH-adjusted); ``?`` unresolved: neither shown;
- graded detection: the concordance index C = P(v_i < v_j | corruption_i >
  corruption_j) (1 = values fall as corruption rises, 0.5 = chance);
- per-pair LDS with every source of variance (``bench.core.lds.combine``) and its ratio
  to the ceiling of the target it is scored against; fine-tunes and compute.

Rows are sorted by mean fidelity, a display order, not a verdict. ``δ`` and ``α`` come
from the job's config (``verdicts.margin``, ``verdicts.alpha``), declared before the run.
Records made from a dirty tree are marked †: no commit reproduces them.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from bench.analysis.stats import ok
from bench.analysis.tables import render_table, summarize
from bench.core.lds import combine
from bench.core.uncertainty import Paired, bh_adjust, paired_ci, spearman_step, t_interval
from bench.tracking.store import get_metric

MARGIN, ALPHA = 0.1, 0.05          # defaults when a record's config has no ``verdicts`` node
UTILITY_NAMES = ("pref_acc", "margin")


def settings(records: list[dict]) -> tuple[float, float]:
    """(margin δ, α) declared in the records' config."""
    v = next(((r.get("config") or {}).get("verdicts") for r in records if (r.get("config") or {}).get("verdicts")),
             None) or {}
    return float(v.get("margin", MARGIN)), float(v.get("alpha", ALPHA))


def by_seed(records: list[dict], section: str, key: str) -> dict[int, float | None]:
    return {int(r["seed"]): get_metric(r, section, key) for r in ok(records)}


def _by_utility(records: list[dict], section: str, utility: str) -> dict[int, float | None]:
    out = {}
    for r in ok(records):
        sec = ((r.get("metrics") or {}).get(section) or {}).get(utility) or {}
        v = sec.get("spearman")
        out[int(r["seed"])] = None if v is None or not math.isfinite(v) else v
    return out


def _pair(xa: dict, xb: dict, n_owners: int, margin: float) -> Paired:
    seeds = sorted(set(xa) & set(xb))
    return paired_ci([xa[s] for s in seeds], [xb[s] for s in seeds], sd_floor=spearman_step(n_owners) / math.sqrt(6),
                     bounds=(-2.0, 2.0), margin=margin)


def paired(a: list[dict], b: list[dict], section: str = "fidelity", key: str = "spearman",
           b_section: str | None = None, n_owners: int | None = None, margin: float = MARGIN) -> Paired:
    """Per-seed difference of a metric between two valuers' records (seeds both have)."""
    n = n_owners or int((ok(a) or [{}])[0].get("n_owners") or 0)
    return _pair(by_seed(a, section, key), by_seed(b, b_section or section, key), n, margin)


def fidelity_ci(records: list[dict], n_owners: int, section: str = "fidelity") -> tuple[float, float, float]:
    return t_interval([get_metric(r, section, "spearman") for r in ok(records)],
                      sd_floor=spearman_step(n_owners) / math.sqrt(12), bounds=(-1.0, 1.0))


def pair_lds_cell(records: list[dict], section: str = "lds_pair") -> dict | None:
    """The per-pair LDS of a valuer over its seeds with every source of variance
    (``bench.core.lds.combine``); records without bootstrap replicates (schema 3) give
    the mean over seeds with their stored interval over eval pairs, flagged ``old``."""
    rows = [{**x, "seed": r["seed"]} for r in ok(records) for x in [(r.get("metrics") or {}).get(section)] if x]
    if not rows:
        return None
    reps = next((r.get("lds_targets", {}).get("ceiling_replicates") for r in ok(records) if r.get("lds_targets")),
                None)
    out = combine(rows, ceiling_reps=reps) if reps else None
    if out is not None:
        return {**out, "old": False}
    m = float(np.nanmean([x["lds"] for x in rows]))
    c = rows[0].get("ceiling")
    return {"lds": m, "lo": float(np.nanmean([x["lo"] for x in rows])), "hi": float(np.nanmean([x["hi"] for x in rows])),
            "ceiling": c, "ratio": m / c if c else float("nan"), "ratio_lo": float("nan"), "ratio_hi": float("nan"),
            "n_seeds": len(rows), "old": True}


def _ci(m: float, lo: float, hi: float, spec: str = ".2f") -> str:
    if m is None or math.isnan(m):
        return "—"
    return f"{m:{spec}}" if lo is None or math.isnan(lo) else f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def mark(p: Paired | None, q: float, q_equiv: float, alpha: float) -> str:
    """'+' / '−' a difference shown (BH-adjusted q ≤ α); '≈' equivalence shown (TOST q ≤ α);
    '?' neither."""
    if p is None or p.n < 2:
        return "?"
    if q <= alpha:
        return "+" if p.mean > 0 else "−"
    return "≈" if q_equiv <= alpha else "?"


def _q(q: float) -> str:
    return "" if math.isnan(q) else ("<0.001" if q < 0.001 else f"{q:.2g}")


def _diff_cell(p: Paired | None, m: str, q: float) -> str:
    if p is None or p.n == 0 or math.isnan(p.mean):
        return "—"
    qs = "" if math.isnan(q) else f" q={_q(q)}"
    return f"{m} {p.mean:+.2f} [{p.lo:+.2f}, {p.hi:+.2f}]{qs}"


def _adjust(rows: list[dict], keys: tuple[str, ...]) -> None:
    """BH within the table: one family for the difference tests of ``keys``, one for the
    equivalence tests; writes ``q_<key>`` and ``qe_<key>`` into the rows."""
    cells = [(row, k) for row in rows for k in keys if row.get(k) is not None]
    q = bh_adjust([row[k].p for row, k in cells])
    qe = bh_adjust([row[k].p_equiv for row, k in cells])
    for (row, k), a, b in zip(cells, q, qe):
        row[f"q_{k}"], row[f"qe_{k}"] = float(a), float(b)


def concordance_step(records: list[dict]) -> float:
    """The step of the concordance index over the owner pairs whose corrupted shares
    differ (a value tie moves it by half a pair): its rounding, like ρ's."""
    q = next(((r.get("planted") or {}).get("corruption") for r in ok(records)
              if (r.get("planted") or {}).get("corruption")), None)
    if not q:
        return 0.0
    n = sum(1 for i in range(len(q)) for j in range(i + 1, len(q)) if q[i] != q[j])
    return 0.5 / n if n else 0.0


def leaderboard_rows(by_valuer: dict[str, list[dict]], margin: float = MARGIN, alpha: float = ALPHA) -> list[dict]:
    """One dict per valuer with its fidelity, its paired comparisons with the fixed
    comparators (BH-adjusted within the table) and the rest, sorted by mean fidelity."""
    n = next((int(r["n_owners"]) for rs in by_valuer.values() for r in ok(rs) if r.get("n_owners")), 0)
    fid = {v: fidelity_ci(rs, n) for v, rs in by_valuer.items()}
    ranked = sorted(by_valuer, key=lambda v: (-fid[v][0] if not math.isnan(fid[v][0]) else math.inf, v))
    rand = by_seed(by_valuer["random"], "fidelity", "spearman") if "random" in by_valuer else None
    c_floor = concordance_step([r for rs in by_valuer.values() for r in rs]) / math.sqrt(12)
    rows = []
    for v in ranked:
        rs = by_valuer[v]
        good = ok(rs)
        mine = by_seed(rs, "fidelity", "spearman")
        rows.append({
            "valuer": v, "n": len(good), "of": len(rs), "fidelity": fid[v],
            "vs_random": _pair(mine, rand, n, margin) if rand is not None and v != "random" else None,
            "vs_one_seed": (_pair(mine, by_seed(rs, "one_seed_exact", "spearman"), n, margin)
                            if v != "retrain_shapley" else None),
            "concordance": t_interval([get_metric(r, "detection_graded", "concordance") for r in good],
                                      sd_floor=c_floor, bounds=(0.0, 1.0)),
            "auroc_any": t_interval([get_metric(r, "detection_graded", "auroc_any") for r in good], bounds=(0.0, 1.0)),
            "pair_lds": pair_lds_cell(rs),
            "fine_tunes": t_interval([get_metric(r, "cost", "fine_tunes") for r in good])[0],
            "compute_s": t_interval([get_metric(r, "cost", "device_s") for r in good])[0],
            "dirty": any(r.get("dirty") for r in rs),
            "rescored": any(r.get("rescored") for r in rs),
        })
    _adjust(rows, ("vs_random", "vs_one_seed"))
    for row in rows:
        for k in ("vs_random", "vs_one_seed"):
            row[f"mark_{k}"] = mark(row[k], row.get(f"q_{k}", math.nan), row.get(f"qe_{k}", math.nan), alpha)
    return rows


HEADERS = ["valuer", "seeds", "fidelity ρ [95% CI]", "vs random", "vs one-seed exact", "noise C", "pair LDS / ceiling",
           "fine-tunes", "compute s"]


def _seeds_of(by_valuer) -> list[int]:
    return sorted({int(r["seed"]) for rs in by_valuer.values() for r in ok(rs)})


def _legend(margin: float, alpha: float, S: int) -> str:
    p_min = 2 / 2 ** S if S else float("nan")
    return (f"marks: exact sign-flip test of the per-seed paired differences, Benjamini–Hochberg q within the table "
            f"(q ≤ {alpha:g}: + better / − worse); ≈ equivalent within ±{margin:g} (TOST, BH); ? unresolved. "
            f"With {S} seeds the smallest sign-flip p is {p_min:.3g}"
            + (" (nothing can be marked)" if p_min > alpha else "")
            + "; intervals: t over seeds, spread floored at ρ's rounding, clipped to ρ's range")


def leaderboard_cells(by_valuer: dict[str, list[dict]], margin: float, alpha: float) -> list[list[str]]:
    cells = []
    for row in leaderboard_rows(by_valuer, margin, alpha):
        lds = row["pair_lds"]
        if lds is None:
            lds_s = "—"
        else:
            ratio = "" if lds.get("ceiling") is None else (
                f" / {lds['ceiling']:.2f} = {lds['ratio']:.2f}"
                + ("" if math.isnan(lds.get("ratio_lo", math.nan)) else f" [{lds['ratio_lo']:.2f}, {lds['ratio_hi']:.2f}]"))
            lds_s = _ci(lds["lds"], lds["lo"], lds["hi"]) + ratio + (" (old)" if lds.get("old") else "")
        n = str(row["n"]) if row["n"] == row["of"] else f"{row['n']}/{row['of']}"
        name = row["valuer"] + (" †" if row["dirty"] else "")
        cells.append([name, n, _ci(*row["fidelity"]),
                      _diff_cell(row["vs_random"], row["mark_vs_random"], row.get("q_vs_random", math.nan)),
                      _diff_cell(row["vs_one_seed"], row["mark_vs_one_seed"], row.get("q_vs_one_seed", math.nan)),
                      _ci(*row["concordance"]), lds_s,
                      "—" if math.isnan(row["fine_tunes"]) else f"{row['fine_tunes']:.0f}",
                      "—" if math.isnan(row["compute_s"]) else f"{row['compute_s']:.1f}"])
    return cells


def _footnotes(by_valuer) -> str:
    recs = [r for rs in by_valuer.values() for r in rs]
    notes = []
    if any(r.get("dirty") for r in recs):
        notes.append("† made from a dirty tree: no commit reproduces these records")
    old = next((r["rescored"] for r in recs if r.get("rescored")), None)
    if old:
        notes.append(old + "; '(old)' LDS cells have no subset or seed variance in their interval")
    return "; ".join(notes)


def format_leaderboard(records: list[dict], markdown: bool = False) -> str:
    """The leaderboard of every (experiment, game) in ``records`` (see the module docstring)."""
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        margin, alpha = settings([r for rs in by_valuer.values() for r in rs])
        n = next((int(r["n_owners"]) for rs in by_valuer.values() for r in ok(rs) if r.get("n_owners")), 0)
        one_seed = {}
        for rs in by_valuer.values():
            one_seed.update({s: c for s, c in by_seed(rs, "one_seed_exact", "spearman").items() if c is not None})
        ref = t_interval(list(one_seed.values()), sd_floor=spearman_step(n) / math.sqrt(12), bounds=(-1.0, 1.0))
        seeds = _seeds_of(by_valuer)
        head = (f"{exp} · game={game} · seeds {seeds} · one-seed exact ρ {_ci(*ref)} · "
                f"{_legend(margin, alpha, len(seeds))}")
        table = render_table(HEADERS, leaderboard_cells(by_valuer, margin, alpha), markdown)
        foot = _footnotes(by_valuer)
        out.append((f"**{head}**\n\n" if markdown else f"{head}\n") + table + (f"\n\n{foot}" if foot else ""))
    return "\n\n".join(out)


# ------------------------------------------------------------------ fidelity under each utility

UTILITY_HEADERS = ["valuer", "ρ under pref_acc [95% CI]", "ρ under margin [95% CI]", "margin − pref_acc"]


def utility_cells(by_valuer: dict[str, list[dict]], margin: float, alpha: float) -> list[list[str]]:
    """Fidelity of each valuer to the exact ground truth under ``pref_acc`` and under the
    base-referenced ``margin`` (the utility gradient methods estimate), from the stored
    per-coalition metrics, and their paired difference (BH within the table)."""
    n = next((int(r["n_owners"]) for rs in by_valuer.values() for r in ok(rs) if r.get("n_owners")), 0)
    rows = []
    for v, rs in by_valuer.items():
        per = {u: _by_utility(rs, "fidelity_by_utility", u) for u in UTILITY_NAMES}
        if not any(x is not None for x in per["margin"].values()):
            continue
        cis = [t_interval(list(per[u].values()), sd_floor=spearman_step(n) / math.sqrt(12), bounds=(-1.0, 1.0))
               for u in UTILITY_NAMES]
        rows.append({"valuer": v, "cis": cis, "d": _pair(per["margin"], per["pref_acc"], n, margin)})
    _adjust(rows, ("d",))
    return [[r["valuer"], _ci(*r["cis"][0]), _ci(*r["cis"][1]),
             _diff_cell(r["d"], mark(r["d"], r.get("q_d", math.nan), r.get("qe_d", math.nan), alpha),
                        r.get("q_d", math.nan))] for r in rows]


def format_utilities(records: list[dict], markdown: bool = False) -> str:
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        margin, alpha = settings([r for rs in by_valuer.values() for r in rs])
        cells = utility_cells(by_valuer, margin, alpha)
        if not cells:
            continue
        head = (f"{exp} · game={game} · fidelity under each utility (ground truth from the same fine-tunes, "
                f"re-scored) · marks as above")
        out.append((f"**{head}**\n\n" if markdown else f"{head}\n") + render_table(UTILITY_HEADERS, cells, markdown))
    return "\n\n".join(out)


# ------------------------------------------------------------------ per-pair LDS

LDS_HEADERS = ["valuer", "seeds", "pair LDS (margin) [95% CI]", "ceiling", "LDS / ceiling [95% CI]", "aggregate LDS",
               "aggregate ceiling"]


def _lds_valuers(by_valuer) -> dict[str, dict]:
    return {v: c for v, rs in by_valuer.items() for c in [pair_lds_cell(rs)] if c is not None}


def lds_cells(by_valuer: dict[str, list[dict]]) -> list[list[str]]:
    rows = []
    cells = _lds_valuers(by_valuer)
    for v, rs in by_valuer.items():
        margin = cells.get(v)
        agg = t_interval([get_metric(r, "lds", "lds") for r in ok(rs)], bounds=(-1.0, 1.0))
        if margin is None and math.isnan(agg[0]):
            continue
        agg_ceiling = t_interval([get_metric(r, "lds", "ceiling") for r in ok(rs)])[0]
        f = lambda x: "—" if x is None or math.isnan(x) else f"{x:.2f}"   # noqa: E731
        ratio = "—" if margin is None else (_ci(margin["ratio"], margin.get("ratio_lo", math.nan),
                                                 margin.get("ratio_hi", math.nan)))
        rows.append([v, str(len(ok(rs))),
                     "—" if margin is None else _ci(margin["lds"], margin["lo"], margin["hi"])
                     + (" (old)" if margin.get("old") else ""),
                     "—" if margin is None else f(margin["ceiling"]), ratio, _ci(*agg), f(agg_ceiling)])
    return rows


def lds_pairwise_cells(by_valuer: dict[str, list[dict]], alpha: float = ALPHA) -> list[list[str]]:
    """Every pair of valuers with per-pair LDS: the paired difference on the same subsets,
    eval pairs and seeds (``combine(minus=...)``), BH-adjusted within the table."""
    have = {v: [{**x, "seed": r["seed"]} for r in ok(rs) for x in [(r.get("metrics") or {}).get("lds_pair")]
                if x and x.get("replicates")] for v, rs in by_valuer.items()}
    have = {v: x for v, x in have.items() if x}
    order = sorted(have, key=lambda v: -float(np.nanmean([x["lds"] for x in have[v]])))
    pairs = []
    for a, b in itertools.combinations(order, 2):
        d = combine(have[a], minus=have[b])
        if d is not None:
            pairs.append((a, b, d))
    q = bh_adjust([d["p"] for *_, d in pairs])
    out = []
    for (a, b, d), qq in zip(pairs, q):
        m = ("+" if d["lds"] > 0 else "−") if qq <= alpha else "?"
        out.append([f"{a} − {b}", f"{m} {d['lds']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", _q(qq)])
    return out


def format_lds(records: list[dict], markdown: bool = False) -> str:
    """Per-pair LDS beside the ceiling of its target and the aggregate LDS beside its own,
    for every valuer with a score matrix or point values, then the paired differences
    between valuers; '' when none has."""
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        rows = lds_cells(by_valuer)
        if not rows:
            continue
        lds = next((r.get("lds_targets") for rs in by_valuer.values() for r in ok(rs) if r.get("lds_targets")), {})
        old = any(c.get("old") for c in _lds_valuers(by_valuer).values())
        head = (f"{exp} · game={game} · LDS over {lds.get('n_subsets')} subsets of {lds.get('subset_size')} "
                f"examples, each retrained under seeds {lds.get('seeds')}; ceiling: what a perfect noise-free "
                f"predictor reaches against that seed mean (Spearman–Brown); "
                + ("interval: (old) over eval pairs only" if old else
                   "interval: two-way bootstrap over subsets and eval pairs plus the valuer's seed-to-seed spread"))
        block = (f"**{head}**\n\n" if markdown else f"{head}\n") + render_table(LDS_HEADERS, rows, markdown)
        _, alpha = settings([r for rs in by_valuer.values() for r in rs])
        pw = lds_pairwise_cells(by_valuer, alpha)
        if pw:
            block += ("\n\n" + ("**paired per-pair LDS differences (same subsets, eval pairs and seeds; "
                                "BH q within the table)**\n\n" if markdown else "paired per-pair LDS differences\n")
                      + render_table(["valuers", "difference [95% CI]", "q"], pw, markdown))
        out.append(block)
    return "\n\n".join(out)


def verdict_tables(records: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The leaderboard, fidelity-by-utility and LDS tables as (columns, rows), one set per
    (experiment, game): what a W&B run logs beside its records."""
    out = {}
    for (exp, game), by_valuer in summarize(records).items():
        margin, alpha = settings([r for rs in by_valuer.values() for r in rs])
        tag = f"{exp}-{game}".replace(" ", "")
        out[f"leaderboard/{tag}"] = (HEADERS, leaderboard_cells(by_valuer, margin, alpha))
        u = utility_cells(by_valuer, margin, alpha)
        if u:
            out[f"fidelity_by_utility/{tag}"] = (UTILITY_HEADERS, u)
        lds = lds_cells(by_valuer)
        if lds:
            out[f"lds/{tag}"] = (LDS_HEADERS, lds)
        pw = lds_pairwise_cells(by_valuer, alpha)
        if pw:
            out[f"lds_pairwise/{tag}"] = (["valuers", "difference [95% CI]", "q"], pw)
    return out
