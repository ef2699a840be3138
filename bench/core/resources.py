"""Memory of this process: its lifetime peak, the current resident set, and the peak
while a block of code runs."""
from __future__ import annotations

import resource
import threading


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident memory of this process now (psutil)."""
    import psutil
    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Largest resident set size (psutil) seen while the block runs, sampled by a
    background thread every ``every_s`` seconds and once more at the end::

        with PeakRSS() as mem:
            work()
        mem.peak, mem.delta      # bytes: the peak, and its growth over the start

    Sampling can miss a spike shorter than ``every_s``; ``peak_rss_bytes()`` is the
    process's exact lifetime peak, but cannot be reset for one block.
    """

    def __init__(self, every_s: float = 0.002):
        import psutil
        self.every_s, self.start, self.peak = every_s, 0, 0
        self._proc, self._stop, self._thread = psutil.Process(), threading.Event(), None

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakRSS", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False

    @property
    def delta(self) -> int:
        """Growth of the resident set over its size at the start of the block (bytes)."""
        return self.peak - self.start
