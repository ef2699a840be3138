"""Config → objects and the job: build.py (task, game, valuers from Hydra config),
checks.py (every setting checked before any work), job.py (exact reference, each
valuer under its budget, metrics, one record per valuer)."""
