"""Results store, provenance, W&B mirror, compare and report (fast, no network)."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line
from store_worker import append_many

from bench.analysis import tables
from bench.cli import compare
from bench.cli import report as report_cli
from bench.core.errors import ConfigError, fail
from bench.tracking.schema import VERSION
from bench.tracking import (ResultsStore, WandbLogger, config_hash, flatten_metrics, git_info,
                            hardware_fingerprint, latest, read_jsonl, to_jsonable)


def make_record(valuer="exact", seed=0, commit="a" * 40, experiment="toy", game="union",
                spearman=0.9, auroc=0.8, rel_l2=0.2, wall_s=10.0, fine_tunes=15, status="ok",
                ts="2025-01-01T00:00:00+00:00"):
    ok = status == "ok"
    fid = {"spearman": spearman, "kendall": 0.8, "pearson": 0.95, "rel_l2": rel_l2,
           "topk": 1.0, "efficiency_gap": 0.01}
    return {
        "experiment": experiment, "valuer": valuer, "game": game, "seed": seed, "n_owners": 4,
        "commit": commit, "dirty": False, "config_hash": "0" * 12,
        "hardware": {"id": "hw0"}, "timestamp": ts, "status": status,
        "error": None if ok else "boom",
        "owner_values": [0.1, 0.2, -0.3, 0.05] if ok else [],
        "truth": {"noisy_owners": [2], "duplicate_pairs": [[0, 1]]},
        "metrics": {"fidelity": fid if ok else {}, "one_seed_exact": dict(fid, spearman=0.95),
                    "detection": {"auroc": auroc, "auprc": 0.7, "precision_at_k": 1.0, "f1": 1.0}
                    if ok else {}},
        "cost": {"wall_s": wall_s, "device": "cpu", "device_s": wall_s, "gpu_hours": 0.0,
                 "fine_tunes": fine_tunes, "fine_tunes_cached": 0, "peak_mem_bytes": 1 << 20,
                 "phases": {"train": wall_s}},
        "config": {"valuer": {"name": valuer}},
    }


# --------------------------------------------------------------------------- store

def test_round_trip_and_nan_is_null(tmp_path):
    store = ResultsStore(tmp_path)
    rec = make_record(spearman=float("nan"))
    rec["owner_values"] = np.array([1.0, np.nan, np.inf, np.float32(0.5)])
    rec["seed"] = np.int64(3)
    path = store.append(rec)
    assert path == tmp_path / "runs" / "toy.jsonl"
    text = path.read_text()
    assert text.count("\n") == 1 and "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    [back] = store.read("toy")
    assert back["metrics"]["fidelity"]["spearman"] is None
    assert back["owner_values"] == [1.0, None, None, 0.5] and back["seed"] == 3
    assert store.read() == [back] and store.read("other") == []


def test_v1_records_are_upgraded_on_read(tmp_path):
    """The committed baseline results/baselines/quick.jsonl is schema v1 (``truth``,
    ``truth_values``); read_jsonl and ResultsStore give current (schema-3) records, whose
    fidelity reference is the record's own exact values (one seed per job then)."""
    v1 = REPO / "results" / "baselines" / "quick.jsonl"
    raw = [json.loads(line) for line in v1.read_text().splitlines() if line.strip()]
    assert raw and all("schema" not in r and "truth" in r for r in raw)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quick.jsonl").write_bytes(v1.read_bytes())
    for recs in (read_jsonl(v1), ResultsStore(tmp_path).read("quick"), ResultsStore(tmp_path).read()):
        assert len(recs) == len(raw)
        for old, new in zip(raw, recs):
            assert new["schema"] == VERSION and new["seeds"] == [old["seed"]] and new["job"] is None
            assert new["exact_values"] == old["truth_values"] == new["reference_values"]
            assert new["exact_values_seed2"] == old["truth_values_seed2"]
            assert new["planted"]["noisy_owners"] == old["truth"]["noisy_owners"]
            assert new["planted"]["duplicate_pairs"] == old["truth"]["duplicate_pairs"]
            assert new["planted"]["corrupted_ids"] is None        # v1 did not store them
            assert {"truth", "truth_values", "truth_values_seed2"}.isdisjoint(new)
            assert set(new["valuation"]) == {"table", "clusters", "cluster_scores", "trajectory"}
    assert v1.read_bytes() == (tmp_path / "runs" / "quick.jsonl").read_bytes()   # read-only: never rewritten


def test_v3_records_are_rescored_tie_aware_on_read():
    """v3 ranked values 1e-18 apart apart and called one seed predicting another the LDS
    ceiling; reading one gives the v4 statistics from its stored values."""
    from bench.core.lds import sb_ceiling
    from bench.tracking.schema import upgrade
    ref = [0.040, 0.012, 0.009, 0.005, -0.020, 0.012]
    vals = list(ref)
    vals[5] += 3.5e-18
    v3 = {"schema": 3, "status": "ok", "owner_values": vals, "reference_values": ref, "exact_values": vals,
          "planted": {"corruption": [0, 0, 0, 0, 1.0, 0]}, "lds_targets": {"seeds": [0, 1]},
          "metrics": {"fidelity": {"spearman": 0.986, "efficiency_gap": 0.01}, "noise_ceiling": {"spearman": 0.98},
                      "detection_graded": {"kendall_tau": 0.58},
                      "lds_pair": {"lds": 0.4, "ceiling": 0.5, "ratio": 0.8}, "lds_pair_bt": {"lds": 0.4}}}
    new = upgrade(v3)
    m = new["metrics"]
    assert new["schema"] == VERSION and new["rescored"] and "noise_ceiling" not in m and "lds_pair_bt" not in m
    assert m["fidelity"]["spearman"] == 1.0 and m["fidelity"]["efficiency_gap"] == 0.01
    assert m["one_seed_exact"]["spearman"] == 1.0 and m["detection_graded"]["concordance"] == 1.0
    assert m["lds_pair"]["ceiling"] == pytest.approx(float(sb_ceiling(0.5, 2))) and m["lds_pair"]["ceiling"] > 0.5
    assert m["lds_pair"]["ratio"] == pytest.approx(0.4 / m["lds_pair"]["ceiling"])
    assert v3["metrics"]["lds_pair"]["ceiling"] == 0.5, "the record read is not changed in place"


def test_truncated_last_line_is_skipped_and_next_append_survives(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(make_record(seed=0))
    path = store.append(make_record(seed=1))
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # a writer died mid-line
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        assert [r["seed"] for r in store.read("toy")] == [0]
    store.append(make_record(seed=2))  # must start on a fresh line
    with pytest.warns(RuntimeWarning):
        assert [r["seed"] for r in store.read("toy")] == [0, 2]


def test_concurrent_appends_from_processes(tmp_path):
    ctx = mp.get_context("spawn")
    start, n = ctx.Event(), 25
    procs = [ctx.Process(target=append_many, args=(tmp_path, w, n, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "runs" / "toy.jsonl").read_text().splitlines()
    assert len(lines) == 4 * n
    recs = [json.loads(line) for line in lines]
    for w in range(4):
        mine = [r for r in recs if r["valuer"] == f"w{w}"]
        assert [r["seed"] for r in mine] == list(range(n))
        assert all(set(r["owner_values"]) == {float(w)} for r in mine)


def test_unwritable_folder_fails_fast_with_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    store = ResultsStore(blocker / "results")
    with pytest.raises(ConfigError) as exc:
        store.check_writable()
    msg = str(exc.value)
    assert "\n" not in msg and str(blocker / "results") in msg and "results_dir=" in msg
    with pytest.raises(ConfigError):
        store.append(make_record())
    assert blocker.read_text() == "x" and sorted(tmp_path.iterdir()) == [blocker]


def test_check_writable_leaves_no_probe(tmp_path):
    ResultsStore(tmp_path / "r").check_writable()
    assert list((tmp_path / "r" / "runs").iterdir()) == []


def test_fail_prints_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        fail("results_dir: nope")
    assert exc.value.code == 2 and capsys.readouterr().err == "error: results_dir: nope\n"


# --------------------------------------------------------------------------- provenance

def test_config_hash_stable_and_ignores_volatile_keys():
    a = {"model": {"name": "tiny", "lr": 1e-3}, "seed": 0, "results_dir": "/x"}
    b = {"seed": 0, "results_dir": "/elsewhere", "model": {"lr": 1e-3, "name": "tiny"},
         "hydra": {"run": {"dir": "out"}}}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12
    assert config_hash(a) != config_hash({**a, "seed": 1})


def test_to_jsonable():
    @dataclasses.dataclass
    class Cost:
        wall_s: float
        where: Path

    out = to_jsonable({"c": Cost(np.float64(1.5), Path("/tmp/x")), 1: (np.bool_(True), -np.inf),
                       "a": np.arange(3, dtype=np.int32)})
    assert out == {"c": {"wall_s": 1.5, "where": "/tmp/x"}, "1": [True, None], "a": [0, 1, 2]}
    assert type(out["a"][0]) is int


def test_hardware_fingerprint_keys():
    hw = hardware_fingerprint()
    for k in ("platform", "python", "machine", "cpu", "n_cpus", "ram_bytes", "torch", "cuda",
              "gpus", "id"):
        assert k in hw
    assert len(hw["id"]) == 12
    # the id is recomputed from the machine (not a cached value compared with itself) ...
    from bench.tracking import system
    system._hardware.cache_clear()
    assert hardware_fingerprint()["id"] == hw["id"]
    # ... and depends on what it names: another CPU count is another machine
    system._hardware.cache_clear()
    real = os.cpu_count
    try:
        os.cpu_count = lambda: (real() or 1) + 1
        assert hardware_fingerprint()["id"] != hw["id"]
    finally:
        os.cpu_count = real
        system._hardware.cache_clear()


def test_git_info_never_raises(tmp_path):
    assert git_info(tmp_path)["commit"] == "unknown"
    info = git_info()
    assert set(info) == {"commit", "dirty"} and isinstance(info["dirty"], bool)


# --------------------------------------------------------------------------- W&B

def test_wandb_offline_writes_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network use would fail
    monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / "values.json").write_text("[1, 2]")
    recs = [make_record(valuer="exact"), make_record(valuer="tmc", spearman=float("nan"))]
    with WandbLogger("offline", project="dvbench-test", dir=tmp_path / "wb", run_name="t",
                     config={"a": 1}, tags=["test"]) as lg:
        assert os.environ["WANDB_DIR"] == str(tmp_path / "wb")
        flat = lg.log_record(recs[0])
        assert flat["fidelity/spearman"] == 0.9 and flat["cost/fine_tunes"] == 15
        lg.log_tables(recs)
        from bench.analysis.verdicts import verdict_tables
        tables = verdict_tables(recs)
        assert tables, "the leaderboard goes to W&B too"
        for name, (cols, rows) in tables.items():
            lg.log_table(name, cols, rows)
        lg.log_artifact(tmp_path / "values.json", "point values/exact", type="values")
    assert "WANDB_DIR" not in os.environ
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"leaderboard" in data, "the leaderboard table is in the run's log"


def test_wandb_disabled_is_noop_without_import(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing wandb would now raise
    with WandbLogger("disabled", dir=tmp_path / "wb") as lg:
        assert not lg.enabled
        lg.log_record(make_record())
        lg.log_tables([make_record()])
        lg.log_artifact(tmp_path / "missing", "x")
    assert not (tmp_path / "wb").exists()
    with pytest.raises(ConfigError, match="logger.mode"):
        WandbLogger("sometimes")


def test_flatten_metrics_and_latest():
    flat = flatten_metrics(make_record())
    assert list(flat)[0].startswith("fidelity/") and flat["cost/phases/train"] == 10.0
    assert "cost/device" not in flat  # strings are not metrics
    old = make_record(spearman=0.1, ts="2025-01-01T00:00:00+00:00")
    new = make_record(spearman=0.7, ts="2025-01-02T00:00:00+00:00")
    assert latest([new, old]) == [new]


# --------------------------------------------------------------------------- compare / report

OLD, NEW = "a" * 40, "b" * 40


def _store(tmp_path, new_spearman, new_status="ok"):
    store = ResultsStore(tmp_path)
    for seed in range(2):
        store.append(make_record("exact", seed, OLD))
        store.append(make_record("tmc", seed, OLD, spearman=0.8))
        store.append(make_record("exact", seed, NEW, ts="2025-02-01T00:00:00+00:00"))
        store.append(make_record("tmc", seed, NEW, spearman=new_spearman, status=new_status,
                                 wall_s=30.0, ts="2025-02-01T00:00:00+00:00"))
    return store


def test_compare_flags_planted_regression(tmp_path, capsys):
    _store(tmp_path, new_spearman=0.6)
    assert compare.main(["--results", str(tmp_path), "--commit", OLD, "--write-baseline"]) == 0
    assert (tmp_path / "baselines" / "toy.jsonl").is_file()
    assert compare.main(["--results", str(tmp_path), "--commit", NEW]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: ρ" in out and "-0.200" in out and "3.00" in out  # wall ratio reported
    assert compare.main(["--results", str(tmp_path), "--commit", NEW, "--baseline", OLD]) == 1
    assert compare.main(["--results", str(tmp_path), "--commit", NEW, "--tolerance", "0.3"]) == 0


def test_compare_passes_within_tolerance_and_flags_cost_on_request(tmp_path, capsys):
    _store(tmp_path, new_spearman=0.78)
    assert compare.main(["--results", str(tmp_path), "--commit", NEW, "--baseline", OLD]) == 0
    assert compare.main(["--results", str(tmp_path), "--commit", NEW, "--baseline", OLD,
                         "--cost-tolerance", "0.5"]) == 1
    assert "REGRESSED: wall" in capsys.readouterr().out


def test_compare_flags_new_failure(tmp_path):
    _store(tmp_path, new_spearman=0.8, new_status="failed")
    assert compare.main(["--results", str(tmp_path), "--commit", NEW, "--baseline", OLD]) == 1


def test_compare_missing_results_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--results", str(tmp_path / "none")])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: no results")
    _store(tmp_path, 0.8)
    with pytest.raises(SystemExit) as exc:  # no committed baseline yet
        compare.main(["--results", str(tmp_path), "--commit", NEW])
    assert exc.value.code == 2


def test_report_table_and_plot(tmp_path, capsys):
    recs = [make_record("exact", s, spearman=0.9 + 0.01 * s) for s in range(3)]
    recs += [make_record("tmc", s, spearman=0.5) for s in range(2)]
    recs += [make_record("tmc", 2, status="failed")]
    text = tables.format_table(recs)
    assert "toy · game=union" in text and "0.910 ± 0.025" in text and "2/3" in text
    md = tables.format_table(recs, markdown=True)
    assert "| valuer | n | fidelity ρ |" in md and "| tmc | 2/3 | 0.500 ± 0.000 |" in md
    store = ResultsStore(tmp_path)
    for r in recs:
        store.append(r)
    png = tmp_path / "plot.png"
    assert report_cli.main(["--results", str(tmp_path), "--plot", str(png)]) == 0
    assert "exact" in capsys.readouterr().out and png.stat().st_size > 1000
    with pytest.raises(SystemExit) as exc:
        report_cli.main(["--results", str(tmp_path / "none")])
    assert exc.value.code == 2


def test_report_file_with_plots(tmp_path):
    """report --out: markdown tables + frontier, owner-value, ROC and selection PNGs."""
    recs = [dict(make_record("retrain_shapley", s), truth_values=[0.1, 0.2, -0.3, 0.05]) for s in range(2)]
    recs += [dict(make_record("random", s, spearman=0.0, fine_tunes=0), truth_values=[0.1, 0.2, -0.3, 0.05])
             for s in range(2)]
    sel = {"metric": "pref_acc", "n_examples": 20, "sizes": [0.5], "counts": [10], "seeds": [0, 1],
           "methods": ["qocs", "all"], "base_utility": 0.5, "held_out_eval": True,
           "summary": {"qocs": {"sizes": [0.5], "counts": [10], "stats": [{"mean": 0.6, "lo": 0.55, "hi": 0.65,
                                                                         "n": 2}]},
                       "all": {"mean": 0.62, "lo": 0.6, "hi": 0.64, "n": 2}}, "paired": {}}
    recs[0]["metrics"]["selection"] = sel
    store = ResultsStore(tmp_path)
    for r in recs:
        store.append(r)
    out = tmp_path / "report.md"
    assert report_cli.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| retrain_shapley | 2 |" in text and "| random | 2 |" in text
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["detection_roc.png", "frontier.png", "owner_values.png",
                    "selection_toy_union_retrain_shapley_s0.png"]
    for p in pngs:
        assert f"report/{p}" in text and (tmp_path / "report" / p).stat().st_size > 5000


def test_safe_logger_survives_wandb_failures(capsys):
    """A W&B failure (at init or mid-run) warns once and turns W&B off; nothing raises."""
    from bench.tracking import SafeLogger

    def broken():
        raise RuntimeError("no disk")
    with SafeLogger(broken) as wb:
        assert wb.log_record({"valuer": "x"}) is None and wb.log_tables([]) is None
    assert "W&B init failed (RuntimeError: no disk)" in capsys.readouterr().err

    class Flaky:
        calls, finished = [], []

        def log_record(self, rec, prefix=""):
            self.calls.append(rec)
            raise OSError("quota")

        def finish(self, exit_code=None):
            self.finished.append(exit_code)
    flaky = Flaky()
    with SafeLogger(lambda: flaky) as wb:
        wb.log_record({"a": 1})
        wb.log_record({"a": 2})          # off after the first failure
    assert flaky.calls == [{"a": 1}] and flaky.finished == [1]
    err = capsys.readouterr().err
    assert err.count("W&B log_record failed (OSError: quota)") == 1


def test_sweep_group_outside_hydra():
    from bench.tracking import sweep_group
    assert sweep_group("quick") == "quick"


def test_compare_falls_back_to_this_hardwares_baseline_and_says_where_it_looked(tmp_path, capsys):
    """After make bench there is no <experiment>.jsonl baseline: compare uses this machine's
    hardware baseline (<slug>.jsonl) when it holds the experiment, and otherwise names both
    files it looked in."""
    from bench.analysis.compare import write_baseline
    from bench.tracking.system import hardware_fingerprint
    store = _store(tmp_path, new_spearman=0.6)
    slug = hardware_fingerprint(devices=True)["slug"]
    with pytest.raises(SystemExit) as exc:
        compare.main(["--results", str(tmp_path), "--commit", NEW])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"baselines/toy.jsonl or {tmp_path}/baselines/{slug}.jsonl" in err
    old = [r for r in store.read() if r["commit"] == OLD]
    write_baseline(old, tmp_path / "baselines" / f"{slug}.jsonl")
    assert compare.main(["--results", str(tmp_path), "--commit", NEW]) == 1
    assert f"vs {tmp_path}/baselines/{slug}.jsonl" in capsys.readouterr().out


# --------------------------------------------------------------------------- shared fields

def _job_records(n_seeds=2, valuers=("exact", "tmc", "loo")):
    """Records as a job writes them: one config, consensus and LDS targets per job, one
    utility table per seed, repeated in every record."""
    config = {"task": {"sources": [f"source{i}" for i in range(100)]}, "train": {"lr": 1e-3}, "nan": float("nan")}
    cons = {"values": list(np.linspace(-1, 1, 64)), "se": [0.01] * 64}
    out = []
    for seed in range(n_seeds):
        table = [0.5 + 0.001 * i + seed for i in range(256)]
        for v in valuers:
            r = make_record(v, seed)
            r.update(config=config, consensus=cons, utility_table=table, lds_targets=None if v == "tmc" else
                     {"ceiling": [0.7] * 300}, small={"x": 1})
            out.append(r)
    return out


def test_repeated_fields_are_stored_once_and_read_back_whole(tmp_path):
    from bench.tracking.store import share_fields, shared_name
    store = ResultsStore(tmp_path)
    recs = _job_records()
    for r in recs:
        store.append(r)
    from bench.tracking.store import dumps_line
    plain = tmp_path / "plain" / "runs" / "toy.jsonl"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"".join(dumps_line(r) for r in recs))    # the whole records, one per line, as before
    assert store.read("toy") == ResultsStore(tmp_path / "plain").read("toy")
    files = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert len(files) == 1 + 1 + 1 + 2                          # config, consensus, lds_targets, 2 utility tables
    for name in files:                                          # named by the hash of their bytes
        data = (tmp_path / "shared" / name).read_bytes()
        assert name == shared_name(name.split("-")[0], data) and json.loads(data) is not None
    line = json.loads((tmp_path / "runs" / "toy.jsonl").read_text().splitlines()[1])
    assert "config" not in line and line["shared"]["config"].startswith("config-")
    assert line["lds_targets"] is None and line["small"] == {"x": 1}       # None and small values stay inline
    assert share_fields({"experiment": "e", "config": {"a": 1}}, tmp_path / "shared") == {"experiment": "e",
                                                                                       "config": {"a": 1}}


def test_compacting_a_file_of_whole_records_reads_the_same_and_shrinks(tmp_path):
    from bench.tracking.store import dumps_line
    recs = _job_records(n_seeds=3)
    path = tmp_path / "runs" / "toy.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(dumps_line(r) for r in recs))    # written before the store shared fields
    store = ResultsStore(tmp_path)
    before = store.read("toy")
    size, after = store.compact("toy")
    assert after < 0.6 * size and path.stat().st_size == after
    assert store.read("toy") == before
    assert store.compact("toy")[1] == after, "compacting twice changes nothing"


def test_a_missing_shared_file_is_one_line(tmp_path):
    from bench.core.errors import ConfigError
    store = ResultsStore(tmp_path)
    store.append(_job_records(1, ("exact",))[0])
    victim = next((tmp_path / "shared").glob("config-*.json"))
    victim.unlink()
    with pytest.raises(ConfigError) as e:
        store.read("toy")
    assert one_line(str(e.value)) and victim.name in str(e.value) and "git checkout" in str(e.value)


def test_published_runs_fit_their_size_budget_and_every_shared_file_matches_its_name():
    """What ships in git: every published records file <= 2 MB, every shared file's name the
    hash of its bytes, and no shared file that no record names."""
    from bench.tracking.store import read_jsonl, shared_name
    root = REPO / "results" / "published"
    named = set()
    for f in sorted((root / "runs").glob("*.jsonl")):
        assert f.stat().st_size <= 2 * 2**20, f"{f.name}: {f.stat().st_size / 2**20:.2f} MB"
        named |= {n for line in f.read_text().splitlines() if line.strip()
                  for n in (json.loads(line).get("shared") or {}).values()}
        assert read_jsonl(f)                                    # every reference resolves
    files = {p.name: p.read_bytes() for p in (root / "shared").glob("*.json")} if (root / "shared").is_dir() else {}
    assert set(files) == named
    for name, data in files.items():
        assert name == shared_name(name.split("-")[0], data)


def test_what_a_job_writes_under_the_default_results_dir_leaves_the_tree_clean():
    """A fresh clone's first job writes results/{runs,jobs,shared,lds,plots,cache,...}; if git
    saw any of it, every later job's records would say "made from a dirty tree" (found when a
    fresh clone's second job was). The venv may be a folder or a link."""
    import subprocess
    from bench.tracking.store import ResultsStore
    root = Path(__file__).resolve().parents[1]
    store = ResultsStore(root / "results")
    written = [store.runs / "x.jsonl", store.shared / "x.json", store.root / "jobs" / "x.jsonl",
               store.root / "lds" / "x.npz", store.root / "plots" / "x.png", store.root / "cache" / "x",
               store.root / "wandb" / "x", root / ".venv"]
    paths = [str(p.relative_to(root)) for p in written]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(paths), f"not ignored: {sorted(set(paths) - set(out.stdout.split()))}"
