"""Sharding the ground truth (bench/shard.py): k shards + assemble give exactly the
unsharded exact Shapley; assemble names what is missing; bad specs fail in one line."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from conftest import one_line, run_cli

from bench.core import shapley
from bench.core.errors import ConfigError
from bench.core.shard import missing, parse_shard, run_shard, truth_items


@pytest.mark.parametrize("spec", ["4/4", "-1/4", "1", "a/b", "0/0"])
def test_bad_shard_specs(spec):
    with pytest.raises(ConfigError, match="game.shard") as e:
        parse_shard(spec)
    assert one_line(str(e.value))


def test_parse():
    assert parse_shard(None) is None and parse_shard("assemble") == "assemble"
    assert parse_shard("2/5") == (2, 5)


def test_four_shards_then_assemble_equal_the_unsharded_truth(tmp_path, fresh_cache, make_game, tiny_base):
    games = [make_game(fresh_cache, seed=0), make_game(fresh_cache, seed=1000)]
    for i in range(3):
        info = run_shard(games, i, 4)
        assert info["coalitions"] == len(truth_items(games)[i::4])
    miss = missing(games)
    assert miss and all(x["position"] % 4 == 3 for x in miss)          # only shard 3/4 is left
    assert len(miss) == len(truth_items(games)[3::4])
    run_shard(games, 3, 4)
    assert missing(games) == []
    sharded = [make_game(fresh_cache, seed=s).table() for s in (0, 1000)]

    # the unsharded computation, in its own cache
    other = tmp_path / "plain"
    other.mkdir()
    (other / "models").symlink_to(fresh_cache / "models", target_is_directory=True)
    plain = [make_game(other, seed=s).table() for s in (0, 1000)]
    for a, b in zip(sharded, plain):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(shapley.exact_shapley(a), shapley.exact_shapley(b))


def test_assemble_on_an_empty_cache_names_the_missing(tmp_path):
    code, _, stderr = run_cli(["assemble", "experiment=smoke", f"results_dir={tmp_path}", "logger=none",
                               f"hydra.run.dir={tmp_path}/hydra"])
    assert code == 2, stderr[-2000:]
    err = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: game.shard: 16 of 16 ground-truth coalitions are not cached"), \
        stderr
    assert not list(tmp_path.glob("runs/*.jsonl"))                   # no record written
    assert not list(tmp_path.glob("cache/utility/*/*"))              # and nothing trained


def test_overhead_accounting(monkeypatch):
    """The job's wall-time line: fresh compute from a game log, the process age."""
    from bench.core.metering import UseLog
    from bench.core.metering import fresh_compute_s
    from bench.harness import job
    from bench.harness.job import overhead_line, process_age_s
    log = UseLog()
    log.add(1, {"train_s": 2.0, "eval_s": 0.5, "n_train": 3}, True)
    log.add(2, {"train_s": 9.0, "eval_s": 1.0, "n_train": 3}, False)     # a cache hit costs nothing here
    assert fresh_compute_s(log) == pytest.approx(2.5)
    # this process's age (Linux /proc): positive, and it grows with the clock
    age = process_age_s()
    assert age is not None and 0 < age < 24 * 3600
    time.sleep(0.05)
    assert 0.04 < process_age_s() - age < 5
    # wall = the process age; the rest of it after fine-tunes and the valuers' own work is overhead
    line = overhead_line(0.0, 1.0, 0.5)
    wall, ft, own, rest, pct = (float(x) for x in
                                re.fullmatch(r"\[dvbench\] wall ([\d.]+) s = fine-tunes\+evals ([\d.]+) s \+ "
                                             r"valuers' own work ([\d.]+) s \+ harness overhead ([\d.]+) s "
                                             r"\(([\d.]+)%\)", line).groups())
    assert wall == pytest.approx(process_age_s(), abs=0.2) and (ft, own) == (1.0, 0.5)
    assert rest == pytest.approx(wall - 1.5, abs=0.11) and pct == pytest.approx(100 * rest / wall, abs=0.11)
    # without /proc the wall time is the clock since the job started
    monkeypatch.setattr(job, "process_age_s", lambda: None)
    assert overhead_line(time.time() - 10.0, 4.0, 1.0).startswith("[dvbench] wall 10.0 s = ")
    assert "harness overhead 5.0 s (50.0%)" in overhead_line(time.time() - 10.0, 4.0, 1.0)
    assert "harness overhead 0.0 s" in overhead_line(time.time() - 1.0, 4.0, 1.0)   # never negative
    # with workers: the wall seconds of the fine-tunes are split off, their summed compute is shown beside
    line = overhead_line(time.time() - 10.0, 6.0, 1.0, worker_s=11.5, n_jobs=2)
    assert "fine-tunes+evals 6.0 s (11.5 s of compute on 2 workers)" in line and "overhead 3.0 s (30.0%)" in line
