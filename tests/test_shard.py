"""Sharding the ground truth (bench/shard.py): k shards + assemble give exactly the
unsharded exact Shapley; assemble names what is missing; bad specs fail in one line."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, one_line, subprocess_env

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
    out = subprocess.run([sys.executable, "-m", "bench", "assemble", "experiment=smoke", f"results_dir={tmp_path}",
                          "logger=none"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "game.shard: 16 of 16 ground-truth coalitions are not cached" in err[0], out.stderr
    assert not list(tmp_path.glob("runs/*.jsonl"))                   # no record written


def test_overhead_accounting():
    """The job's wall-time line: fresh compute from a game log, the process age."""
    from bench.core.game import UseLog
    from bench.core.game import fresh_compute_s
    from bench.harness.job import overhead_line, process_age_s
    log = UseLog()
    log.add(1, {"train_s": 2.0, "eval_s": 0.5, "n_train": 3}, True)
    log.add(2, {"train_s": 9.0, "eval_s": 1.0, "n_train": 3}, False)     # a cache hit costs nothing here
    assert fresh_compute_s(log) == pytest.approx(2.5)
    age = process_age_s()
    assert age is None or 0 < age < 24 * 3600
    assert "harness overhead" in overhead_line(0.0, 1.0, 0.5)
