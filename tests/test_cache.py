"""The on-disk cache: round trips, damaged entries read as missing, and a game
killed mid-run resumes without retraining what it already finished."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SPEC, TASK_KW, TRAIN, code_version, skip_if_code_changed, subprocess_env

from bench.core.cache import DiskCache, content_key


def test_content_key_is_canonical():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert len(content_key("x")) == 64


def test_json_round_trip(tmp_path):
    c = DiskCache(tmp_path)
    key = content_key("entry")
    assert c.get_json("utility", key) is None
    rec = {"metrics": {"pref_acc": 0.625}, "logp": [-1.5, -2.25], "name": "ü"}
    c.put_json("utility", key, rec)
    assert c.get_json("utility", key) == {**rec, "key": key}
    assert c.count("utility") == 1
    assert c.get_json("utility", content_key("other")) is None
    assert c.get_json("stage", key) is None           # kinds are separate
    # overwriting is atomic and leaves no temp files behind
    c.put_json("utility", key, {"v": 2})
    assert c.get_json("utility", key)["v"] == 2
    assert [p.name for p in (tmp_path / "utility").rglob("*") if p.is_file()] == [f"{key}.json"]


def test_truncated_json_reads_as_missing(tmp_path):
    c = DiskCache(tmp_path)
    key = content_key("trunc")
    c.put_json("utility", key, {"metrics": {"pref_acc": 0.5}, "logp": list(range(50))})
    p = c._path("utility", key, "json")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert c.get_json("utility", key) is None
    p.write_bytes(b"\xff\xfe\x00garbage")
    assert c.get_json("utility", key) is None
    p.write_bytes(b"[1, 2, 3]")                       # valid JSON, not a record
    assert c.get_json("utility", key) is None


def test_key_mismatch_reads_as_missing(tmp_path):
    c = DiskCache(tmp_path)
    k1, k2 = content_key("one"), content_key("two")
    c.put_json("utility", k1, {"v": 1})
    p2 = c._path("utility", k2, "json")
    p2.parent.mkdir(parents=True, exist_ok=True)
    p2.write_bytes(c._path("utility", k1, "json").read_bytes())   # a swapped / stray file
    assert c.get_json("utility", k2) is None
    assert c.get_json("utility", k1) == {"v": 1, "key": k1}
    rec = json.loads(p2.read_text())
    del rec["key"]
    p2.write_text(json.dumps(rec))                    # a record without a key
    assert c.get_json("utility", k2) is None


def test_tensors_round_trip_and_truncation(tmp_path):
    c = DiskCache(tmp_path)
    key = content_key("stage")
    obj = {"kind": "full", "state": {"w": torch.randn(7, 5), "b": torch.arange(3)}, "train_s": 1.5,
           "stats": {"steps": 3}}
    c.put_tensors("stage", key, obj)
    got = c.get_tensors("stage", key)
    assert got["key"] == key and got["kind"] == "full" and got["stats"] == {"steps": 3}
    assert torch.equal(got["state"]["w"], obj["state"]["w"]) and torch.equal(got["state"]["b"], obj["state"]["b"])
    assert c.get_tensors("stage", content_key("nope")) is None
    p = c._path("stage", key, "pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert c.get_tensors("stage", key) is None
    p.write_bytes(b"")
    assert c.get_tensors("stage", key) is None
    # a valid blob under the wrong key
    c.put_tensors("stage", content_key("a"), obj)
    os.replace(c._path("stage", content_key("a"), "pt"), p)
    assert c.get_tensors("stage", key) is None


# ------------------------------------------------------------ the game's cache

def test_truncated_utility_entry_is_recomputed(fresh_cache, make_game):
    game = make_game(fresh_cache)
    v1 = game.utility(1)
    path = game.cache._path("utility", game.key(1), "json")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    game2 = make_game(fresh_cache)
    assert game2.cache.get_json("utility", game2.key(1)) is None
    assert game2.utility(1) == pytest.approx(v1, abs=1e-12)
    assert game2.log.entries[1]["fresh"] is True       # recomputed, not served from the damaged file
    assert json.loads(path.read_text())["key"] == game.key(1)   # and rewritten whole
    game3 = make_game(fresh_cache)
    game3.utility(1)
    assert game3.log.entries[1]["fresh"] is False


SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
from bench.core.game import Game
from bench.core.models import ModelSpec
from bench.core.partition import make_partition
from bench.core.task import synthetic_pref
from bench.core.train import TrainSettings

task = synthetic_pref(**{task_kw!r})
part = make_partition(task, "by_source", owner_sources={sources!r})
game = Game(task, part, ModelSpec(**{spec!r}), TrainSettings(**{train!r}), kind="union", seed=0,
            cache_dir=sys.argv[1], progress=False)
table = game.table()
print(json.dumps({{"table": table.tolist(),
                  "fresh": {{str(m): e["fresh"] for m, e in game.log.entries.items()}}}}))
"""


def _script(tmp_path) -> Path:
    from dataclasses import asdict
    spec = {k: v for k, v in asdict(SPEC).items() if k != "extra"}
    path = tmp_path / "run_game.py"
    path.write_text(textwrap.dedent(SCRIPT.format(task_kw=TASK_KW, sources=["capitals", "tone", "reversal"],
                                                  spec=spec, train=asdict(TRAIN))))
    return path


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("utility/*/*.json"))


def test_resume_after_kill(tmp_path, fresh_cache, make_game, tiny_task):
    from bench.core.partition import make_partition
    script = _script(tmp_path)
    version = code_version()
    proc = subprocess.Popen([sys.executable, str(script), str(fresh_cache)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(_entries(fresh_cache)) < 2:
            assert proc.poll() is None, f"worker exited early: {proc.communicate()[1].decode()[-2000:]}"
            assert time.monotonic() < deadline, "no cache entries appeared in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    present = len(_entries(fresh_cache))
    print(f"entries after kill: {present}")
    assert 2 <= present < 8, f"{present} entries after the kill"

    # resume in-process on the same game: only the missing coalitions are computed
    part = make_partition(tiny_task, "by_source", owner_sources=["capitals", "tone", "reversal"])
    game = make_game(fresh_cache, partition=part)
    table = game.table()
    skip_if_code_changed(version)
    assert len(table) == 8 and all(map(float.__instancecheck__, table.tolist()))
    assert not any(x != x for x in table), "every utility present"
    fresh = [m for m, e in game.log.entries.items() if e["fresh"]]
    assert len(game.log.entries) == 8
    assert len(fresh) == 8 - present, (present, fresh)
    assert len(_entries(fresh_cache)) == 8

    # a third run, in a new process: everything cached, nothing trained, same numbers
    out = subprocess.run([sys.executable, str(script), str(fresh_cache)], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    skip_if_code_changed(version)
    assert res["fresh"] and not any(res["fresh"].values()), res["fresh"]
    assert res["table"] == pytest.approx(table.tolist(), abs=1e-12)


def test_code_version_ignores_comments_and_docstrings_but_not_code(tmp_path):
    from bench.core.game import _code_fingerprint
    a = tmp_path / "a.py"
    a.write_text('def f(x):\n    """doc"""\n    return x + 1\n')
    base = _code_fingerprint(a)
    a.write_text('# a comment\ndef f(x):\n    """other doc"""\n\n    return x + 1   # why\n')
    assert _code_fingerprint(a) == base
    a.write_text('def f(x):\n    return x + 2\n')
    assert _code_fingerprint(a) != base


def test_lock_is_exclusive_across_processes(tmp_path):
    """A second process waits for the entry lock the first one holds."""
    c = DiskCache(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from bench.core.cache import DiskCache
        with DiskCache({str(tmp_path)!r}).lock("utility", "k"):
            print("held", flush=True)
            time.sleep(1.5)
        """)], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with c.lock("utility", "k"):
            waited = time.monotonic() - t0
        with c.lock("utility", "other"):      # other entries are not blocked
            pass
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5, waited


def test_concurrent_writers_train_each_coalition_once(tmp_path, fresh_cache):
    """Two processes computing the same game on one cache folder at once: every
    coalition is trained by exactly one of them, no entry is corrupt, and both
    return identical tables."""
    script = _script(tmp_path)
    version = code_version()
    procs = [subprocess.Popen([sys.executable, str(script), str(fresh_cache)], cwd=REPO,
                              env={**subprocess_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    skip_if_code_changed(version)
    res = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert res[0]["table"] == res[1]["table"]
    trained = [sum(r["fresh"].values()) for r in res]
    print("coalitions computed per process:", trained)
    assert sum(trained) == 8, trained                 # 2^3 coalitions, each computed once in total
    c = DiskCache(fresh_cache)
    assert all(c.get_json("utility", p.stem) is not None for p in _entries(fresh_cache))
    assert not list(fresh_cache.rglob("*.tmp"))


def test_sweep_removes_a_dead_writers_temp_folder_and_never_raises(tmp_path):
    """A killed EK-FAC run leaves a temp *folder*; the sweep at the next job's start called
    ``unlink`` on it (IsADirectoryError), so every later job crashed at start-up."""
    import subprocess
    import sys

    from bench.core.cache import sweep_stale_tmp, tmp_path as temp_of
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()

    def as_dead(p):
        return p.with_name(p.name.replace(f".{os.getpid()}.", f".{dead}."))
    folder = as_dead(temp_of(tmp_path / "ekfac" / "factors"))
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "lambda.safetensors").write_bytes(b"x" * 10)
    f = as_dead(temp_of(tmp_path / "entry.json"))
    f.write_bytes(b"half")
    live = temp_of(tmp_path / "entry.json")
    live.write_bytes(b"mine")
    assert sweep_stale_tmp(tmp_path) == 2
    assert not folder.exists() and not f.exists() and live.exists()
    assert sweep_stale_tmp(tmp_path / "missing") == 0
