"""Sweeps through Hydra launchers: the SLURM launcher config composes from the
`slurm:` block; a 2-job sweep with submitit's local executor shares one cache
(each coalition trained once) and writes one record set and one W&B run per job."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env


def test_slurm_launcher_reads_the_slurm_block():
    out = subprocess.run([sys.executable, "-m", "bench", "hydra/launcher=slurm", "experiment=smoke",
                          "slurm.partition=gpu", "slurm.timeout_min=30", "--cfg", "all", "--resolve"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "SlurmLauncher" in out.stdout and "partition: gpu" in out.stdout and "timeout_min: 30" in out.stdout


@pytest.mark.slow
def test_submitit_local_sweep_shares_the_cache(tmp_path):
    small = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]"]
    out = subprocess.run([sys.executable, "-m", "bench", "-m", "hydra/launcher=submitit_local", *small,
                          "valuers=[loo],[mc_shapley]", f"results_dir={tmp_path}", "progress=false",
                          f"hydra.sweep.dir={tmp_path}/multirun"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "runs" / "smoke.jsonl").read_text().splitlines()]
    assert sorted(r["valuer"] for r in recs) == ["loo", "mc_shapley", "random", "random",
                                                 "retrain_shapley", "retrain_shapley"]
    assert all(r["status"] == "ok" for r in recs)
    # 2 seeds x 2^3 coalitions, trained once between the two jobs
    assert len(list((tmp_path / "cache" / "utility").glob("*/*.json"))) == 16
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 2
