"""Two sets of records side by side: quality deltas and cost ratios (the program: ``bench/cli/compare.py``)."""
from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path

from bench.analysis.stats import metric_mean
from bench.analysis.tables import tag_variants
from bench.tracking.provenance import REPO_DIR
from bench.tracking.store import dumps_line, latest

# (header, section, key, +1 if higher is better else -1)
QUALITY = [("ρ", "fidelity", "spearman", +1), ("pearson", "fidelity", "pearson", +1),
           ("rel-L2", "fidelity", "rel_l2", -1), ("AUROC", "detection", "auroc", +1)]
COST = [("wall ×", "cost", "wall_s"), ("fine-tunes ×", "cost", "fine_tunes")]


def resolve_commit(ref: str) -> str:
    """Full sha for a ref git knows (HEAD~1, a branch, a short sha); else ``ref`` unchanged."""
    try:
        p = subprocess.run(["git", "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"],
                           cwd=REPO_DIR, capture_output=True, text=True, timeout=15)
        return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else ref
    except (OSError, subprocess.SubprocessError):
        return ref


def _of_commit(records: list[dict], commit: str) -> list[dict]:
    return [r for r in records if str(r.get("commit", "")).startswith(commit)]


def compare_rows(new: list[dict], old: list[dict], tol: float, cost_tol: float | None):
    """Table rows for one experiment and whether any row regressed. Records of one
    experiment with different settings (sweep axes) are lined up per setting."""
    tagged = tag_variants(list(new) + list(old))        # variants named over both sides together
    by_key = lambda recs: _group(latest(recs))  # noqa: E731
    n_g, o_g = by_key(tagged[:len(new)]), by_key(tagged[len(new):])
    rows, regressed = [], False
    for key in sorted(set(n_g) | set(o_g)):
        valuer, game = key
        if key not in n_g:
            rows.append([valuer, game, "-"] + [""] * (len(QUALITY) + len(COST)) + ["not rerun"])
            continue
        if key not in o_g:
            rows.append([valuer, game, str(len(n_g[key]))] + [""] * (len(QUALITY) + len(COST))
                        + ["new (no baseline)"])
            continue
        seeds = sorted(set(n_g[key]) & set(o_g[key]), key=str) or None
        pick = lambda g: [g[key][s] for s in (seeds or g[key])]  # noqa: E731
        n_all, o_all = pick(n_g), pick(o_g)
        n_ok = [r for r in n_all if r.get("status") == "ok"]
        o_ok = [r for r in o_all if r.get("status") == "ok"]
        bad = []
        if len(n_ok) < len(n_all) and o_ok:
            bad.append("FAILED")
        cells = []
        # schema 3 scores fidelity against the other seeds' consensus, older records against
        # their own seed's exact values: not comparable, so shown but never flagged
        other_reference = {bool(r.get("consensus")) for r in n_ok} != {bool(r.get("consensus")) for r in o_ok}
        for name, sec, k, sign in QUALITY:
            nv, ov = metric_mean(n_ok, sec, k), metric_mean(o_ok, sec, k)
            if other_reference and sec == "fidelity" and nv is not None:
                cells.append(f"{nv:.3f} (baseline: other reference)")
            elif ov is None:
                cells.append("—" if nv is None else f"{nv:.3f}")
            elif nv is None:
                cells.append("lost")
                if n_ok:
                    bad.append(name)
            else:
                worse = sign * (nv - ov) < -tol
                cells.append(f"{nv:.3f} ({nv - ov:+.3f}){' !' if worse else ''}")
                if worse:
                    bad.append(name)
        for name, sec, k in COST:
            nv, ov = metric_mean(n_ok, sec, k), metric_mean(o_ok, sec, k)
            if nv is None or not ov:
                cells.append("—")
                continue
            worse = cost_tol is not None and nv / ov > 1 + cost_tol
            cells.append(f"{nv / ov:.2f}{' !' if worse else ''}")
            if worse:
                bad.append(name)
        n_seeds = f"{len(n_all)}" + ("" if seeds else " (no shared seeds)")
        verdict = ("REGRESSED: " + ", ".join(bad) if bad
                   else "failed, as in baseline" if not n_ok else "ok")
        rows.append([valuer, game, n_seeds] + cells + [verdict])
        regressed |= bool(bad)
    return rows, regressed


def _group(recs: list[dict]) -> dict[tuple[str, str], dict]:
    g: dict = defaultdict(dict)
    for r in recs:
        g[(str(r.get("valuer")), str(r.get("game")))][r.get("seed")] = r
    return g


def write_baseline(records: list[dict], path: Path) -> int:
    """Atomically replace ``path`` with the ok records, sorted; returns how many."""
    from bench.core.cache import atomic_write_bytes
    ok = sorted((r for r in records if r.get("status") == "ok"),
                key=lambda r: (str(r.get("game")), str(r.get("valuer")), str(r.get("seed"))))
    atomic_write_bytes(path, b"".join(dumps_line(r) for r in ok))
    return len(ok)
