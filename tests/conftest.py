"""Shared fixtures: a tiny task, a tiny model spec and trainer settings, and one
session-wide cache folder so the tiny base model is built once per test session.

Everything here runs offline on the CPU. ``DVBENCH_TEST_THREADS`` (default 2)
sets torch's and the BLAS thread counts (of this process and of its children); use 1
when another process is already using the cores (oversubscribed OpenMP threads make
tiny-model training many times slower).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.core.env import use_environment  # noqa: E402

use_environment(force=True)     # offline and quiet whatever the developer's shell says

import pytest
import torch

N_THREADS = int(os.environ.get("DVBENCH_TEST_THREADS", "2"))
torch.set_num_threads(N_THREADS)
try:    # numpy's BLAS too, as OMP_NUM_THREADS does in the children (subprocess_env): the same
    from threadpoolctl import threadpool_limits   # thread count gives the same float sums in both
    threadpool_limits(N_THREADS)
except ImportError:
    pass

from bench.core.models import ModelSpec, load_base  # noqa: E402
from bench.core.partition import make_partition  # noqa: E402
from bench.core.task import synthetic_pref  # noqa: E402
from bench.core.train import TrainSettings  # noqa: E402

TINY_SOURCES = ("capitals", "tone", "reversal")
TASK_KW = dict(sources=list(TINY_SOURCES), n_train_per_source=20, n_eval_per_source=10,
               n_warmup_per_source=30, seed=0)
SPEC = ModelSpec(n_layer=1, n_embd=32, n_head=2, warmup_epochs=1)
TRAIN = TrainSettings(epochs=1, batch_size=8, lora_r=None)


def subprocess_env() -> dict:
    """Environment for child processes: offline, same thread count, repo importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(N_THREADS), MKL_NUM_THREADS=str(N_THREADS),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``dvbench <argv>`` in this process (no interpreter start-up, no re-import of the
    stack): returns (exit code, stdout, stderr). A few subprocess tests keep proving
    the real entry point (``python -m bench``)."""
    import contextlib
    import io

    from bench.cli import main
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv0 = sys.argv[:]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv[:] = argv0
    return code, out.getvalue(), err.getvalue()


# The smoke experiment (owner 2 = flipped tone pairs), made smaller but kept real: 3 owners
# of 20 pairs, 16 fine-tunes (8 coalitions x 2 seeds). Shared by the CLI, offline and
# determinism tests through the session's ``smoke_run``.
SMOKE = ["experiment=smoke", "logger=none", "n_jobs=1", "progress=false",
         "valuer=[random,loo,retrain_shapley,mc_shapley,dpo_arithmetic]",
         "task.n_train_per_source=40", "partition.sizes=[20,20,20]", "task.n_eval_per_source=20",
         "task.n_warmup_per_source=60", "model.n_embd=64", "train.epochs=3",
         "valuer.mc_shapley.max_permutations=3"]
LOOPBACK = ("127.0.0.1", "::1", "localhost")
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE")  # what the CLI sets


def smoke_args(results: Path, cache_dir: Path | None = None) -> list[str]:
    return [*SMOKE, f"results_dir={results}", f"cache_dir={cache_dir or results / 'cache'}",
            f"hydra.run.dir={results}/hydra"]


def block_network(monkeypatch) -> list:
    """Refuse every non-loopback connection and name lookup of this process; returns
    the list the refused addresses are appended to."""
    import socket
    refused = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def _connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
            refused.append(address)
            raise OSError(f"network disabled for this test: {address}")
        return connect(self, address)

    def _getaddrinfo(host, *a, **k):
        if host not in (None, "", *LOOPBACK):
            refused.append(host)
            raise socket.gaierror(f"network disabled for this test: {host}")
        return getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", _connect)
    monkeypatch.setattr(socket, "getaddrinfo", _getaddrinfo)
    return refused


@dataclass(frozen=True)
class SmokeRun:
    results: Path               # results_dir (tests may append records to it later: use ``records``)
    code: int
    stdout: str
    stderr: str
    records: list               # the run's records, read right after it
    version: str                # code version (cache keys) before the run
    refused: list               # non-loopback connections it attempted
    env: dict                   # the offline variables after the run (unset before it)


def read_records(results: Path, experiment: str = "smoke") -> list[dict]:
    from bench.tracking import read_jsonl       # shared fields read back (bench.tracking.store)
    path = results / "runs" / f"{experiment}.jsonl"
    return read_jsonl(path) if path.exists() else []


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One smoke job from an empty cache, in this process (``run_cli``), with the offline
    variables unset (the CLI must set them) and every non-loopback connection refused.
    Serves the CLI, offline and determinism tests."""
    results = tmp_path_factory.mktemp("smoke-results")
    version = code_version()
    with pytest.MonkeyPatch.context() as mp:
        for k in HUB_OFFLINE_VARS:
            mp.delenv(k, raising=False)
        refused = block_network(mp)
        code, out, err = run_cli(smoke_args(results))
        env = {k: os.environ.get(k) for k in HUB_OFFLINE_VARS}
    return SmokeRun(results, code, out, err, read_records(results), version, list(refused), env)


def time_runs_out_at(game, log, k: int, monkeypatch) -> list:
    """Make the game's time budget run out at the ``k``-th ``check_budget`` call (an hour
    passes on the open meter ``log``); returns the list that counts the calls."""
    real, seen = game.check_budget, []

    def clock_jumps():
        seen.append(1)
        if len(seen) == k:
            log.t0 -= 3600
        real()
    monkeypatch.setattr(game, "check_budget", clock_jumps)
    return seen


def code_version() -> str:
    """The hash the cache keys carry; it changes when game.py / train.py / models.py change."""
    from bench.core.game import code_version as cv
    return cv.__wrapped__()       # uncached: sees an edit made while the tests run


def skip_if_code_changed(before: str) -> None:
    """Others edit the code concurrently; an edit mid-test legitimately invalidates the cache."""
    if code_version() != before:
        pytest.skip("bench code changed during the test (cache keys changed); rerun")


def one_line(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg.strip()


@pytest.fixture(scope="session")
def tiny_task():
    return synthetic_pref(**TASK_KW)


@pytest.fixture(scope="session")
def tiny_spec():
    return SPEC


@pytest.fixture(scope="session")
def tiny_train():
    return TRAIN


@pytest.fixture(scope="session")
def tiny_partition(tiny_task):
    """3 owners, one per source; owner 2 (reversal) has its preferences flipped."""
    return make_partition(tiny_task, "by_source", owner_sources=list(TINY_SOURCES), noisy_owners=[2])


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dvbench-cache")


@pytest.fixture(scope="session")
def tiny_base(tiny_task, session_cache):
    """(model, tokenizer) of the tiny base, built once into the session cache."""
    return load_base(SPEC, tiny_task, session_cache)


@pytest.fixture
def fresh_cache(tmp_path, tiny_base, session_cache):
    """An empty game cache that shares the session's already-built base models."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(session_cache / "models", target_is_directory=True)
    return root


@pytest.fixture
def make_game(tiny_task, tiny_partition):
    from bench.core.game import Game

    def make(cache_dir, kind="union", seed=0, partition=None, train=TRAIN, metric="pref_acc", task=None):
        return Game(task or tiny_task, partition or tiny_partition, SPEC, train, kind=kind, seed=seed,
                    metric=metric, cache_dir=cache_dir, progress=False)
    return make


def record_build_locks(monkeypatch, module) -> list:
    """Make ``module.build_lock`` record each artefact path it locks (then lock it as
    usual); returns the list the paths are appended to."""
    from bench.core.cache import build_lock
    held = []

    def recording(path, *a, **kw):
        held.append(Path(path))
        return build_lock(path, *a, **kw)
    monkeypatch.setattr(module, "build_lock", recording)
    return held


@pytest.fixture(autouse=True)
def _fresh_reference_memo(monkeypatch):
    """Each test computes its own base reference log-probs (the influence valuers keep them
    per process, ``valuers.influence.subject``): no test depends on which ran before it."""
    import valuers.influence.subject as sub
    monkeypatch.setattr(sub, "_REFERENCE_MEMO", {})
