"""No network by default: the CLI sets the hub libraries and W&B offline unless the
command line opts in, and a smoke run passes with every non-loopback connection
refused for the process (and its workers)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from bench.core.env import wants_online

BLOCK = '''
import socket
_orig = socket.socket.connect
def _connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"network disabled for this test: {address}")
    return _orig(self, address)
socket.socket.connect = _connect
_orig_gai = socket.getaddrinfo
def _gai(host, *a, **k):
    if host not in (None, "127.0.0.1", "::1", "localhost", ""):
        raise socket.gaierror(f"network disabled for this test: {host}")
    return _orig_gai(host, *a, **k)
socket.getaddrinfo = _gai
'''


def test_online_is_opt_in():
    assert wants_online(["experiment=smoke"]) == {"hub": False, "wandb": False}
    assert wants_online(["model=hf", "model.online=true"])["hub"]
    assert wants_online(["task=hf_pref"])["hub"]
    assert wants_online(["logger=wandb_online"]) == {"hub": False, "wandb": True}


def test_smoke_runs_with_the_network_disabled(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    env = subprocess_env()
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        env.pop(k, None)                       # the CLI itself must set these
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('example.com', 80), 3)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "network disabled" in probe.stderr          # the block works
    out = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke", "task.n_train_per_source=10",
                          "task.n_eval_per_source=8", "partition.sizes=[8,5,5]", "valuers=[loo]",
                          f"results_dir={tmp_path}/r", "progress=false"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "r" / "runs" / "smoke.jsonl").read_text().splitlines()]
    assert {r["valuer"] for r in recs} == {"loo", "random", "retrain_shapley"}
    assert all(r["status"] == "ok" for r in recs)
    assert "W&B init failed" not in out.stderr          # offline W&B needs no network either


def test_valuer_target_must_be_the_projects_own(tmp_path, monkeypatch):
    from bench.harness import build as run
    from bench.core.errors import ConfigError
    (tmp_path / "valuer").mkdir()
    (tmp_path / "valuer" / "evil.yaml").write_text("_target_: os.system\nname: evil\n")
    monkeypatch.setattr(run, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError, match="_target_ 'os.system' is not a class in valuers/"):
        run.build_valuer("evil")


def test_wandb_failure_keeps_the_local_record(tmp_path):
    """W&B breaking at run time (here: wandb.init raises) costs one warning, not the run."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import wandb\n"
        "def _boom(*a, **k):\n    raise RuntimeError('W&B is down')\n"
        "wandb.init = _boom\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke", "task.n_train_per_source=10",
                          "task.n_eval_per_source=8", "partition.sizes=[8,5,5]", "valuers=[loo]", "logger=wandb",
                          f"results_dir={tmp_path}/r", "progress=false"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "W&B init failed (RuntimeError: W&B is down)" in out.stderr
    recs = [json.loads(x) for x in (tmp_path / "r" / "runs" / "smoke.jsonl").read_text().splitlines()]
    assert {r["valuer"] for r in recs} == {"loo", "random", "retrain_shapley"}
