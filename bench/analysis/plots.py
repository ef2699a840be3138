"""Plots of recorded runs and curves (matplotlib, Agg backend, PNG files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_selection(curve: dict, out_png: str | Path, title: str | None = None) -> Path:
    """Utility vs subset size per method (mean, 95% CI band), full-data and base lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
