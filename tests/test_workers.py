"""A pool worker ends when its parent job dies (it used to train on as an orphan)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import pytest

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


def test_a_stuck_worker_stops_the_pool_with_one_line_and_is_killed(tmp_path, monkeypatch):
    """No batch finishing within the stall limit (here 3 s; in a job 20x the slowest
    fine-tune so far, >= 30 min) ends the wait with a TimeoutError that says what to do,
    and the worker still busy is killed, not left training behind the caller's back."""
    import bench.core.game as G
    from pool_worker import SleepyGame
    game = SleepyGame(n_jobs=2)
    assert len(list(G._in_pool(game, [(0.0, None), (0.0, None)]))) == 2     # workers started, untimed
    monkeypatch.setattr(G, "STALL_MIN_S", 3)
    pid_file = tmp_path / "stuck.pid"
    with pytest.raises(TimeoutError, match=r"no fine-tune finished in 3 s .* rerun to resume"):
        list(G._in_pool(game, [(0.0, None), (600.0, str(pid_file))]))
    pid = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stuck worker {pid} still runs")
    G.release_pool()


def test_the_stall_limit_scales_with_the_slowest_fine_tune_and_the_pack():
    from bench.core.game import STALL_FACTOR, STALL_MIN_S, stall_timeout
    from pool_worker import SleepyGame
    game = SleepyGame()
    assert stall_timeout(game) == STALL_MIN_S
    game.log.add(1, {"train_s": 100.0, "eval_s": 20.0}, True)
    game.pack = 8
    assert stall_timeout(game) == max(STALL_MIN_S, STALL_FACTOR * 120.0 * 8)
