"""Tables and plots of recorded runs (the program: ``bench/cli/report.py``)."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from bench.tracking import get_metric, latest

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


# config keys that never make two records different games (seeds are aggregated over)
_NOT_A_VARIANT = ("seed", "valuer", "valuers", "valuer_args", "selection", "results_dir", "cache_dir", "logger", "progress",
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


def summarize(records: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """{(experiment, game[, variant]): {valuer: [newest record per seed]}}, sorted. Records of
    one experiment with different settings (a sweep over models or partitions) are
    separate groups, named by the settings that differ."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in latest(tag_variants(records)):
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


# ------------------------------------------------------------------ results/report.md

def _ok(recs):
    return [r for r in recs if r.get("status", "ok") == "ok"]


def _title(text: str, width: int = 60) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def _grid(n: int, w: float, h: float):
    """A figure with n panels, at most 3 per row; returns (fig, flat list of n axes)."""
    plt = _pyplot()
    cols = min(3, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(w * cols, h * rows))
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def plot_frontier(groups, out: Path) -> Path:
    """Fidelity (Spearman vs exact, mean ± CI over seeds) against cost (fine-tunes,
    log) per valuer; the line joins the Pareto-optimal valuers (cheaper and better)."""
    fig, axes = _grid(len(groups), 5.5, 4.2)
    for ax, ((exp, game), by_valuer) in zip(axes, groups.items()):
        pts = []
        for v, recs in by_valuer.items():
            ok = _ok(recs)
            (rho, h), (ft, _) = (mean_ci([get_metric(r, "fidelity", "spearman") for r in ok]),
                                 mean_ci([get_metric(r, "cost", "fine_tunes") for r in ok]))
            if math.isnan(rho) or math.isnan(ft):
                continue
            x = max(ft, 0.5)       # zero-fine-tune methods sit at the left edge of the log axis
            ax.errorbar(x, rho, yerr=0 if math.isnan(h) else h, fmt="o", capsize=3)
            ax.annotate(v, (x, rho), textcoords="offset points", xytext=(4, 4), fontsize=7)
            pts.append((x, rho))
        front, best = [], -math.inf
        for x, y in sorted(pts):
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto frontier")
            ax.legend(fontsize=7, loc="lower right")
        ceil = mean_ci([get_metric(r, "noise_ceiling", "spearman") for rs in by_valuer.values() for r in _ok(rs)])[0]
        if not math.isnan(ceil):
            ax.axhline(ceil, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-1.1, 1.1)     # ρ's range; a 2-seed t-interval can reach far beyond it
        ax.set_title(_title(f"{exp} · {game}"), fontsize=8)
        ax.set(xlabel="fine-tunes (log; 0 drawn at 0.5)", ylabel="Spearman ρ vs exact Shapley (dotted: ceiling)")
    return _save(fig, out)


def plot_owner_values(groups, out: Path) -> Path:
    """Owner values per valuer, each record scaled to unit L2 norm (methods differ in
    scale), mean ± 95% CI over seeds; the exact retraining Shapley first."""
    import numpy as np
    fig, axes = _pyplot().subplots(len(groups), 1, squeeze=False, figsize=(10, 3.4 * len(groups)))
    for ax, ((exp, game), by_valuer) in zip(axes[:, 0], groups.items()):
        series = {}
        first = next((r for rs in by_valuer.values() for r in _ok(rs) if r.get("owner_values")), None)
        if first is None:
            continue
        n = len(first["owner_values"])
        seeds = {}      # the exact Shapley once per seed, from whichever valuer's record carries it
        for rs in by_valuer.values():
            for r in _ok(rs):
                if r.get("exact_values") and len(r["exact_values"]) == n:
                    seeds.setdefault(r.get("seed"), r["exact_values"])
        series["exact retraining"] = list(seeds.values())
        for v, recs in by_valuer.items():
            if v != "retrain_shapley":
                series[v] = [r["owner_values"] for r in _ok(recs) if len(r.get("owner_values") or []) == n]
        width = 0.8 / max(len(series), 1)
        for j, (name, vals) in enumerate(series.items()):
            if not vals:
                continue
            arr = np.array([np.asarray(v, float) / (np.linalg.norm(v) or 1.0) for v in vals])
            stats = [mean_ci(arr[:, i]) for i in range(n)]
            ax.bar(np.arange(n) + (j - len(series) / 2 + 0.5) * width, [m for m, _ in stats], width,
                   yerr=[0 if math.isnan(h) else h for _, h in stats], capsize=2, label=name)
        noisy = set(first.get("planted", {}).get("noisy_owners", []))
        ax.set_xticks(range(n), [f"owner {i}" + (" (noisy)" if i in noisy else "") for i in range(n)])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(_title(f"{exp} · {game}: owner values (unit-norm per record)", 120), fontsize=8)
        ax.set(ylabel="value / ‖values‖")
        ax.set_ylim(-1.1, 1.1)
        ax.legend(fontsize=7, ncol=4)
    return _save(fig, out)


def _roc(scores, labels):
    """ROC points of 'low value = bad' (flagging the lowest-valued first)."""
    import numpy as np
    order = np.argsort(np.asarray(scores, float), kind="stable")
    y = np.asarray(labels, bool)[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def plot_detection_roc(groups, out: Path) -> Path:
    """Noisy-data detection ROC per valuer (seed of each valuer's newest record):
    example level when the valuer has point values, else owner level."""
    import numpy as np
    from bench.tracking.schema import corrupted_mask
    fig, axes = _grid(len(groups), 5, 4.4)
    for ax, ((exp, game), by_valuer) in zip(axes, groups.items()):
        for v, recs in by_valuer.items():
            ok = [r for r in _ok(recs) if r.get("owner_values")]
            if not ok:
                continue
            r = ok[-1]
            if r.get("point_values") is not None:
                bad = corrupted_mask(r)        # None for a v1 record (ids not stored)
                if bad is not None and bad.any() and len(bad) == len(r["point_values"]):
                    x, y = _roc(r["point_values"], bad)
                    ax.plot(x, y, label=f"{v} (examples)")
                    continue
            labels = np.isin(np.arange(len(r["owner_values"])), r.get("planted", {}).get("noisy_owners", []))
            if labels.any() and not labels.all():
                x, y = _roc(r["owner_values"], labels)
                ax.step(x, y, where="post", ls="--", label=f"{v} (owners)")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
        ax.set_title(_title(f"{exp} · {game}: noisy-data detection"), fontsize=8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.55, "no planted noise in this game", ha="center", fontsize=8, color="grey")
    return _save(fig, out)


def write_report(records: list[dict], out_md: str | Path) -> Path:
    """``out_md`` (markdown tables, mean ± 95% CI over seeds) plus PNGs in a folder
    next to it: fidelity-vs-cost frontier, owner values, detection ROC, and every
    selection curve found in the records."""
    from bench.core.cache import atomic_write_bytes
    from bench.tracking import utc_timestamp
    out_md = Path(out_md)
    figs = out_md.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    groups = {k: v for k, v in summarize(records).items()     # groups with owner values to plot
              if any(r.get("owner_values") for rs in v.values() for r in _ok(rs))}
    parts = [f"# dvbench report\n\n{len(records)} records, generated {utc_timestamp()} by "
             f"`python -m bench report --out {out_md}`. Cells: mean ± 95% CI half-width over seeds "
             f"(newest record per seed); `n` counts seeds (ok/all).\n",
             format_table(records, markdown=True)]
    pngs = [("Fidelity vs cost", plot_frontier(groups, figs / "frontier.png")),
            ("Owner values", plot_owner_values(groups, figs / "owner_values.png")),
            ("Noisy-data detection", plot_detection_roc(groups, figs / "detection_roc.png"))]
    from bench.analysis.plots import plot_selection
    for (exp, game), by_valuer in groups.items():
        for v, recs in by_valuer.items():
            for r in _ok(recs):
                sel = (r.get("metrics") or {}).get("selection")
                if sel:
                    stem = re.sub(r"[^\w.=-]+", "_", f"selection_{exp}_{game}_{v}_s{r['seed']}")[:120]
                    p = plot_selection(sel, figs / f"{stem}.png",
                                       title=f"{exp}: {v} selection ({len(sel['seeds'])} seeds, 95% CI)")
                    pngs.append((f"Selection: {exp} {v} seed {r['seed']}", p))
    parts += [f"## {title}\n\n![{title}]({p.relative_to(out_md.parent)})" for title, p in pngs]
    atomic_write_bytes(out_md, ("\n\n".join(parts) + "\n").encode())
    return out_md
