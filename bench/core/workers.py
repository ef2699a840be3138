"""Pool workers that end with their parent.

A loky worker whose parent job is killed (kill -9, an OOM kill, a scheduler's
preemption) is re-parented and trains on: seen here, two workers at 2.3 GB and 1.6 GB
still training ten minutes after their job was killed, holding the CPU and the
terminal's pipes and skewing every timing after them. ``exit_with_parent`` starts a
daemon thread in the worker that ends the process as soon as its parent is gone.
"""
from __future__ import annotations

import os
import threading
import time


def exit_with_parent(poll_s: float = 1.0) -> threading.Thread:
    """Watch this process's parent; ``os._exit`` when it changes (the parent died and
    the process was re-parented to init or a subreaper). Returns the watcher thread."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(0)
    t = threading.Thread(target=watch, name="dvbench-parent-watch", daemon=True)
    t.start()
    return t
