"""A stand-in game for the worker-pool tests: importable by loky's workers (they get
the parent's ``sys.path``), trains nothing. A batch ``(seconds, pid_file)`` writes the
worker's pid to ``pid_file`` (if given) and sleeps ``seconds``."""
from __future__ import annotations

import os
import time

from bench.core.metering import UseLog


class SleepyGame:
    def __init__(self, n_jobs: int = 2):
        from bench.core.game import code_version
        self.n_jobs, self.pack, self.log = n_jobs, 1, UseLog()
        self._static = {"code": code_version()}        # what a worker checks against its own code

    def _get_or_compute_batch(self, batch: tuple) -> list[tuple]:
        seconds, pid_file = batch
        if pid_file:
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(seconds)
        return [(batch, {"pid": os.getpid()}, True)]
