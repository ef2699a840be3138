"""A pool worker ends when its parent job dies (it used to train on as an orphan)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import REPO

PARENT = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "from bench.core.workers import exit_with_parent; "
                          "import time; exit_with_parent(0.1); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_worker_exits_when_its_parent_is_killed():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    os.kill(child, 0)                                   # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:                                            # reap it if it became our zombie
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the worker outlived its parent by 10 s")


def test_every_pool_worker_starts_the_watch(monkeypatch):
    import torch

    from bench.core import game, workers
    calls = []
    monkeypatch.setattr(workers, "exit_with_parent", lambda *a, **k: calls.append(1))
    threads = torch.get_num_threads()
    try:
        game._init_worker(2)
    finally:
        torch.set_num_threads(threads)
    assert calls == [1]
