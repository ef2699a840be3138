"""Plots of recorded runs and curves (matplotlib, Agg backend, PNG files written atomically).

``groups`` below is ``bench.analysis.tables.summarize(records)``:
``{(experiment, game): {valuer: [newest record per seed]}}``.
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np

from bench.analysis.stats import half_width, metric_ci, ok, pareto_front


# --------------------------------------------------------------------------- pyplot + save

def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, out: str | Path, dpi: int = 120) -> Path:
    """Lay out (unless the figure has its own layout engine), write ``out`` atomically
    (format from its suffix), close the figure; returns ``out``."""
    from bench.core.cache import atomic_write_bytes
    out = Path(out)
    try:
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=out.suffix.lstrip(".").lower() or "png", dpi=dpi)
        atomic_write_bytes(out, buf.getvalue())
    finally:
        pyplot().close(fig)
    return out


def _grid(n: int, w: float, h: float):
    """A figure with n panels, at most 3 per row; returns (fig, flat list of n axes)."""
    cols = min(3, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = pyplot().subplots(rows, cols, squeeze=False, figsize=(w * cols, h * rows))
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _title(text: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _nan0(x: float) -> float:
    return 0 if math.isnan(x) else x


# --------------------------------------------------------------------------- report plots

def plot_fidelity_cost(groups, out: str | Path) -> Path:
    """Per valuer: fidelity ρ (± CI) with the one-seed exact reference, and fine-tunes (log scale)."""
    fig, axes = pyplot().subplots(len(groups), 2, squeeze=False,
                                  figsize=(11, 3.6 * len(groups)), constrained_layout=True)
    for (ax_f, ax_c), ((exp, game), by_valuer) in zip(axes, groups.items()):
        names = list(by_valuer)
        good = [ok(by_valuer[v]) for v in names]
        rho = [metric_ci(rs, "fidelity", "spearman") for rs in good]
        ceil = [metric_ci(rs, "one_seed_exact", "spearman")[0] for rs in good]
        ft = [metric_ci(rs, "cost", "fine_tunes")[0] for rs in good]
        x = range(len(names))
        ax_f.bar(x, [m for m, _, _ in rho], yerr=[_nan0(half_width(c)) for c in rho],
                 color="tab:blue", capsize=3)
        for i, c in enumerate(ceil):
            if not math.isnan(c):
                ax_f.hlines(c, i - 0.4, i + 0.4, colors="k", linestyles="--",
                            label="one-seed exact" if i == 0 else None)
        ax_f.set(title=f"{exp} · {game}: fidelity", ylabel="Spearman ρ vs exact Shapley",
                 ylim=(min([-0.05] + [m - 0.05 for m, _, _ in rho if not math.isnan(m)]), 1.05))
        bars = ax_c.bar(x, [_nan0(m) for m in ft], color="tab:orange")
        ax_c.bar_label(bars, fmt="%.0f")
        ax_c.set_yscale("symlog", linthresh=1)
        ax_c.set(title=f"{exp} · {game}: cost", ylabel="fine-tunes (log)")
        for ax in (ax_f, ax_c):
            ax.set_xticks(list(x), names, rotation=30, ha="right")
        if any(not math.isnan(c) for c in ceil):
            ax_f.legend(loc="lower right")
    return save(fig, out)


def plot_frontier(groups, out: str | Path) -> Path:
    """Fidelity (Spearman vs exact, mean ± CI over seeds) against cost (fine-tunes,
    log) per valuer; the line joins the Pareto-optimal valuers (cheaper and better)."""
    fig, axes = _grid(len(groups), 5.5, 4.2)
    for ax, ((exp, game), by_valuer) in zip(axes, groups.items()):
        pts = []
        for v, recs in by_valuer.items():
            good = ok(recs)
            rho, ft = metric_ci(good, "fidelity", "spearman"), metric_ci(good, "cost", "fine_tunes")[0]
            if math.isnan(rho[0]) or math.isnan(ft):
                continue
            x = max(ft, 0.5)       # zero-fine-tune methods sit at the left edge of the log axis
            ax.errorbar(x, rho[0], yerr=_nan0(half_width(rho)), fmt="o", capsize=3)
            ax.annotate(v, (x, rho[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            pts.append((x, rho[0]))
        front = pareto_front(pts)
        if len(front) > 1:
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto frontier")
            ax.legend(fontsize=7, loc="lower right")
        ceil = metric_ci([r for rs in by_valuer.values() for r in ok(rs)], "one_seed_exact", "spearman")[0]
        if not math.isnan(ceil):
            ax.axhline(ceil, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-1.1, 1.1)     # ρ's range; a 2-seed t-interval can reach far beyond it
        ax.set_title(_title(f"{exp} · {game}"), fontsize=8)
        ax.set(xlabel="fine-tunes (log; 0 drawn at 0.5)", ylabel="Spearman ρ vs exact Shapley (dotted: one-seed exact)")
    return save(fig, out)


def plot_owner_values(groups, out: str | Path) -> Path:
    """Owner values per valuer, each record scaled to unit L2 norm (methods differ in
    scale), mean ± 95% CI over seeds; the exact retraining Shapley first."""
    from bench.core.metrics import mean_ci
    fig, axes = pyplot().subplots(len(groups), 1, squeeze=False, figsize=(10, 3.4 * len(groups)))
    for ax, ((exp, game), by_valuer) in zip(axes[:, 0], groups.items()):
        series = {}
        first = next((r for rs in by_valuer.values() for r in ok(rs) if r.get("owner_values")), None)
        if first is None:
            continue
        n = len(first["owner_values"])
        seeds = {}      # the exact Shapley once per seed, from whichever valuer's record carries it
        for rs in by_valuer.values():
            for r in ok(rs):
                if r.get("exact_values") and len(r["exact_values"]) == n:
                    seeds.setdefault(r.get("seed"), r["exact_values"])
        series["exact retraining"] = list(seeds.values())
        for v, recs in by_valuer.items():
            if v != "retrain_shapley":
                series[v] = [r["owner_values"] for r in ok(recs) if len(r.get("owner_values") or []) == n]
        width = 0.8 / max(len(series), 1)
        for j, (name, vals) in enumerate(series.items()):
            if not vals:
                continue
            arr = np.array([np.asarray(v, float) / (np.linalg.norm(v) or 1.0) for v in vals])
            cis = [mean_ci(arr[:, i]) for i in range(n)]
            ax.bar(np.arange(n) + (j - len(series) / 2 + 0.5) * width, [c[0] for c in cis], width,
                   yerr=[_nan0(half_width(c)) for c in cis], capsize=2, label=name)
        noisy = set(first.get("planted", {}).get("noisy_owners", []))
        ax.set_xticks(range(n), [f"owner {i}" + (" (noisy)" if i in noisy else "") for i in range(n)])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(_title(f"{exp} · {game}: owner values (unit-norm per record)", 120), fontsize=8)
        ax.set(ylabel="value / ‖values‖")
        ax.set_ylim(-1.1, 1.1)
        ax.legend(fontsize=7, ncol=4)
    return save(fig, out)


def plot_detection_roc(groups, out: str | Path) -> Path:
    """Noisy-data detection ROC per valuer (seed of each valuer's newest record), low
    value = flagged bad: example level when the valuer has point values and the record
    says which examples were corrupted, else owner level."""
    from bench.core.metrics import detection_roc
    from bench.tracking.schema import corrupted_mask
    fig, axes = _grid(len(groups), 5, 4.4)
    for ax, ((exp, game), by_valuer) in zip(axes, groups.items()):
        for v, recs in by_valuer.items():
            good = [r for r in ok(recs) if r.get("owner_values")]
            if not good:
                continue
            r = good[-1]
            if r.get("point_values") is not None:
                bad = corrupted_mask(r)        # None for a v1 record (ids not stored)
                if bad is not None and bad.any() and not bad.all() and len(bad) == len(r["point_values"]):
                    ax.plot(*detection_roc(r["point_values"], bad), label=f"{v} (examples)")
                    continue
            labels = np.isin(np.arange(len(r["owner_values"])), r.get("planted", {}).get("noisy_owners", []))
            if labels.any() and not labels.all():
                ax.plot(*detection_roc(r["owner_values"], labels), ls="--", label=f"{v} (owners)")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
        ax.set_title(_title(f"{exp} · {game}: noisy-data detection"), fontsize=8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.55, "no planted noise in this game", ha="center", fontsize=8, color="grey")
    return save(fig, out)


# --------------------------------------------------------------------------- curves

def plot_selection(curve: dict, out_png: str | Path, title: str | None = None) -> Path:
    """Utility vs subset size per method (mean, 95% CI band), full-data and base lines."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    n = curve["n_examples"]
    colors = {"qocs": "tab:blue", "qwcs": "tab:orange", "random": "tab:gray"}
    for m in [x for x in curve["methods"] if x != "all"]:
        s = curve["summary"][m]
        x = np.array(s["counts"]) / n
        mean = np.array([st["mean"] for st in s["stats"]])
        lo = np.array([st["lo"] for st in s["stats"]], dtype=float)
        hi = np.array([st["hi"] for st in s["stats"]], dtype=float)
        ax.plot(x, mean, "o-", color=colors.get(m), label=m.upper() if m != "random" else "random")
        if np.isfinite(lo).all():
            ax.fill_between(x, lo, hi, color=colors.get(m), alpha=0.18)
    if "all" in curve["summary"]:
        a = curve["summary"]["all"]
        ax.axhline(a["mean"], color="black", lw=1.2, label=f"all data ({n})")
        if np.isfinite(a["lo"]):
            ax.axhspan(a["lo"], a["hi"], color="black", alpha=0.08)
    ax.axhline(curve["base_utility"], color="black", ls=":", lw=1, label="base model")
    ax.set_xscale("log")
    xs = np.array(curve["counts"]) / n
    ax.set_xticks(xs, [f"{v:.0%}" for v in xs])
    ax.minorticks_off()
    ax.set_xlabel("subset size (share of the training examples)")
    ax.set_ylabel(f"utility ({curve['metric']})")
    ax.set_title(title or f"SHED data selection, {len(curve['seeds'])} seeds, 95% CI")
    ax.legend(fontsize=8, loc="best")
    return save(fig, out_png)


def plot_budget(table: dict, out: str | Path, title: str) -> Path:
    """Owner ρ and noisy-example AUROC against fine-tunes spent, per valuer
    (``bench.analysis.budget.budget_table``)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for name, pts in table["curves"].items():
        x = [max(p["fine_tunes"], 1) for p in pts]
        style = "o-" if len(pts) > 1 else "s"
        axes[0].plot(x, [np.nan if p["spearman"] is None else p["spearman"] for p in pts], style, label=name)
        if any(p["point_auroc"] is not None for p in pts):
            axes[1].plot(x, [np.nan if p["point_auroc"] is None else p["point_auroc"] for p in pts], style,
                         label=name)
    axes[0].axhline(table["one_seed_exact_spearman"], color="k", ls=":", lw=1, label="one-seed exact")
    axes[1].axhline(0.5, color="k", ls=":", lw=1, label="chance")
    for ax, yl in zip(axes, ("owner Spearman vs exact retraining Shapley", "noisy-example AUROC")):
        ax.set_xscale("log")
        ax.set_xlabel("fine-tunes spent")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, out)
