"""Sweeps through Hydra launchers: the SLURM launcher config composes from the
`slurm:` block; a 2-job sweep with submitit's local executor shares one cache
(each coalition trained once) and writes one record set and one W&B run per job.
Both drive the CLI in this process (``run_cli``); submitit starts the jobs' own processes."""
from __future__ import annotations


import pytest
import yaml
from conftest import run_cli, read_records


def test_slurm_launcher_reads_the_slurm_block():
    code, out, err = run_cli(["hydra/launcher=slurm", "experiment=smoke", "slurm.partition=gpu",
                              "slurm.timeout_min=31", "slurm.account=lab", "--cfg", "all", "--resolve"])
    assert code == 0, err[-1500:]
    launcher = yaml.safe_load(out)["hydra"]["launcher"]        # not the `slurm:` block itself
    assert launcher["_target_"].endswith("SlurmLauncher"), launcher
    assert (launcher["partition"], launcher["timeout_min"], launcher["account"]) == ("gpu", 31, "lab")


@pytest.mark.slow
def test_submitit_local_sweep_shares_the_cache(tmp_path):
    small = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]"]
    code, _, err = run_cli(["-m", "hydra/launcher=submitit_local", *small, "valuer=[loo],[mc_shapley]",
                            f"results_dir={tmp_path}", "progress=false", f"hydra.sweep.dir={tmp_path}/multirun"])
    assert code == 0, err[-3000:]
    recs = read_records(tmp_path)
    assert sorted(r["valuer"] for r in recs) == sorted(["loo", "mc_shapley", "random", "random",      # 2 jobs
                                                        "retrain_shapley", "retrain_shapley"] * 2)   # x smoke's 2 seeds
    assert all(r["status"] == "ok" for r in recs)
    # 2 seeds x 2^3 coalitions, trained once between the two jobs
    assert len(list((tmp_path / "cache" / "utility").glob("*/*.json"))) == 16
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 2
