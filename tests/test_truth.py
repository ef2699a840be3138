"""The ground truth that ships (bench/core/truth.py): exported from a job's cache, served
to a job on an empty cache so only what the valuers need is trained, refused when the
game differs, warned and recorded when the code differs, canaries that catch a moved
utility, shards that add to it, and the shipped tables themselves (hashes, size, canaries)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line, read_records, run_cli, smoke_args

from bench.core import truth as T
from bench.core.errors import ConfigError

SHIPPED = REPO / "results" / "published" / "truth"
BUDGET_BYTES = 5_000_000      # a shipped game's truth (issue 27: small enough for git)


def _fresh(tmp_path: Path, smoke_run, name: str) -> Path:
    """An empty cache sharing the smoke run's base models."""
    root = tmp_path / name
    root.mkdir()
    (root / "models").symlink_to(smoke_run.results / "cache" / "models", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory) -> Path:
    assert smoke_run.code == 0, smoke_run.stderr
    dest = tmp_path_factory.mktemp("truth") / "smoke"
    code, out, err = run_cli(["truth", "export", *smoke_args(smoke_run.results), f"--dest={dest}"])
    assert code == 0, err
    assert "coalitions per seed {'0': 8, '1': 8} of 8 (complete)" in out
    return dest


def _rewrite(folder: Path, role: str, edit) -> None:
    """Edit one data file and re-hash it in the manifest (a consistent, different table)."""
    man = json.loads((folder / T.MANIFEST).read_text())
    path = folder / man["files"][role]["name"]
    path.write_bytes(edit(path.read_bytes()))
    man["files"][role]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / T.MANIFEST).write_text(json.dumps(man))


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_the_export_is_plain_files_with_every_metric_and_their_hashes(exported, smoke_run):
    man = json.loads((exported / T.MANIFEST).read_text())
    assert set(man) >= {"definition", "drift", "contents", "canaries", "files"}
    assert {"task", "eval", "model", "train", "game", "owners"} <= set(man["definition"]["game_key"])
    assert "code" not in man["definition"]["game_key"] and "code" in man["drift"]
    with open(exported / man["files"]["table"]["name"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {"pref_acc", "reward_acc", "margin", "bt_loglik"} <= set(rows[0])
    with np.load(exported / man["files"]["logps"]["name"], allow_pickle=False) as z:     # no pickle
        assert z["chosen"].shape == (16, 60) and z["chosen"].dtype == np.float64
    truth = T.load(exported)
    # the shipped utilities are the job's, bit for bit (its records' tables)
    rec = next(r for r in smoke_run.records if r["valuer"] == "retrain_shapley" and r["seed"] == 0)
    key = lambda m: next(k for k, v in truth.records.items() if v.get("mask") == m and v["seed"] == 0)  # noqa: E731
    assert [truth.get(key(m))["metrics"]["pref_acc"] for m in range(8)] == rec["utility_table"]
    assert [c["mask"] for c in man["canaries"]] and all(bin(c["mask"]).count("1") == 1 for c in man["canaries"])


def test_a_job_on_an_empty_cache_is_served_the_ground_truth_and_trains_none_of_it(exported, smoke_run, tmp_path):
    cache = _fresh(tmp_path, smoke_run, "cache")
    results = tmp_path / "r"
    code, out, err = run_cli([*smoke_args(results, cache), f"truth={exported}", "valuer=[loo]"])
    assert code == 0, err
    assert out.splitlines()[0].startswith("[dvbench] ground truth: shipped in"), out.splitlines()[:2]
    recs = read_records(results)
    old = {(r["valuer"], r["seed"]): r for r in smoke_run.records}
    for r in recs:
        assert r["exact_values"] == old[("retrain_shapley", r["seed"])]["exact_values"]
        assert r["truth"]["folder"] == str(exported) and r["truth"]["drift"] == {}
    loo = next(r for r in recs if r["valuer"] == "loo" and r["seed"] == 0)
    assert old[("loo", 0)]["owner_values"] == loo["owner_values"]
    # a shipped utility costs the valuer what it would have from the cache: counted, with its seconds
    assert loo["cost"]["fine_tunes"] == old[("loo", 0)]["cost"]["fine_tunes"] > 0
    assert not list((cache / "utility").rglob("*.json")) if (cache / "utility").exists() else True
    job = json.loads((results / "jobs" / "smoke.jsonl").read_text().splitlines()[-1])
    assert job["trained"] == 0


def test_a_served_job_trains_only_the_weights_its_valuers_load_and_says_so_first(exported, smoke_run, tmp_path):
    """DPO arithmetic reads the owners' eval log-probs from the table (their weights'
    meta is fixed by the game's definition): nothing trained. Influence loads the grand
    coalition's weights, which a table does not carry: one fine-tune per seed, named in
    the job's first lines and in the estimate, counted as the valuer's fresh fine-tune."""
    cache = _fresh(tmp_path, smoke_run, "cache")
    results = tmp_path / "r"
    code, out, err = run_cli([*smoke_args(results, cache), f"truth={exported}",
                              "valuer=[dpo_arithmetic,influence_naive]", "lds.n_subsets=0"])     # none shipped
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("[dvbench] ground truth: shipped in"), lines[:3]
    assert lines[1] == ("[dvbench] not shipped: the weights the valuers load (influence_naive: the grand "
                        "coalition × 2 seeds): 2 fine-tunes to train, metered as each valuer's own (a shipped "
                        "truth carries utilities, not weights)"), lines[:3]
    assert any("+ 2 fine-tunes of weights the valuers load" in ln for ln in lines if "estimate" in ln), out
    old = {(r["valuer"], r["seed"]): r for r in smoke_run.records}
    for r in read_records(results):
        fresh = r["cost"]["fine_tunes"] - r["cost"]["fine_tunes_cached"]
        if r["valuer"] == "dpo_arithmetic":
            assert r["owner_values"] == old[("dpo_arithmetic", r["seed"])]["owner_values"]
            assert fresh == 0 and r["cost"]["fine_tunes"] == 3           # the 3 owners' utilities, read
        if r["valuer"] == "influence_naive":
            assert fresh == 1 and r["cost"]["phases"]["fine_tune"] > r["cost"]["phases"]["load_model"]
    # on disk: the grand coalition's stage per seed, no owner's
    assert len(list((cache / "stage").rglob("*.pt"))) == 2


def test_another_game_is_refused_when_named_and_retrained_under_auto(exported, smoke_run, tmp_path, monkeypatch):
    code, out, err = run_cli([*smoke_args(tmp_path / "r", _fresh(tmp_path, smoke_run, "c")), f"truth={exported}",
                              "train.lr=0.002", "valuer=[loo]"])
    assert code != 0 and one_line(err) and "train.lr=" in err and "truth=off" in err, err
    assert not (tmp_path / "r" / "runs" / "smoke.jsonl").exists()      # nothing written
    from bench.harness import truth as H
    monkeypatch.setattr(H, "TRUTH_ROOT", exported.parent)      # as if shipped for this experiment
    games = _games(smoke_run, ["train.lr=0.002"])
    assert H.attach_truth("auto", "smoke", games) is None and all(g._shipped is None for g in games)
    assert H.attach_truth("auto", "smoke", _games(smoke_run, [])) is not None


def _games(smoke_run, extra):
    from bench.harness.build import build_game, build_task, compose_config
    cfg = compose_config([*smoke_args(smoke_run.results), *extra])
    game, _ = build_game(cfg, build_task(cfg))
    return [game, game.with_seed(1)]


def test_a_damaged_or_missing_file_is_one_line_naming_it(exported, tmp_path):
    bad = _copy(exported, tmp_path / "t")
    man = json.loads((bad / T.MANIFEST).read_text())
    table = bad / man["files"]["table"]["name"]
    table.write_text(table.read_text().replace("0.", "1.", 1))
    with pytest.raises(ConfigError, match="SHA-256") as e:
        T.load(bad)
    assert table.name in str(e.value) and "git checkout" in str(e.value)
    table.unlink()
    with pytest.raises(ConfigError, match="missing"):
        T.load(bad)


def test_drift_loads_with_a_warning_naming_it_and_every_record_carries_it(exported, smoke_run, tmp_path):
    t = _copy(exported, tmp_path / "t")
    man = json.loads((t / T.MANIFEST).read_text())
    man["drift"]["code"], man["drift"]["libraries"]["trl"] = "0123456789ab", "0.0.1"
    (t / T.MANIFEST).write_text(json.dumps(man))
    results = tmp_path / "r"
    code, out, err = run_cli([*smoke_args(results, _fresh(tmp_path, smoke_run, "c")), f"truth={t}", "valuer=[loo]"])
    assert code == 0, err
    warn = [ln for ln in out.splitlines() if ln.startswith("[dvbench] warning: the shipped ground truth")]
    assert len(warn) == 1 and "0123456789ab" in warn[0] and "trl 0.0.1 →" in warn[0]
    for r in read_records(results):
        assert r["truth"]["drift"]["code"][0] == "0123456789ab" and r["truth"]["drift"]["libraries"]["trl"][0] == "0.0.1"


def test_canaries_retrained_here_match_and_a_moved_utility_is_caught(exported, smoke_run, tmp_path):
    args = [*smoke_args(tmp_path / "r", _fresh(tmp_path, smoke_run, "c")), f"truth={exported}"]
    code, out, err = run_cli(["truth", "canary", *args])
    assert code == 0, err + out
    assert "truth canary: 12/12 within" in out
    moved = _copy(exported, tmp_path / "moved")
    man = json.loads((moved / T.MANIFEST).read_text())
    c = man["canaries"][0]

    def shift(data: bytes) -> bytes:       # the canary's pref_acc moved by 0.2 in the shipped table
        rows = list(csv.DictReader(data.decode().splitlines()))
        for r in rows:
            if r["kind"] == "coalition" and int(r["seed"]) == c["seed"] and r["mask"] == str(c["mask"]):
                r["pref_acc"] = repr(float(r["pref_acc"]) + 0.2)
        out = __import__("io").StringIO()
        w = csv.DictWriter(out, fieldnames=T.COLUMNS, lineterminator="\n")
        w.writeheader(), w.writerows(rows)
        return out.getvalue().encode()
    _rewrite(moved, "table", shift)
    code, out, err = run_cli(["truth", "canary", *args[:-1], f"truth={moved}"])
    assert code == 1 and "11/12 within" in out and " NO" in out, out


def test_shards_ship_one_by_one_and_a_later_shard_trains_only_its_own(smoke_run, tmp_path):
    dest = tmp_path / "truth"
    code, out, err = run_cli([*smoke_args(tmp_path / "r0", _fresh(tmp_path, smoke_run, "c0")), "game.shard=0/2",
                              "truth=off"])
    assert code == 0, err
    code, out, err = run_cli(["truth", "export", *smoke_args(tmp_path / "r0", tmp_path / "c0"), f"--dest={dest}"])
    assert code == 0 and "(incomplete" in out, out + err
    half = json.loads((dest / T.MANIFEST).read_text())["contents"]["coalitions"]
    assert sum(half.values()) == 8
    # the next session: an empty cache, the shipped half served, the other half trained
    c1 = _fresh(tmp_path, smoke_run, "c1")
    code, out, err = run_cli([*smoke_args(tmp_path / "r1", c1), "game.shard=1/2", f"truth={dest}"])
    assert code == 0, err
    assert "8 of 16 ground-truth coalitions (8 trained, 0 cached)" in out, out
    code, out, err = run_cli(["truth", "export", *smoke_args(tmp_path / "r1", c1), f"--dest={dest}"])
    assert code == 0 and "(complete)" in out, out + err
    assert len(list(dest.iterdir())) == 3          # the manifest and its two files: the old ones deleted
    truth = T.load(dest)                       # both halves, the same utilities as one unsharded job's
    for seed in (0, 1):
        rec = next(r for r in smoke_run.records if r["valuer"] == "retrain_shapley" and r["seed"] == seed)
        got = {v["mask"]: v["metrics"]["pref_acc"] for v in truth.records.values() if v["seed"] == seed}
        assert [got[m] for m in range(8)] == rec["utility_table"]


@pytest.mark.parametrize("folder", sorted(p for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.exists() else [],
                         ids=lambda p: p.name)
def test_every_shipped_truth_verifies_and_fits_the_size_budget(folder):
    truth = T.load(folder)                     # every file's SHA-256, the columns, the rows
    size = sum(f["bytes"] for f in truth.manifest["files"].values())
    assert size <= BUDGET_BYTES, f"{folder.name}: {size / 1e6:.2f} MB > {BUDGET_BYTES / 1e6:.0f} MB"
    names = {f["name"] for f in truth.manifest["files"].values()} | {T.MANIFEST}
    assert {p.name for p in folder.iterdir()} == names, "files the manifest does not name"
    assert truth.manifest["canaries"]


def test_the_shipped_first_tables_canaries_reproduce_here(tmp_path, tiny_base, session_cache):
    """CI's check that today's code, libraries and CPU still give the shipped utilities
    (tiny tier: the `first` preset's canaries, a few seconds)."""
    assert (SHIPPED / "first" / T.MANIFEST).is_file(), "results/published/truth/first is not shipped"
    code, out, err = run_cli(["truth", "canary", "experiment=first", f"cache_dir={tmp_path / 'c'}",
                              f"results_dir={tmp_path / 'r'}", "progress=false"])
    assert code == 0, out + err
    n = 4 * len(json.loads((SHIPPED / "first" / T.MANIFEST).read_text())["canaries"])
    assert f"truth canary: {n}/{n} within" in out


def test_weights_a_shipped_utility_lacks_are_trained_and_counted_as_a_fresh_fine_tune(fresh_cache, make_game,
                                                                                         tmp_path, tiny_base,
                                                                                         session_cache):
    """Gradient methods need the grand coalition's weights; the table ships its utility,
    not its weights: the valuer's cost says one fresh fine-tune, not a cached one."""
    trained = make_game(fresh_cache)
    trained.table()
    T.export([trained], [], tmp_path / "t", "tiny", {"commit": "x"}, {})
    root = tmp_path / "empty"
    root.mkdir()
    (root / "models").symlink_to(session_cache / "models", target_is_directory=True)
    served = make_game(root)
    served._shipped = T.load(tmp_path / "t")
    full = 2 ** served.n - 1
    with served.metered() as use:
        assert served.utility(3) == trained.utility(3) and use.entries[3]["fresh"] is False
        ft = served.finetuned(full)
    assert ft.model is not None
    assert use.entries[full]["fresh"] is True and use.fine_tunes() == 2 and use.busy_s > 0
    with served.metered() as again:            # now cached: no second training
        served.finetuned(full)
    assert again.entries[full]["fresh"] is False


def test_the_docs_table_of_shipped_truths_is_generated_from_the_manifests():
    from bench.analysis.report import TRUTH_BEGIN, read_truths, truth_block
    manifests = read_truths(SHIPPED)
    block = truth_block(manifests)
    assert len(manifests) == len([d for d in SHIPPED.iterdir() if d.is_dir()])
    for m in manifests:
        assert f"| `{m['experiment']}` |" in block
    page = (REPO / "docs" / "ground-truth.md").read_text()
    assert TRUTH_BEGIN in page and block in page, "docs/ground-truth.md is stale: run `make report`"


def test_show_says_what_is_shipped_and_whether_this_game_is_it(exported, smoke_run):
    code, out, err = run_cli(["truth", "show", *smoke_args(smoke_run.results), f"truth={exported}"])
    assert code == 0, err
    assert "{'0': 8, '1': 8} of 8" in out and "this job's game: the same" in out and "drift from this machine: none" in out
    code, out, err = run_cli(["truth", "show", *smoke_args(smoke_run.results), f"truth={exported}", "train.lr=0.002"])
    assert code == 0 and "this job's game: another (train.lr=" in out
