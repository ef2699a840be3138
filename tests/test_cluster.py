"""The cluster path on a real SLURM (``make cluster-up``: one slurmctld + slurmd on localhost;
``make test-cluster``). Every job goes through Hydra's submitit launcher
(``hydra/launcher=slurm``: real ``sbatch``, array jobs):

- a 2 x 2 sweep gives the same records as the same sweep run locally;
- one game's ground truth as an array of k shards into the shared cache, then ``assemble``:
  values bit-identical to the unsharded local run, each coalition trained exactly once;
- a shard job that kills itself mid-coalition (a fixed entry, after asking SLURM to requeue
  it: ``bench.core.faults``): the rerun finishes, nothing that had landed is trained again,
  the values are unchanged;
- the jobs run offline with the project's venv whatever the submitting shell's environment
  (offline variables unset, the venv off PATH; and with ``SBATCH_EXPORT=NONE``, no variable
  of the shell at all).

All of them are skipped, with the reason, when ``sinfo`` shows no idle node. The cache must
be on a filesystem the nodes share: the tests write under pytest's tmp_path, or under
``DVBENCH_CLUSTER_TMP`` (set it to a shared folder on a real cluster). With
``DVBENCH_CLUSTER_REPORT=<file>`` the tests append what they measured (wall times, sinfo and
sacct lines, the requeue) to that file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import HUB_OFFLINE_VARS, N_THREADS, REPO, read_records, subprocess_env

cluster_test = pytest.mark.cluster    # every test but the first (fast, no cluster) needs `make cluster-up`

# the launcher's `slurm:` settings for a CPU-only node (whatever conf/local/default.yaml says)
SLURM = ["hydra/launcher=slurm", "slurm.partition=null", "slurm.account=null", "slurm.gpus_per_node=null",
         f"slurm.cpus_per_task={N_THREADS}", "slurm.mem_gb=2", "slurm.timeout_min=30", "slurm.array_parallelism=2"]
# the tiny tier, seconds per job: smoke's 3 owners (sweep), sweep_tiny's 4 owners (shards)
SMALL = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]",
         "progress=false", "logger=none", "lds.n_subsets=0", "valuer=[loo]"]
SWEEP = ["train.epochs=1,2", "model.n_layer=1,2"]
GAME = ["experiment=sweep_tiny", "progress=false", "logger=none", "lds.n_subsets=0", "valuer=[loo,mc_shapley]"]
N_TRUTH = 2 * 2 ** 4                   # sweep_tiny: 4 owners, seeds [0, 1]
VALUE_KEYS = ("status", "owner_values", "point_values", "stderr", "exact_values", "reference_values", "consensus",
              "utility_table", "metrics")
SHARD_LINE = re.compile(r"\[dvbench\] shard (\d+)/(\d+): (\d+) of (\d+) ground-truth coalitions "
                        r"\((\d+) trained, (\d+) cached\)")
JOB_LINE = re.compile(r"\[dvbench\] slurm job (\S+) \(id (\d+), restarts (\d+)\) on \S+: python (\S+), (.*)$", re.M)
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")


# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def cluster() -> list[str]:
    """The idle nodes ``sinfo`` shows; skips the test when there are none."""
    if not shutil.which("sinfo"):
        pytest.skip("no SLURM here: `sinfo` not found (make cluster-up starts a one-node cluster on localhost)")
    try:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %c %m %P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("no SLURM controller answers `sinfo` (make cluster-up)")
    nodes = [ln for ln in p.stdout.splitlines() if ln.split()[1:2] and ln.split()[1] in ("idle", "mixed")]
    if p.returncode or not nodes:
        pytest.skip(f"no idle SLURM node (sinfo: {(p.stdout or p.stderr).strip()[:200] or 'nothing'}); make cluster-up")
    report("sinfo -N (before the tests)", nodes)
    return nodes


@pytest.fixture
def shared(tmp_path) -> Path:
    """A folder every node sees: tmp_path here (one node), DVBENCH_CLUSTER_TMP on a real cluster."""
    base = os.environ.get("DVBENCH_CLUSTER_TMP")
    if not base:
        return tmp_path
    d = Path(base) / f"dvbench-test-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    return d


def report(title: str, lines) -> None:
    text = f"\n### {title}\n\n```\n" + "\n".join(str(x) for x in lines) + "\n```\n"
    print(text)
    path = os.environ.get("DVBENCH_CLUSTER_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(text)


def shell_env(**extra) -> dict:
    """The submitting shell: no offline variables, the venv not on PATH, not activated."""
    env = subprocess_env()
    for k in (*HUB_OFFLINE_VARS, "VIRTUAL_ENV", "HF_HOME"):
        env.pop(k, None)
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(extra)
    return env


def bench(args: list[str], env: dict | None = None, timeout: int = 1800) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m bench <args>`` with the venv's python; (the process, wall seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run([VENV_PYTHON, "-m", "bench", *args], cwd=REPO, env=env or shell_env(), capture_output=True,
                       text=True, timeout=timeout)
    return p, time.perf_counter() - t0


def entries(results: Path) -> list[Path]:
    return sorted((results / "cache" / "utility").glob("*/*.json"))


def job_logs(sweep_dir: Path) -> dict[str, str]:
    """submitit's log of each job: {'<array id>_<task>' or '<job id>': stdout + stderr}."""
    out = {}
    for f in sorted(sweep_dir.glob(".submitit/*/*_log.out")):
        err = f.with_name(f.name.replace("_log.out", "_log.err"))
        out[f.parent.name] = f.read_text() + (err.read_text() if err.exists() else "")
    return out


def sacct(job: str) -> list[str]:
    """The jobs' accounting lines (every attempt of a requeued job: -D), or why there are none."""
    if not shutil.which("sacct"):
        return ["(no sacct)"]
    p = subprocess.run(["sacct", "-D", "-X", "-P", "-j", job, "-o",
                        "JobID,JobName%30,State,ExitCode,Elapsed,NodeList,AllocCPUS,ReqMem,Start,End"],
                       capture_output=True, text=True, timeout=30)
    return p.stdout.splitlines() if p.returncode == 0 else [f"(sacct failed: {p.stderr.strip()})"]


def array_id(logs: dict[str, str]) -> str:
    ids = {k.split("_")[0] for k in logs}
    assert len(ids) == 1, f"expected one array job, got {sorted(logs)}"
    return ids.pop()


def check_job_env(logs: dict[str, str], threads: int = N_THREADS) -> None:
    """Every job ran the venv's python, offline, with the job's thread count."""
    for name, text in logs.items():
        lines = JOB_LINE.findall(text)
        assert lines, f"job {name} printed no environment line:\n{text[-2000:]}"
        for _, _, _, python, env in lines:
            assert python == VENV_PYTHON, (name, python)
            got = dict(kv.split("=", 1) for kv in env.split())
            assert {k: got.get(k) for k in HUB_OFFLINE_VARS} == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                                 "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
            assert got.get("OMP_NUM_THREADS") == str(threads), (name, env)


def values(records: list[dict], *keys: str) -> dict:
    """{(config values at ``keys``..., valuer, seed): the record's values as canonical JSON}."""
    def at(rec, key):
        node = rec["config"]
        for part in key.split("."):
            node = node[part]
        return node
    out = {}
    for r in records:
        k = (*(at(r, key) for key in keys), r["valuer"], r["seed"])
        assert k not in out, f"two records for {k}"
        out[k] = json.dumps({v: r.get(v) for v in VALUE_KEYS}, sort_keys=True)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a and set(a) == set(b), (sorted(a), sorted(b))
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"{len(diff)} of {len(a)} records differ, e.g. {diff[0]}:\n{a[diff[0]][:800]}\n{b[diff[0]][:800]}"


def shard_lines(logs: dict[str, str]) -> list[tuple[int, ...]]:
    return [tuple(map(int, m)) for text in logs.values() for m in SHARD_LINE.findall(text)]


# ------------------------------------------------------------------ the unsharded local reference

@pytest.fixture(scope="module")
def local_truth(cluster, tmp_path_factory):
    """sweep_tiny's job run locally, from an empty cache (the reference of the shard tests)."""
    out = tmp_path_factory.mktemp("local-truth")
    p, wall = bench([*GAME, f"results_dir={out}", f"hydra.run.dir={out}/hydra"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(entries(out)) == N_TRUTH
    recs = read_records(out, "sweep_tiny")
    assert recs and all(r["status"] == "ok" for r in recs)
    return recs, wall


# ------------------------------------------------------------------ the tests

def test_job_environment_without_the_shell(monkeypatch):
    """What a SLURM job's own process does first (no cluster needed): offline variables set,
    threads = the job's CPUs when OMP_NUM_THREADS is unset, one line naming python and host."""
    import torch

    from bench.core.env import use_job_environment
    for k in (*HUB_OFFLINE_VARS, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert use_job_environment([]) is None and os.environ["HF_HUB_OFFLINE"] == "1"     # not a SLURM job
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(N_THREADS))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    threads = torch.get_num_threads()
    try:
        line = use_job_environment(["experiment=smoke"])
    finally:
        torch.set_num_threads(threads)
    m = JOB_LINE.fullmatch(line)
    assert m and m.group(1, 2, 3, 4) == ("42", "42", "1", sys.executable), line
    assert f"HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline " \
           f"OMP_NUM_THREADS={N_THREADS}" == m.group(5)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")                  # the user's own setting wins
    assert "OMP_NUM_THREADS=7" in use_job_environment([])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")                    # as does an explicit online choice
    assert "HF_HUB_OFFLINE=0" in use_job_environment([])


@cluster_test
def test_sweep_2x2_through_sbatch_equals_the_local_sweep(cluster, shared):
    local, slurm = shared / "local", shared / "slurm"
    p, local_s = bench(["-m", *SMALL, *SWEEP, f"results_dir={local}", f"hydra.sweep.dir={local}/multirun"])
    assert p.returncode == 0, p.stderr[-3000:]
    p, slurm_s = bench(["-m", *SLURM, *SMALL, *SWEEP, f"results_dir={slurm}", f"hydra.sweep.dir={slurm}/multirun"])
    assert p.returncode == 0, p.stderr[-3000:]

    logs = job_logs(slurm / "multirun")
    job = array_id(logs)
    assert sorted(logs) == [f"{job}_{i}" for i in range(4)], sorted(logs)    # one array of 4 tasks
    check_job_env(logs)
    acct = sacct(job)
    report("2 x 2 sweep (train.epochs=1,2 x model.n_layer=1,2), smoke game of 3 owners, seeds 0, 1",
           [f"local (basic launcher, one process): {local_s:.1f} s; SLURM array {job} (4 tasks, 2 at a time): "
            f"{slurm_s:.1f} s", *acct, *[m.group(0) for t in logs.values() for m in JOB_LINE.finditer(t)]])
    if acct and "|" in acct[0]:
        states = [ln.split("|")[2] for ln in acct[1:]]
        assert states == ["COMPLETED"] * 4, acct

    a = values(read_records(local), "train.epochs", "model.n_layer")
    b = values(read_records(slurm), "train.epochs", "model.n_layer")
    assert len(a) == 4 * 3 * 2                        # 4 jobs x (random, retrain_shapley, loo) x 2 seeds
    assert_same(a, b)
    assert len(entries(local)) == len(entries(slurm)) == 4 * 16


def _shards(results: Path, k: int) -> list[str]:
    return ["-m", *SLURM, *GAME, "game.shard=" + ",".join(f"{i}/{k}" for i in range(k)), f"results_dir={results}",
            f"hydra.sweep.dir={results}/multirun"]


def _assemble_equals(results: Path, local_truth) -> float:
    before = entries(results)
    p, wall = bench(["assemble", *GAME, f"results_dir={results}", f"hydra.run.dir={results}/hydra"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[dvbench] assemble: all 32 ground-truth coalitions are cached" in p.stdout, p.stdout[-2000:]
    assert entries(results) == before                 # assemble trained nothing
    assert_same(values(local_truth[0]), values(read_records(results, "sweep_tiny")))
    return wall


@cluster_test
def test_sharded_truth_as_an_array_then_assemble(cluster, shared, local_truth):
    k = 4
    results = shared / "sharded"
    p, slurm_s = bench(_shards(results, k))
    assert p.returncode == 0, p.stderr[-3000:]
    logs = job_logs(results / "multirun")
    job = array_id(logs)
    assert sorted(logs) == [f"{job}_{i}" for i in range(k)]
    check_job_env(logs)
    lines = shard_lines(logs)
    assert sorted(x[0] for x in lines) == list(range(k)) and all(x[1] == k for x in lines)
    # each coalition trained exactly once: every shard trained its whole slice, none found one cached,
    # and the cache holds one entry per coalition
    assert sum(x[4] for x in lines) == N_TRUTH and sum(x[5] for x in lines) == 0
    assert len(entries(results)) == N_TRUTH
    assemble_s = _assemble_equals(results, local_truth)
    report(f"ground truth of sweep_tiny (4 owners, seeds 0, 1: {N_TRUTH} coalitions) as a SLURM array of {k} shards",
           [f"local unsharded job: {local_truth[1]:.1f} s; {k} shards through SLURM: {slurm_s:.1f} s "
            f"+ assemble (local): {assemble_s:.1f} s",
            *(f"shard {i}/{kk}: {n} of {of} coalitions, {t} trained, {c} cached" for i, kk, n, of, t, c in sorted(lines)),
            f"cache entries: {len(entries(results))}; values == the local run's (every record of loo, mc_shapley, "
            f"random, retrain_shapley x 2 seeds)", *sacct(job)])


KILL_AT = 4          # task 0 dies writing its 4th ground-truth entry: 3 landed, the 4th trained and lost


@cluster_test
def test_a_shard_killed_mid_coalition_and_requeued(cluster, shared, local_truth):
    """The kill is placed by the job itself (``bench.core.faults``): array task 0, on its
    first attempt, asks SLURM to requeue it and SIGKILLs itself while writing its
    ``KILL_AT``-th utility entry (fine-tuned, fsynced, not yet renamed into place). So the
    same entry is lost on every run, the job never shows FAILED to the launcher (it goes
    RUNNING -> REQUEUED -> PENDING), and the rerun must find exactly ``KILL_AT - 1`` entries
    of its own and train the rest. (Before: the test killed from outside after a sleep,
    and raced the launcher's state polling.)"""
    k = 2
    results = shared / "requeued"
    sweep_dir = results / "multirun"
    env = shell_env(DVBENCH_KILL_AT=f"cache_write/utility:{KILL_AT}@SLURM_ARRAY_TASK_ID=0", DVBENCH_KILL_REQUEUE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([VENV_PYTHON, "-m", "bench", *_shards(results, k)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", array_id(job_logs(sweep_dir))], timeout=30)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, err[-3000:]

    logs = job_logs(sweep_dir)
    job = array_id(logs)
    task = f"{job}_0"
    check_job_env(logs)
    runs = [(int(m.group(3)), m.group(1)) for m in JOB_LINE.finditer(logs[task])]
    assert [r for r, _ in runs] == [0, 1], runs       # task 0 ran twice: the first attempt and the requeued one
    lines = {x[0]: x for x in shard_lines(logs)}
    assert sorted(lines) == [0, 1]                    # the killed attempt printed no shard line; the rerun did
    _, _, n0, _, trained0, cached0 = lines[0]
    assert cached0 == KILL_AT - 1 and trained0 == n0 - cached0     # the landed entries reused, the lost one redone
    assert lines[1][5] == 0 and lines[1][4] == lines[1][2]         # task 1 (never killed) trained its own
    now = entries(results)
    assert len(now) == N_TRUTH == n0 + lines[1][2]                 # so each coalition was trained exactly once
    assert not list(results.rglob(".*.tmp")), "a stray temp file of the killed writer"
    _assemble_equals(results, local_truth)
    report("a shard killed mid-coalition by itself and requeued (sweep_tiny, 2 shards)",
           [f"task 0, first attempt: scontrol requeue + SIGKILL at its utility write {KILL_AT}",
            f"rerun of shard 0/2: {trained0} trained, {cached0} cached (landed before the kill); shard 1/2: "
            f"{lines[1][4]} trained; entries {len(now)} = {N_TRUTH}; values == the local run's; total wall {wall:.1f} s",
            *[m.group(0) for m in JOB_LINE.finditer(logs[task])], *sacct(job)])


@cluster_test
def test_jobs_run_offline_with_the_venv_when_nothing_is_exported(cluster, shared):
    """SBATCH_EXPORT=NONE: the job gets none of the submitting shell's variables (a marker
    variable shows it), yet runs the venv's python offline with the job's thread count."""
    results = shared / "bare"
    env = shell_env(SBATCH_EXPORT="NONE", DVBENCH_SUBMIT_MARKER="from-the-shell")
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    import yaml
    setup = yaml.safe_load((REPO / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())["setup"]
    setup = ",".join(f"'{c}'" for c in [*setup, "echo marker=$DVBENCH_SUBMIT_MARKER home=$HOME"])
    p, wall = bench(["-m", *SLURM, *GAME, "game.shard=0/16", f"results_dir={results}",
                     f"hydra.sweep.dir={results}/multirun", f"hydra.launcher.setup=[{setup}]"], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    logs = job_logs(results / "multirun")
    assert len(logs) == 1
    (name, text), = logs.items()
    assert "marker= " in text, text[-2000:]           # the shell's variable did not reach the job
    check_job_env(logs, threads=N_THREADS)            # OMP_NUM_THREADS from SLURM_CPUS_PER_TASK
    assert [x[4] for x in shard_lines(logs)] == [N_TRUTH // 16]
    report("a job with SBATCH_EXPORT=NONE (the submitting shell's variables not exported)",
           [f"{wall:.1f} s", *[ln for ln in text.splitlines() if ln.startswith(("marker=", "[dvbench]"))],
            *sacct(name.split("_")[0])])
