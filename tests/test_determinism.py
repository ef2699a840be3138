"""Determinism on CPU: the same config and seed, run twice from empty caches in two
processes, gives identical values for every valuer (bit for bit)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

SMALL = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]",
         "progress=false", "logger=none"]


def _run(out, valuers, extra=()):
    p = subprocess.run([sys.executable, "-m", "bench", *SMALL, f"valuers={valuers}", f"results_dir={out}", *extra],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return {r["valuer"]: r for r in map(json.loads, (out / "runs" / "smoke.jsonl").read_text().splitlines())}


def _check(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name]["status"] == b[name]["status"] == "ok", name
        assert a[name]["owner_values"] == b[name]["owner_values"], name
        assert a[name].get("point_values") == b[name].get("point_values"), name
        assert a[name]["utility_table"] == b[name]["utility_table"], name


def test_two_cpu_runs_give_identical_values(tmp_path):
    valuers = "[loo,mc_shapley,dpo_arithmetic]"
    _check(_run(tmp_path / "a", valuers), _run(tmp_path / "b", valuers))


@pytest.mark.slow
def test_two_cpu_runs_of_every_valuer_are_identical(tmp_path):
    extra = ["lds.n_subsets=3"]
    _check(_run(tmp_path / "a", "all", extra), _run(tmp_path / "b", "all", extra))
