"""``results/report.md``: the tables and plots of recorded runs in one markdown file (the
program: ``bench/cli/report.py``; tables in ``tables``, plots in ``plots``)."""
from __future__ import annotations

import re
from pathlib import Path

from bench.analysis.plots import plot_detection_roc, plot_frontier, plot_owner_values, plot_selection
from bench.analysis.stats import ok
from bench.analysis.tables import format_table, summarize


def write_report(records: list[dict], out_md: str | Path) -> Path:
    """``out_md`` (markdown tables, mean ± 95% CI over seeds) plus PNGs in a folder
    next to it: fidelity-vs-cost frontier, owner values, detection ROC, and every
    selection curve found in the records."""
    from bench.core.cache import atomic_write_bytes
    from bench.tracking.provenance import utc_timestamp
    out_md = Path(out_md)
    figs = out_md.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    groups = {k: v for k, v in summarize(records).items()     # groups with owner values to plot
              if any(r.get("owner_values") for rs in v.values() for r in ok(rs))}
    parts = [f"# dvbench report\n\n{len(records)} records, generated {utc_timestamp()} by "
             f"`python -m bench report --out {out_md}`. Cells: mean ± 95% CI half-width over seeds "
             f"(newest record per seed); `n` counts seeds (ok/all).\n",
             format_table(records, markdown=True)]
    pngs = [("Fidelity vs cost", plot_frontier(groups, figs / "frontier.png")),
            ("Owner values", plot_owner_values(groups, figs / "owner_values.png")),
            ("Noisy-data detection", plot_detection_roc(groups, figs / "detection_roc.png"))]
    for (exp, game), by_valuer in groups.items():
        for v, recs in by_valuer.items():
            for r in ok(recs):
                sel = (r.get("metrics") or {}).get("selection")
                if sel:
                    stem = re.sub(r"[^\w.=-]+", "_", f"selection_{exp}_{game}_{v}_s{r['seed']}")[:120]
                    p = plot_selection(sel, figs / f"{stem}.png",
                                       title=f"{exp}: {v} selection ({len(sel['seeds'])} seeds, 95% CI)")
                    pngs.append((f"Selection: {exp} {v} seed {r['seed']}", p))
    parts += [f"## {title}\n\n![{title}]({p.relative_to(out_md.parent)})" for title, p in pngs]
    atomic_write_bytes(out_md, ("\n\n".join(parts) + "\n").encode())
    return out_md
