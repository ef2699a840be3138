"""End to end through the CLI (``bench.cli.main`` in this process: the session's
``smoke_run`` and ``run_cli``), and the real entry points (``python -m bench`` and the
``dvbench`` console script) in subprocesses (their exit status and one-line errors;
test_determinism runs a whole job through ``python -m bench``)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, skip_if_code_changed, smoke_args, subprocess_env, read_records

VALUERS = {"random", "loo", "retrain_shapley", "mc_shapley"}


def read_runs(results: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted((results / "runs").glob("*.jsonl"))}


def cache_state(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns
            for kind in ("utility", "stage") for p in (results / "cache" / kind).glob("*/*")}


@pytest.fixture(scope="module")
def smoke(smoke_run):
    """(results dir, (exit code, stdout, stderr), code version) of the session's smoke job."""
    return smoke_run.results, (smoke_run.code, smoke_run.stdout, smoke_run.stderr), smoke_run.version


def expected_valuers(rec) -> list[str]:
    """The baselines, then every valuer the config selected (``valuer.<name>`` with a target)."""
    chosen = [n for n, v in rec["config"]["valuer"].items() if isinstance(v, dict) and "_target_" in v]
    return list(dict.fromkeys(["random", "retrain_shapley", *chosen]))


def _get(rec, dotted):
    cur = rec
    for part in dotted.split("."):
        assert isinstance(cur, dict) and part in cur, f"missing {dotted}"
        cur = cur[part]
    return cur


CONTRACT = ["experiment", "valuer", "game", "seed", "seeds", "job", "reference_values", "consensus.values",
            "consensus.se", "consensus.split_half_spearman", "planted.corruption", "n_owners", "commit", "dirty", "config_hash", "hardware",
            "status", "owner_values", "schema", "planted.noisy_owners", "planted.duplicate_pairs", "planted.corrupted_ids",
            *(f"metrics.fidelity.{k}" for k in ("spearman", "kendall", "pearson", "rel_l2", "topk",
                                                 "efficiency_gap")),
            "metrics.one_seed_exact", "metrics.detection_graded.concordance",
            *(f"metrics.detection.{k}" for k in ("auroc", "auprc", "precision_at_k", "f1")),
            *(f"cost.{k}" for k in ("wall_s", "device", "device_s", "gpu_hours", "gpus", "cpu_only_s",
                                    "peak_gpu_mem_bytes", "fine_tunes",
                                    "fine_tunes_cached", "peak_mem_bytes"))]


def _ok(proc):
    code, _, err = proc
    assert code == 0, err[-3000:]


def test_smoke_run_records(smoke, smoke_run):
    results, proc, _ = smoke
    _ok(proc)
    assert list(read_runs(results)) == ["smoke.jsonl"]
    recs = smoke_run.records
    expected = expected_valuers(recs[0])
    assert VALUERS <= set(expected), expected
    assert sorted((r["valuer"], r["seed"]) for r in recs) == sorted((v, s) for v in expected for s in (0, 1)), \
        "one record per valuer and seed"
    assert len({r["job"] for r in recs}) == 1
    for r in recs:
        for key in CONTRACT:
            _get(r, key)
        assert r["status"] == "ok" and r["error"] is None
        assert r["experiment"] == "smoke" and r["game"] == "union" and r["seeds"] == [0, 1] and r["n_owners"] == 3
        assert r["planted"]["noisy_owners"] == [2] and r["planted"]["duplicate_pairs"] == []
        assert r["owner_sizes"] == [20, 20, 20]
        assert len(r["owner_values"]) == 3 and all(np.isfinite(r["owner_values"]))
        assert r["cost"]["device"] == "cpu" and r["cost"]["gpu_hours"] == 0
        assert isinstance(r["dirty"], bool) and len(r["config_hash"]) == 12
    by = {r["valuer"]: r for r in recs if r["seed"] == 0}
    assert len({r["config_hash"] for r in recs}) == 1
    assert by["random"]["cost"]["fine_tunes"] == 0
    assert by["loo"]["cost"]["fine_tunes"] == 4                 # N and the three N\{i}
    assert by["retrain_shapley"]["cost"]["fine_tunes"] == 7     # every non-empty coalition
    assert 1 <= by["mc_shapley"]["cost"]["fine_tunes"] <= 7
    # what the job prints: the table, the exact values, where the records went
    out = proc[1]
    assert "consensus exact retraining Shapley over seeds [0, 1]" in out and "vs random" in out
    assert str(results / "runs" / "smoke.jsonl") in out


def test_exact_shapley_is_efficient_and_finds_the_noisy_owner(smoke, smoke_run):
    _, proc, _ = smoke
    _ok(proc)
    by = {(r["valuer"], r["seed"]): r for r in smoke_run.records}
    for seed, other in ((0, 1), (1, 0)):
        r = by["retrain_shapley", seed]
        table = np.array(r["utility_table"], dtype=float)
        phi = np.array(r["owner_values"])
        assert len(table) == 8 and np.isfinite(table).all()
        assert phi.sum() == pytest.approx(table[-1] - table[0], abs=1e-9), "efficiency: Σφ = v(N) − v(∅)"
        np.testing.assert_allclose(phi, r["exact_values"], atol=1e-12)
        # with two seeds each seed's reference is the other seed's exact values, and the
        # exact values of this seed scored against it are the noise ceiling
        np.testing.assert_allclose(r["reference_values"], by["retrain_shapley", other]["exact_values"], atol=1e-12)
        assert r["metrics"]["fidelity"] == r["metrics"]["one_seed_exact"]
        np.testing.assert_allclose(r["consensus"]["values"], (phi + np.array(r["reference_values"])) / 2, atol=1e-12)
        # the owner holding flipped preferences is worth the least, under both training seeds
        assert int(np.argmin(phi)) == 2, f"exact Shapley {phi.tolist()}, table {table.tolist()}"
        assert phi[2] < 0, phi.tolist()
        assert r["metrics"]["detection"]["auroc"] == 1.0
        assert r["planted"]["corruption"] == [0.0, 0.0, 1.0]
        # leave-one-out on the same table
        loo = by["loo", seed]["owner_values"]
        np.testing.assert_allclose(loo, [table[7] - table[7 & ~(1 << i)] for i in range(3)], atol=1e-12)


def test_rerun_trains_nothing(smoke, smoke_run):
    results, proc, version = smoke
    _ok(proc)
    skip_if_code_changed(version)
    before_cache = cache_state(results)
    assert sum(k.startswith("cache/utility") for k in before_cache) == 16   # 8 coalitions × 2 seeds
    n_before = len(read_runs(results)["smoke.jsonl"])    # other tests may have rerun it already
    proc2 = run_cli(smoke_args(results))
    _ok(proc2)
    skip_if_code_changed(version)
    lines = read_runs(results)["smoke.jsonl"]
    assert len(lines) == n_before + 2 * len(expected_valuers(read_records(results)[-1]))    # 2 seeds
    first = {r["valuer"]: r for r in smoke_run.records if r["seed"] == 1}
    second = {json.loads(x)["valuer"]: json.loads(x) for x in lines[n_before:] if json.loads(x)["seed"] == 1}
    r = second["retrain_shapley"]
    assert r["status"] == "ok"
    assert r["cost"]["fine_tunes"] == 7 and r["cost"]["fine_tunes_cached"] == r["cost"]["fine_tunes"]
    for name in ("loo", "mc_shapley", "random", "dpo_arithmetic"):
        assert second[name]["cost"]["fine_tunes_cached"] == second[name]["cost"]["fine_tunes"], name
        assert second[name]["owner_values"] == first[name]["owner_values"], name
    assert cache_state(results) == before_cache, "no cache entry was added or rewritten"
    assert r["owner_values"] == first["retrain_shapley"]["owner_values"]
    assert r["utility_table"] == first["retrain_shapley"]["utility_table"]


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr should be one line, got:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _check_bad(results: Path, args, *expect):
    before = read_runs(results)
    code, out, err = run_cli(args)
    assert code == 2, f"exit {code} for {args[-2:]}; stdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    line = _error_line(err)
    for word in expect:
        assert word in line, line
    assert read_runs(results) == before, "a failed run must not write records"


BAD = {
    "model": (["model=nope"], ("model", "nope", "tiny")),
    "valuer": (["valuer=[nope]"], ("valuer=nope", "no such config", "retrain_shapley")),
    "empty_owner": (["partition.sizes=[0,20,20]"], ("partition", "owner 0")),
    "lds": (["lds.n_subsets=2"], ("lds", "n_subsets")),   # refused before any fine-tune
    "too_many_owners": (["partition.n_owners=100000", "partition=iid"], ("n_owners",)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(smoke, case):
    results, _, _ = smoke
    extra, expect = BAD[case]
    _check_bad(results, smoke_args(results) + extra, *expect)


def test_bad_input_results_dir_under_a_file(smoke, tmp_path):
    results, _, _ = smoke
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    args = [a for a in smoke_args(results) if not a.startswith(("results_dir=", "cache_dir="))]
    before = read_runs(results)
    _check_bad(results, args + [f"results_dir={afile}/sub"], "results_dir")
    assert read_runs(results) == before and afile.read_text() == "not a folder"


def _local_args(results: Path, path: Path) -> list[str]:
    return ["logger=none", f"results_dir={results}", f"cache_dir={results}/cache", f"hydra.run.dir={results}/hydra",
            "n_jobs=1", "progress=false", "task=local_pref", f"task.path={path}"]


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


def _console_script() -> list[str]:
    """The ``dvbench`` console script: the installed one when it is, else what pip's
    generated wrapper runs for pyproject's ``[project.scripts]`` entry."""
    installed = Path(sys.executable).with_name("dvbench")
    if installed.exists():
        return [str(installed)]
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
        target = tomllib.loads(text)["project"]["scripts"]["dvbench"]
    except ImportError:                                   # Python 3.10
        target = re.search(r'^dvbench\s*=\s*"([^"]+)"', text, re.M).group(1)
    module, func = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.argv[0] = 'dvbench'; "
                                  f"sys.exit({func}())"]


ENTRY_POINTS = {"python -m bench": lambda: [sys.executable, "-m", "bench"], "dvbench": _console_script}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point(entry, tmp_path):
    """The real entry points, each in its own interpreter: the usage, and a bad argument's
    exit status and one-line message (test_determinism runs a whole job through
    ``python -m bench``)."""
    def bench(*args):
        return subprocess.run([*ENTRY_POINTS[entry](), *args], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
    usage = bench("--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: dvbench"), usage.stderr[-2000:]
    bad = bench("experiment=smoke", f"results_dir={tmp_path}", "model=nope")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert _error_line(bad.stderr) == "error: model=nope: no such config; choose one of ['hf', 'smollm2-135m', 'tiny']"
    assert not (tmp_path / "runs").exists()
