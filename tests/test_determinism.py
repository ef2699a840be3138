"""Determinism on CPU: the same config and seed, run twice from empty caches, in this
process and in a fresh interpreter (``python -m bench``: another hash seed, the real
entry point, the offline variables unset and the network refused), gives identical
values for every valuer (bit for bit)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import HUB_OFFLINE_VARS, REPO, read_records, run_cli, smoke_args, subprocess_env

# refuses every non-loopback connection of the child (installed as its sitecustomize)
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


def run_child(out, args) -> list[dict]:
    """``python -m bench <args>`` offline by the CLI's own doing, with the network refused."""
    site = out / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(BLOCK)
    env = subprocess_env()
    for k in HUB_OFFLINE_VARS:
        env.pop(k, None)                       # the CLI itself must set these
    env.pop("PYTHONHASHSEED", None)            # a hash seed of its own
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('example.com', 80), 3)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "network disabled" in probe.stderr          # the block works
    p = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return read_records(out / "r")


def _check(a, b):
    a, b = ({r["valuer"]: r for r in recs} for recs in (a, b))
    assert set(a) == set(b) and a
    for name in a:
        assert a[name]["status"] == b[name]["status"] == "ok", name
        assert a[name]["owner_values"] == b[name]["owner_values"], name
        assert a[name].get("point_values") == b[name].get("point_values"), name
        assert a[name]["utility_table"] == b[name]["utility_table"], name


def test_two_cpu_runs_give_identical_values(smoke_run, tmp_path):
    """The session's smoke job (in this process) against the same job in a fresh interpreter."""
    assert smoke_run.code == 0, smoke_run.stderr[-3000:]
    _check(smoke_run.records, run_child(tmp_path, smoke_args(tmp_path / "r")))


@pytest.mark.slow
def test_two_cpu_runs_of_every_valuer_are_identical(tmp_path):
    args = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]",
            "progress=false", "logger=none", "valuer=all", "lds.n_subsets=3"]
    code, _, err = run_cli([*args, f"results_dir={tmp_path}/a/r", f"hydra.run.dir={tmp_path}/a/h"])
    assert code == 0, err[-3000:]
    _check(read_records(tmp_path / "a" / "r"),
           run_child(tmp_path / "b", [*args, f"results_dir={tmp_path}/b/r", f"hydra.run.dir={tmp_path}/b/h"]))
