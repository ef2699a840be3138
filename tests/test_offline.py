"""No network by default: the CLI sets the hub libraries and W&B offline unless the
command line opts in, and a smoke run passes with every non-loopback connection
refused (the session's ``smoke_run``, in this process; ``test_determinism`` runs the
real entry point in a fresh interpreter with the network blocked the same way and the
offline variables unset)."""
from __future__ import annotations

import os
import socket

import pytest
from conftest import block_network, read_records, run_cli, smoke_args

from bench.core.env import HUB_OFFLINE, wants_online


def test_online_is_opt_in():
    assert wants_online(["experiment=smoke"]) == {"hub": False, "wandb": False}
    assert wants_online(["model=hf", "model.online=true"])["hub"]
    assert wants_online(["task=hf_pref"])["hub"]
    assert wants_online(["logger=wandb_online"]) == {"hub": False, "wandb": True}


def test_the_network_block_works(monkeypatch):
    refused = block_network(monkeypatch)
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("example.com", 80), 3)
    assert refused == ["example.com"]


def test_smoke_runs_with_the_network_disabled(smoke_run):
    assert smoke_run.code == 0, smoke_run.stderr[-3000:]
    assert {r["valuer"] for r in smoke_run.records} == {"random", "loo", "retrain_shapley", "mc_shapley",
                                                        "dpo_arithmetic"}
    assert all(r["status"] == "ok" for r in smoke_run.records)
    assert smoke_run.refused == [], f"the run tried the network: {smoke_run.refused[:5]}"
    # the CLI set the offline variables itself (the run started without them)
    assert smoke_run.env == {**dict.fromkeys(HUB_OFFLINE, "1"), "WANDB_MODE": "offline"}


def test_online_opt_in_leaves_wandb_to_the_user(monkeypatch):
    """`logger=wandb_online` still sets the hub offline but leaves WANDB_MODE to the user."""
    for k in (*HUB_OFFLINE, "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    code, _, err = run_cli(["logger=wandb_online", "model=nope"])    # stops at the bad model, after the env
    assert code == 2 and "model=nope" in err
    assert all(os.environ.get(k) == "1" for k in HUB_OFFLINE) and "WANDB_MODE" not in os.environ


def test_valuer_target_must_be_the_projects_own(tmp_path, monkeypatch):
    from bench.harness import build as run
    from bench.core.errors import ConfigError
    (tmp_path / "valuer").mkdir()
    (tmp_path / "valuer" / "evil.yaml").write_text("_target_: os.system\nname: evil\n")
    monkeypatch.setattr(run, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError, match="_target_ 'os.system' is not a class in valuers/"):
        run.build_valuer("evil")


def test_wandb_failure_keeps_the_local_record(smoke_run, tmp_path, monkeypatch):
    """W&B breaking at run time (here: wandb.init raises) costs one warning, not the run
    (on the smoke job's cache: nothing is trained)."""
    import wandb

    def boom(*a, **k):
        raise RuntimeError("W&B is down")
    monkeypatch.setattr(wandb, "init", boom)
    args = smoke_args(tmp_path / "r", cache_dir=smoke_run.results / "cache")
    code, _, err = run_cli([a for a in args if a != "logger=none"] + ["logger=wandb", "valuer=[loo]"])
    assert code == 0, err[-3000:]
    assert "W&B init failed (RuntimeError: W&B is down)" in err
    recs = read_records(tmp_path / "r")
    assert {r["valuer"] for r in recs} == {"loo", "random", "retrain_shapley"}
    assert all(r["status"] == "ok" for r in recs)
