"""End to end through the real CLI (``python -m bench``) in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, code_version, skip_if_code_changed, subprocess_env

# The smoke experiment (owner 2 = flipped tone pairs), made smaller but kept real.
SMALL = ["task.n_train_per_source=40", "partition.sizes=[20,20,20]", "task.n_eval_per_source=20",
         "task.n_warmup_per_source=60", "model.n_embd=64", "train.epochs=3",
         "valuer_args.mc_shapley.max_permutations=3"]
VALUERS = {"random", "loo", "retrain_shapley", "mc_shapley"}


def run_cli(args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def smoke_args(results: Path) -> list[str]:
    # the foundation's valuers (each method's own e2e test lives in its test file, marked slow)
    return ["experiment=smoke", "logger=none", f"results_dir={results}", f"cache_dir={results}/cache",
            "n_jobs=1", "progress=false", "valuers=[random,loo,retrain_shapley,mc_shapley,dpo_arithmetic]",
            *SMALL]


def read_runs(results: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted((results / "runs").glob("*.jsonl"))}


def cache_state(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns
            for kind in ("utility", "stage") for p in (results / "cache" / kind).glob("*/*")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    version = code_version()
    proc = run_cli(smoke_args(results))
    return results, proc, version


def expected_valuers(rec) -> list[str]:
    names = rec["config"]["valuers"]
    if names == "all":
        from bench.harness.build import available_valuers
        return available_valuers()
    return list(names)


def _get(rec, dotted):
    cur = rec
    for part in dotted.split("."):
        assert isinstance(cur, dict) and part in cur, f"missing {dotted}"
        cur = cur[part]
    return cur


CONTRACT = ["experiment", "valuer", "game", "seed", "n_owners", "commit", "dirty", "config_hash", "hardware",
            "status", "owner_values", "schema", "planted.noisy_owners", "planted.duplicate_pairs", "planted.corrupted_ids",
            *(f"metrics.fidelity.{k}" for k in ("spearman", "kendall", "pearson", "rel_l2", "topk",
                                                 "efficiency_gap")),
            "metrics.noise_ceiling",
            *(f"metrics.detection.{k}" for k in ("auroc", "auprc", "precision_at_k", "f1")),
            *(f"cost.{k}" for k in ("wall_s", "device", "device_s", "gpu_hours", "fine_tunes",
                                    "fine_tunes_cached", "peak_mem_bytes"))]


def test_smoke_run_records(smoke):
    results, proc, _ = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = read_runs(results)
    assert list(runs) == ["smoke.jsonl"]
    recs = [json.loads(line) for line in runs["smoke.jsonl"]]
    expected = expected_valuers(recs[0])
    assert VALUERS <= set(expected), expected
    assert sorted(r["valuer"] for r in recs) == sorted(expected), "one record per valuer"
    for r in recs:
        for key in CONTRACT:
            _get(r, key)
        assert r["status"] == "ok" and r["error"] is None
        assert r["experiment"] == "smoke" and r["game"] == "union" and r["seed"] == 0 and r["n_owners"] == 3
        assert r["planted"]["noisy_owners"] == [2] and r["planted"]["duplicate_pairs"] == []
        assert r["owner_sizes"] == [20, 20, 20]
        assert len(r["owner_values"]) == 3 and all(np.isfinite(r["owner_values"]))
        assert r["cost"]["device"] == "cpu" and r["cost"]["gpu_hours"] == 0
        assert isinstance(r["dirty"], bool) and len(r["config_hash"]) == 12
    by = {r["valuer"]: r for r in recs}
    assert len({r["config_hash"] for r in recs}) == 1
    assert by["random"]["cost"]["fine_tunes"] == 0
    assert by["loo"]["cost"]["fine_tunes"] == 4                 # N and the three N\{i}
    assert by["retrain_shapley"]["cost"]["fine_tunes"] == 7     # every non-empty coalition
    assert 1 <= by["mc_shapley"]["cost"]["fine_tunes"] <= 7


def test_exact_shapley_is_efficient_and_finds_the_noisy_owner(smoke):
    results, proc, _ = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {json.loads(line)["valuer"]: json.loads(line) for line in read_runs(results)["smoke.jsonl"]}
    r = recs["retrain_shapley"]
    table = np.array(r["utility_table"], dtype=float)
    phi = np.array(r["owner_values"])
    assert len(table) == 8 and np.isfinite(table).all()
    assert phi.sum() == pytest.approx(table[-1] - table[0], abs=1e-9), "efficiency: Σφ = v(N) − v(∅)"
    np.testing.assert_allclose(phi, r["exact_values"], atol=1e-12)
    assert r["metrics"]["fidelity"]["rel_l2"] == pytest.approx(0, abs=1e-9)
    assert r["metrics"]["fidelity"]["efficiency_gap"] == pytest.approx(0, abs=1e-9)
    # the owner holding flipped preferences is worth the least, under both training seeds
    assert int(np.argmin(phi)) == 2, f"exact Shapley {phi.tolist()}, table {table.tolist()}"
    assert phi[2] < 0, phi.tolist()
    phi2 = np.array(r["exact_values_seed2"])
    assert int(np.argmin(phi2)) == 2, f"second-seed Shapley {phi2.tolist()}"
    assert r["metrics"]["detection"]["auroc"] == 1.0
    # leave-one-out on the same table
    loo = recs["loo"]["owner_values"]
    np.testing.assert_allclose(loo, [table[7] - table[7 & ~(1 << i)] for i in range(3)], atol=1e-12)


def test_rerun_trains_nothing(smoke):
    results, proc, version = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    skip_if_code_changed(version)
    before_cache = cache_state(results)
    assert sum(k.startswith("cache/utility") for k in before_cache) == 16   # 8 coalitions × 2 seeds
    n_before = len(read_runs(results)["smoke.jsonl"])
    proc2 = run_cli(smoke_args(results))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    skip_if_code_changed(version)
    lines = read_runs(results)["smoke.jsonl"]
    assert len(lines) == n_before + len(expected_valuers(json.loads(lines[-1])))
    first = {json.loads(x)["valuer"]: json.loads(x) for x in lines[:n_before]}
    second = {json.loads(x)["valuer"]: json.loads(x) for x in lines[n_before:]}
    r = second["retrain_shapley"]
    assert r["status"] == "ok"
    assert r["cost"]["fine_tunes"] == 7 and r["cost"]["fine_tunes_cached"] == r["cost"]["fine_tunes"]
    for name in ("loo", "mc_shapley", "random"):
        assert second[name]["cost"]["fine_tunes_cached"] == second[name]["cost"]["fine_tunes"]
    assert cache_state(results) == before_cache, "no cache entry was added or rewritten"
    assert r["owner_values"] == first["retrain_shapley"]["owner_values"]
    assert r["utility_table"] == first["retrain_shapley"]["utility_table"]


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr should be one line, got:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _check_bad(results: Path, args, *expect):
    before = read_runs(results)
    proc = run_cli(args, timeout=300)
    assert proc.returncode != 0, f"exit 0 for {args[-2:]}; stdout:\n{proc.stdout[-2000:]}"
    line = _error_line(proc)
    for word in expect:
        assert word in line, line
    assert read_runs(results) == before, "a failed run must not write records"


BAD = {
    "model": (["model=nope"], ("model", "nope", "tiny")),
    "valuer": (["valuers=[nope]"], ("valuers", "nope", "retrain_shapley")),
    "empty_owner": (["partition.sizes=[0,20,20]"], ("partition", "owner 0")),
    "lds": (["lds.n_subsets=2"], ("lds", "n_subsets")),   # refused before any fine-tune
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(smoke, case):
    results, _, _ = smoke
    extra, expect = BAD[case]
    _check_bad(results, smoke_args(results) + extra, *expect)


def test_bad_input_too_many_owners(smoke):
    results, _, _ = smoke
    _check_bad(results, smoke_args(results) + ["partition.n_owners=100000", "partition=iid"], "n_owners")


def test_bad_input_results_dir_under_a_file(smoke, tmp_path):
    results, _, _ = smoke
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    args = [a for a in smoke_args(results) if not a.startswith(("results_dir=", "cache_dir="))]
    before = read_runs(results)
    _check_bad(results, args + [f"results_dir={afile}/sub"], "results_dir")
    assert read_runs(results) == before and afile.read_text() == "not a folder"


def _local_args(results: Path, path: Path) -> list[str]:
    return ["logger=none", f"results_dir={results}", f"cache_dir={results}/cache", "n_jobs=1",
            "progress=false", "task=local_pref", f"task.path={path}"]


def test_bad_input_local_file_missing_column(smoke, tmp_path):
    results, _, _ = smoke
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "rejected": "no"}) + "\n" for i in range(5)))
    _check_bad(results, _local_args(results, path), "task.path", "'chosen'")


def test_bad_input_local_file_empty(smoke, tmp_path):
    results, _, _ = smoke
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    _check_bad(results, _local_args(results, path), "task.path", "empty")


def test_bad_input_local_file_with_experiment(smoke, tmp_path):
    results, _, _ = smoke
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "rejected": "no"}) + "\n" for i in range(5)))
    _check_bad(results, smoke_args(results) + ["task=local_pref", f"task.path={path}"], "'chosen'")
