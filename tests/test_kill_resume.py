"""Kill and resume, per valuer: a job SIGKILLed during a cache write (its temp file
written, not renamed), during a fine-tune, and during the logging of a record, then
rerun, finishes with values identical to an uninterrupted run; every kill costs at
most the one fine-tune in flight (atomic entries), no stray temp files remain, and
the half-written record line is never read as a result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, subprocess_env

from bench.core.cache import DiskCache, sweep_stale_tmp
from bench.tracking import read_jsonl

SMALL = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]",
         "progress=false", "logger=none", "lds.n_subsets=0"]


POOL = "retrain_shapley+pool"      # the ground truth in a pool of 2 workers (each kill hits a worker or the job)
PACK = "retrain_shapley+pack"      # ... as LoRA adapters packed 3 per pass (game.pack)


def _cmd(out, valuer):
    extra = []
    if valuer == POOL:
        valuer, extra = "retrain_shapley", ["n_jobs=2"]
    elif valuer == PACK:
        valuer, extra = "retrain_shapley", ["train.lora_r=8", "train.lr=1e-2", "game.pack=3"]
    return [sys.executable, "-m", "bench", *SMALL, *extra, f"valuer=[{valuer}]", f"results_dir={out}"]


def _entries(out):
    return sorted((out / "cache" / "utility").glob("*/*.json"))


def _run(out, valuer, kill_at=None):
    env = subprocess_env()
    if kill_at:
        env["DVBENCH_KILL_AT"] = kill_at
    return subprocess.run(_cmd(out, valuer), cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def _kill_during_fine_tune(out, valuer):
    """SIGKILL once training is under way (a new entry appeared, the next one is training)."""
    before = len(_entries(out))
    p = subprocess.Popen(_cmd(out, valuer), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(_entries(out)) <= before and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return p.returncode


def _values(out):
    return {r["valuer"]: (r["owner_values"], r.get("point_values"), r.get("exact_values"))
            for r in read_jsonl(out / "runs" / "smoke.jsonl") if r.get("status") == "ok"}


@pytest.mark.slow
@pytest.mark.parametrize("valuer", ["retrain_shapley", POOL, PACK, "dpo_arithmetic", "logra", "shed"])
def test_kill_and_resume(valuer, tmp_path):
    ref = tmp_path / "ref"
    assert _run(ref, valuer).returncode == 0
    want = _values(ref)
    n_ref = len(_entries(ref))

    out = tmp_path / "killed"
    r = _run(out, valuer, kill_at="cache_write:6")                  # 1: mid cache write
    if valuer == POOL:   # a worker kills itself at its 6th write: the pool is rebuilt once for what is left
        assert 1 <= len(list(out.rglob(".*.tmp"))) <= 4, "each killed writer leaves its one in-flight entry"
        if r.returncode == 0:    # the fresh workers finished the rest: only the killed coalitions were redone
            assert _values(out) == want and len(_entries(out)) == n_ref
            return
        assert "worker died twice" in r.stderr, r.stderr[-2000:]     # their new workers died too
    else:
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert len(list(out.rglob(".*.tmp"))) == 1, "the killed writer left exactly its one in-flight entry"
    assert all(DiskCache(out / "cache").get_json("utility", p.stem) for p in _entries(out))
    k1 = len(_entries(out))
    assert k1 < n_ref                                               # killed before the truth was complete
    rc = _kill_during_fine_tune(out, valuer)                        # 2: mid fine-tune
    if valuer == POOL and rc == 0:   # the pool finished the few coalitions left before the kill landed
        assert _values(out) == want and len(_entries(out)) == n_ref
        return
    assert rc == -signal.SIGKILL
    k2 = len(_entries(out))
    r = _run(out, valuer, kill_at="log:1")                          # 3: mid record line
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "runs" / "smoke.jsonl").read_bytes()[-1:] != b"\n"   # half a line on disk
    assert _values(out) == {}                                       # ... never read as a result
    k3 = len(_entries(out))
    assert k1 <= k2 <= k3 <= n_ref                                  # entries only accumulate

    print(f"{valuer}: cache entries after kill 1/2/3: {k1}/{k2}/{k3}, reference {n_ref}")
    final = _run(out, valuer)
    assert final.returncode == 0, final.stderr[-2000:]
    assert len(_entries(out)) == n_ref                              # nothing trained twice into the cache
    assert _values(out) == want                                     # identical to the uninterrupted run
    assert not list(out.rglob(".*.tmp")), "no stray temp files"
    assert sweep_stale_tmp(out) == 0
    json.dumps(_values(out))
