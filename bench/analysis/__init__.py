"""Over recorded runs: stats.py (confidence intervals), tables.py, plots.py,
report.py (results/report.md), compare.py (regressions vs a baseline), budget.py
(fidelity at equal fine-tune budget)."""
