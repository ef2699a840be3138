"""Tables of recorded runs: one per (experiment, game[, sweep variant]), a row per valuer,
cells mean ± 95% CI half-width over seeds (the newest record per seed)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Sequence

from bench.analysis.stats import half_width, metric_ci, ok
from bench.tracking.store import latest

# (header, section, key, format, with CI)
COLUMNS = [
    ("fidelity ρ", "fidelity", "spearman", ".3f", True),
    ("pearson", "fidelity", "pearson", ".3f", True),
    ("rel-L2 (scale-free)", "fidelity", "rel_l2_fit", ".3f", True),
    ("one-seed exact ρ", "one_seed_exact", "spearman", ".3f", True),
    ("R² v(S)", "utilities", "r2", ".3f", True),
    ("ceiling R²", "utilities", "r2_ceiling", ".3f", True),
    ("detection AUROC", "detection", "auroc", ".3f", True),
    ("noise C", "detection_graded", "concordance", ".3f", True),
    ("P@k", "detection", "precision_at_k", ".2f", True),
    ("point AUROC", "detection_points", "auroc", ".3f", True),
    ("point AUPRC", "detection_points", "auprc", ".3f", True),
    ("aggregate LDS", "lds", "lds", ".3f", True),
    ("fine-tunes", "cost", "fine_tunes", ".0f", False),
    ("compute s", "cost", "device_s", ".1f", False),
    ("wall s", "cost", "wall_s", ".1f", False),
    ("GPU-h", "cost", "gpu_hours", ".3g", False),
    ("peak GPU GiB", "cost", "peak_gpu_mem_bytes", ".2f", False),     # per valuer, max over its utilities
]

BRIEF = ("fidelity ρ", "pearson", "rel-L2 (scale-free)", "one-seed exact ρ", "R² v(S)", "ceiling R²", "detection AUROC",
         "noise C",
         "aggregate LDS", "fine-tunes", "compute s")


def _cell(records: list[dict], section: str, key: str, spec: str, ci: bool) -> str:
    stat = metric_ci(records, section, key)
    m, h = stat[0], half_width(stat)
    if math.isnan(m):
        return "—"
    if key.endswith("_bytes"):
        m, h = m / 2**30, h / 2**30
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


# config keys that never make two records different games (seeds are aggregated over)
_NOT_A_VARIANT = ("seed", "seeds", "valuer", "valuers", "valuer_args", "selection", "results_dir", "cache_dir", "logger", "progress",
                  "n_jobs", "hydra", "experiment_name", "budget", "lds", "noise_seed_offset", "slurm")


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def variants(records: list[dict]) -> dict[int, str]:
    """Per record (by id), the settings that differ between records of the same
    experiment and game (a sweep's axes, e.g. ``model.n_layer=2 partition.kind=iid``);
    '' when an experiment holds one configuration."""
    flat = {id(r): {k: v for k, v in _flat(r.get("config")).items() if k.split(".")[0] not in _NOT_A_VARIANT}
            for r in records}
    by_exp = defaultdict(list)
    for r in records:
        by_exp[(r.get("experiment"), r.get("game"))].append(r)
    out = {}
    for recs in by_exp.values():
        # keys every record has (a key added to the config later is not a difference)
        common = set.intersection(*(set(flat[id(r)]) for r in recs))
        differ = [k for k in sorted(common) if len({flat[id(r)][k] for r in recs}) > 1]
        for r in recs:      # at most 4 named (a partition change also changes its sizes etc.)
            out[id(r)] = " ".join(f"{k}={json.loads(flat[id(r)][k])}" for k in differ[:4]) \
                + (" …" if len(differ) > 4 else "")
    return out


def tag_variants(records: list[dict]) -> list[dict]:
    """Copies of ``records`` whose ``game`` names their variant too (``union · model.n_layer=2``),
    so records of different settings are never lined up or averaged together."""
    var = variants(records)
    return [{**r, "game": str(r.get("game")) + (f" · {var[id(r)]}" if var.get(id(r)) else "")} for r in records]


def _reference(r: dict) -> str:
    """What a record was scored against: its seeds and their consensus ground truth."""
    return json.dumps([r.get("seeds"), r.get("consensus")], sort_keys=True)


def newest_jobs(records: list[dict]) -> list[dict]:
    """Only the newest job's records of every (experiment, game), and those of other jobs
    scored against the very same reference (same seeds, same consensus: e.g. a later job
    that valued new methods against the shipped ground truth, ``docs/ground-truth.md``):
    a job's seeds are scored against each other's consensus, so seeds of jobs with
    different references are never mixed. Records written before jobs held seeds (no
    ``job`` key) are kept as they are."""
    newest: dict = {}
    for r in records:
        if r.get("job"):
            k = (r.get("experiment"), r.get("game"))
            t = (str(r.get("timestamp") or ""), r["job"], _reference(r))
            newest[k] = max(newest.get(k, t), t)
    return [r for r in records if not r.get("job") or newest[(r.get("experiment"), r.get("game"))][1] == r["job"]
            or (r.get("consensus") is not None and newest[(r.get("experiment"), r.get("game"))][2] == _reference(r))]


def summarize(records: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """{(experiment, game[, variant]): {valuer: [newest record per seed]}}, sorted. Records of
    one experiment with different settings (a sweep over models or partitions) are
    separate groups, named by the settings that differ."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in latest(newest_jobs(tag_variants(records))):
        groups[(str(r.get("experiment")), str(r.get("game")))][str(r.get("valuer"))].append(r)
    return {k: dict(sorted(v.items())) for k, v in sorted(groups.items())}


def format_table(records: list[dict], markdown: bool = False, brief: bool = False) -> str:
    """One table per (experiment, game): a row per valuer, cells mean ± CI over seeds."""
    cols = [c for c in COLUMNS if not brief or c[0] in BRIEF]
    out = []
    for (exp, game), by_valuer in summarize(records).items():
        rows = []
        for valuer, recs in by_valuer.items():
            good = ok(recs)
            n = f"{len(good)}/{len(recs)}" if len(good) < len(recs) else str(len(good))
            rows.append([valuer, n] + [_cell(good, s, k, spec, ci) for _, s, k, spec, ci in cols])
        title = f"{exp} · game={game}"
        out.append((f"**{title}**\n\n" if markdown else f"{title}\n")
                   + render_table(["valuer", "n"] + [c[0] for c in cols], rows, markdown))
    return "\n\n".join(out)
