"""Hardware slug, device detection, preset choice, and the `make bench` / `make
bench-micro` drivers (bench/cli/hardware.py; detection in bench/tracking/system.py). Fast: child processes are faked, nothing trains."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, one_line

from bench.cli import hardware
from bench.tracking import ResultsStore, hardware_fingerprint, hardware_slug, read_jsonl, system

SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
GIB = 2**30


def hw(cpu="AMD EPYC 7763 64-Core Processor", n_cpus=2, ram_gib=24, gpus=(), **kw) -> dict:
    return {"cpu": cpu, "n_cpus": n_cpus, "ram_bytes": int(ram_gib * GIB), "gpus": list(gpus),
            "cuda": bool(gpus), "mps": False, "hip_version": None, **kw}


# --------------------------------------------------------------------------- slug

@pytest.mark.parametrize("fake, want", [
    (hw(), "cpu-2c-24g-amd-epyc-7763"),
    (hw(cpu="Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", n_cpus=56, ram_gib=251.6),
     "cpu-56c-252g-intel-xeon-e5-2680-v4"),
    (hw(n_cpus=32, gpus=["NVIDIA A100-SXM4-80GB"] * 2), "cuda-a100-sxm4-80gb-x2-32c"),
    (hw(n_cpus=16, gpus=["NVIDIA GeForce RTX 4090"]), "cuda-rtx-4090-x1-16c"),
    (hw(n_cpus=16, gpus=["NVIDIA A100-SXM4-80GB", "Tesla T4"]), "cuda-a100-sxm4-80gb-x2-mixed-16c"),
    (hw(n_cpus=64, gpus=["AMD Instinct MI250X"], hip_version="6.0"), "rocm-amd-instinct-mi250x-x1-64c"),
    (hw(cpu="arm", cpu_name="Apple M2 Pro", n_cpus=12, ram_gib=32, mps=True), "mps-apple-m2-pro-32g"),
])
def test_slug_of_known_machines(fake, want):
    assert hardware_slug(fake) == want


@pytest.mark.parametrize("fake", [
    hw(cpu=""), hw(cpu=None, n_cpus=None, ram_gib=0), hw(cpu="../../etc/passwd; rm -rf /"),
    hw(cpu="Ünïcödé CPU™ (R) @@ 3 GHz"), hw(cpu="x" * 300), hw(gpus=["GPU / with : odd * chars"] * 3),
    {},
])
def test_slug_is_filesystem_safe(fake):
    slug = hardware_slug(fake)
    assert SLUG_RE.match(slug) and len(slug) <= 64, slug
    assert "/" not in slug and not slug.startswith((".", "-"))


def test_slug_is_stable_and_distinguishes_machines():
    a = hardware_slug()
    assert SLUG_RE.match(a) and a == hardware_slug() == hardware_slug(hardware_fingerprint())
    # extra fields (what hardware_fingerprint(devices=True) adds) do not change it
    assert hardware_slug({**hardware_fingerprint(), "device": "cpu", "driver": None}) == a
    base = hw()
    variants = [hw(n_cpus=4), hw(ram_gib=64), hw(cpu="Intel(R) Xeon(R) Gold 6248"),
                hw(gpus=["Tesla T4"]), hw(gpus=["Tesla T4"] * 2)]
    slugs = {hardware_slug(base)} | {hardware_slug(v) for v in variants}
    assert len(slugs) == 1 + len(variants)
    # RAM a little under the nominal size (what the kernel reserves) keeps the slug
    assert hardware_slug(hw(ram_gib=23.54)) == hardware_slug(hw(ram_gib=24))


def test_hardware_id_is_unchanged_by_the_new_fields():
    fp = hardware_fingerprint()
    key = json.dumps([fp["cpu"], fp["n_cpus"], round((fp["ram_bytes"] or 0) / GIB), fp["gpus"]])
    assert fp["id"] == hashlib.sha256(key.encode()).hexdigest()[:12]
    assert {"mps", "hip_version", "cpu_name"} <= set(fp)


# --------------------------------------------------------------------------- detection + preset

def test_detection_never_raises_without_cuda(monkeypatch):
    import torch

    def boom(*a, **k):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert system.detect_device() in ("cpu", "mps")
    assert system.cuda_devices() == []
    monkeypatch.setattr(system.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import fails
    assert system.driver_version() is None


def test_fingerprint_of_this_machine():
    fp = hardware_fingerprint(devices=True)
    assert fp["device"] in ("cpu", "cuda", "mps") and fp["slug"] == hardware_slug()
    text = hardware.format_fingerprint(fp)
    for word in ("hardware", "device", "cpu", "torch", fp["slug"]):
        assert word in text


def test_format_fingerprint_of_a_gpu_machine():
    fp = {**hw(n_cpus=32, gpus=["NVIDIA A100-SXM4-80GB"]), "id": "abc", "torch": "2.13.0+cu128",
          "cuda_version": "12.8", "device": "cuda", "driver": "570.86.15", "cudnn": 91000,
          "devices": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 * GIB,
                       "capability": "8.0"}], "python": "3.11", "platform": "Linux"}
    fp["slug"] = hardware_slug(fp)
    text = hardware.format_fingerprint(fp)
    for want in ("cuda-a100-sxm4-80gb-x1-32c", "A100-SXM4-80GB, 80.0 GiB", "capability 8.0",
                 "570.86.15", "CUDA build 12.8", "cuDNN 91000", "32 logical cores"):
        assert want in text


def _fake_device(monkeypatch, device, mem_gib=()):
    monkeypatch.setattr(hardware, "detect_device", lambda: device)
    monkeypatch.setattr(hardware, "cuda_devices", lambda: [
        {"index": i, "name": "GPU", "memory_bytes": int(m * GIB), "capability": "8.0"}
        for i, m in enumerate(mem_gib)])


@pytest.mark.parametrize("device, mem, want", [
    ("cpu", (), "default"),
    ("cuda", (80,), "default_gpu"),
    ("cuda", (24, 24), "default_gpu"),
    ("cuda", (7.6,), "default"),          # too small for the full fine-tune
    ("cuda", (80, 6), "default"),         # the smallest GPU decides
    ("mps", (), "default"),
])
def test_preset_choice(monkeypatch, device, mem, want):
    _fake_device(monkeypatch, device, mem)
    preset, why = hardware.choose_preset()
    assert preset == want and why
    assert (REPO / "conf" / "experiment" / f"{preset}.yaml").is_file()


def test_cli_preset_and_slug(monkeypatch, capsys):
    _fake_device(monkeypatch, "cuda", (40,))
    assert hardware.main(["preset"]) == 0
    assert capsys.readouterr().out.strip() == "default_gpu"
    assert hardware.main(["slug"]) == 0
    assert capsys.readouterr().out.strip() == hardware_slug()


@pytest.mark.parametrize("argv, field", [
    (["bogus"], "arguments"),
    (["bench", "--preset", "nope"], "preset"),
    (["bench", "--", "experiment=smoke"], "ARGS"),
    (["micro", "--tolerance", "0"], "tolerance"),
    (["micro", "--tolerance", "abc"], "arguments"),
    (["micro", "--tolerance", "2.5"], "arguments"),     # pytest-benchmark takes whole percents
])
def test_bad_input_is_one_line_error(argv, field, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "_run", lambda *a, **k: pytest.fail("must not run anything"))
    with pytest.raises(SystemExit) as e:
        hardware.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert one_line(err) and err.startswith(f"error: {field}"), err


def test_default_gpu_preset_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            gpu = OmegaConf.to_container(compose("config", ["experiment=default_gpu"]), resolve=True)
            cpu = OmegaConf.to_container(compose("config", ["experiment=default"]), resolve=True)
    finally:
        GlobalHydra.instance().clear()
    assert gpu["experiment_name"] == "default_gpu" and gpu["model"]["kind"] == "smollm2"
    assert gpu["train"]["precision"] == "auto" and cpu["train"]["precision"] == "fp32"   # bf16 where native
    assert {**gpu["train"], "precision": None} == {**cpu["train"], "precision": None}    # else the same LoRA trainer
    assert gpu["train"]["lora_r"] is not None
    assert gpu["valuer"]["influence_naive"] == cpu["valuer"]["influence_naive"]      # comparable with default
    assert gpu["game"]["pack"] == 8 > cpu["game"]["pack"] == 1                     # ... packed on the GPU
    part = gpu["partition"]
    n_owners = len(part["owner_sources"]) + len(part["duplicate_pairs"])
    assert n_owners == 6 > len(cpu["partition"]["owner_sources"])
    assert part["noisy_owners"] == [4] and part["duplicate_pairs"] == [[5, 1]]


# --------------------------------------------------------------------------- make bench driver

COMMIT = "c" * 40


class FakeRuns:
    """Stands in for the child processes; the benchmark run appends records."""

    def __init__(self, results: Path, hw_dict: dict, run_rc=0, compare_rc=0, report_has_out=True,
                 writes_records=True):
        self.results, self.hw, self.calls = results, hw_dict, []
        self.run_rc, self.compare_rc, self.report_has_out = run_rc, compare_rc, report_has_out
        self.writes_records = writes_records

    def __call__(self, cmd, capture=False):
        self.calls.append(list(cmd))
        rc, out, err = 0, "", ""
        sub = cmd[3] if len(cmd) > 3 else ""
        if cmd[1:3] == ["-m", "bench"] and (sub.startswith("experiment=") or sub == "assemble"):
            names = [a.split("=", 1)[1] for a in cmd[3:] if a.startswith(("experiment=", "experiment_name="))]
            store = ResultsStore(self.results)
            for v in ("exact", "loo") if self.writes_records else ():
                store.append(record(names[-1], v, hardware=self.hw,
                                    status="failed" if (self.run_rc and v == "loo") else "ok"))
            rc = self.run_rc
        elif sub == "report":
            if "--out" in cmd and not self.report_has_out:
                rc, err = 2, "error: unrecognized arguments: --out x"
            elif "--out" in cmd:
                Path(cmd[cmd.index("--out") + 1]).write_text("# report\n")
            else:
                out = "| valuer |\n|---|\n| exact |\n"
        elif sub == "compare":
            rc = self.compare_rc
        return subprocess.CompletedProcess(cmd, rc, out, err)

    def kinds(self):
        return [c[3].split("=")[0] for c in self.calls]


def record(exp, valuer, seed=0, commit=COMMIT, hardware=None, status="ok"):
    return {"experiment": exp, "valuer": valuer, "game": "union", "seed": seed, "commit": commit,
            "dirty": False, "hardware": hardware or {}, "status": status,
            "timestamp": "2025-01-01T00:00:00+00:00", "metrics": {}}


@pytest.fixture
def driver(monkeypatch, tmp_path):
    """bench_main on a faked CPU machine, at a faked commit, with faked child processes."""
    fake_hw = hw(cpu="Fake CPU 9000", n_cpus=2, ram_gib=8)
    fp = {**fake_hw, "id": "fake", "torch": "x", "cuda_version": None, "device": "cpu",
          "devices": [], "driver": None, "cudnn": None, "python": "3", "platform": "test"}
    fp["slug"] = hardware_slug(fake_hw)
    monkeypatch.setattr(hardware, "hardware_fingerprint", lambda **k: dict(fp))
    _fake_device(monkeypatch, "cpu")
    import bench.tracking
    monkeypatch.setattr(bench.tracking, "git_info", lambda *a, **k: {"commit": COMMIT, "dirty": False})
    results = tmp_path / "res"

    def make(**kw):
        fake = FakeRuns(results, fake_hw, **kw)
        monkeypatch.setattr(hardware, "_run", fake)
        return fake

    return make, results, fp["slug"]


def test_bench_without_baseline_writes_report_and_candidate(driver, capsys):
    make, results, slug = driver
    assert slug == "cpu-2c-8g-fake-9000"
    store = ResultsStore(results)     # records the candidate must leave out
    store.append(record("default", "exact", seed=1, commit="d" * 40, hardware=hw(cpu="Fake CPU 9000", ram_gib=8)))
    store.append(record("default", "exact", seed=2, hardware=hw(cpu="Other CPU", ram_gib=8)))
    fake = make()
    rc = hardware.bench_main(None, ["--", "seed=0", f"results_dir={results}"])
    assert rc == 0
    assert fake.calls[0] == [sys.executable, "-m", "bench", "experiment=default", "seed=0",
                             f"results_dir={results}", "truth=off"]     # it measures this machine: no shipped truth
    assert fake.kinds() == ["experiment", "report"]          # no baseline: no compare
    assert fake.calls[1][fake.calls[1].index("--commit") + 1] == COMMIT
    assert (results / "report.md").read_text() == "# report\n"
    cand = read_jsonl(results / "baselines" / f"{slug}.candidate.jsonl")
    assert sorted((r["valuer"], r["seed"]) for r in cand) == [("exact", 0), ("loo", 0)]
    assert not (results / "baselines" / f"{slug}.jsonl").exists()
    out = capsys.readouterr().out
    assert slug in out and "preset    default" in out and "no committed baseline" in out


def test_bench_compares_with_the_committed_baseline(driver, capsys):
    make, results, slug = driver
    committed = results / "baselines" / f"{slug}.jsonl"
    committed.parent.mkdir(parents=True)
    committed.write_text("".join(json.dumps(record(e, "exact", commit="b" * 40)) + "\n"
                                 for e in ("default", "quick")))
    fake = make(compare_rc=1)
    rc = hardware.bench_main(None, [f"results_dir={results}"])
    assert rc == 0                                  # a regression alone does not fail make bench
    assert fake.kinds() == ["experiment", "report", "compare"]
    cmp = fake.calls[2]
    assert cmp[cmp.index("--baseline") + 1] == str(committed)
    assert cmp[cmp.index("--experiment") + 1] == "default"
    assert cmp[cmp.index("--commit") + 1] == COMMIT
    assert cmp[cmp.index("--results") + 1] == str(results)
    assert "REGRESSION" in capsys.readouterr().out
    # the candidate keeps the committed records of other presets and replaces this one's
    cand = read_jsonl(results / "baselines" / f"{slug}.candidate.jsonl")
    assert {(r["experiment"], r["commit"][0]) for r in cand} == {("quick", "b"), ("default", "c")}
    assert read_jsonl(committed)[0]["commit"] == "b" * 40          # the baseline is untouched

    make(compare_rc=1)
    assert hardware.bench_main(None, [f"results_dir={results}"], strict=True) == 1


def test_bench_failed_run_keeps_its_exit_status(driver, capsys):
    make, results, slug = driver
    committed = results / "baselines" / f"{slug}.jsonl"
    committed.parent.mkdir(parents=True)
    committed.write_text(json.dumps(record("quick", "exact", commit="b" * 40)) + "\n")
    fake = make(run_rc=1)
    rc = hardware.bench_main("quick", [f"results_dir={results}", "n_jobs=2"])
    assert rc == 1
    assert fake.calls[0][3:] == ["experiment=quick", f"results_dir={results}", "n_jobs=2", "truth=off"]
    assert fake.kinds() == ["experiment", "report", "compare"]   # still reported and compared
    assert not (results / "baselines" / f"{slug}.candidate.jsonl").exists()
    assert "no baseline candidate" in capsys.readouterr().err


def test_bench_run_without_records(driver, capsys):
    make, results, _ = driver
    fake = make(run_rc=2, writes_records=False)
    assert hardware.bench_main(None, [f"results_dir={results}"]) == 2
    assert len(fake.calls) == 1 and "nothing to report" in capsys.readouterr().err


def test_bench_report_falls_back_to_markdown(driver):
    make, results, _ = driver
    fake = make(report_has_out=False)
    assert hardware.bench_main(None, [f"results_dir={results}", "experiment_name=mine"]) == 0
    assert fake.kinds() == ["experiment", "report", "report"]
    assert "--markdown" in fake.calls[2]
    assert fake.calls[2][fake.calls[2].index("--experiment") + 1] == "mine"
    assert (results / "report.md").read_text().startswith("| valuer |")


# --------------------------------------------------------------------------- make bench-micro

def test_micro_command_compares_only_when_a_run_exists(tmp_path):
    from pytest_benchmark.utils import get_machine_id
    cmd, prev = hardware.micro_command("cpu-x", tmp_path, 25, extra=["--", "-k", "shapley"])
    assert prev == []
    assert cmd[1:] == ["-m", "pytest", "-q", "-m", "benchmark", "-p", "no:xdist",
                       f"--benchmark-storage={tmp_path / 'cpu-x'}", "--benchmark-autosave",
                       "-k", "shapley"]
    saved = tmp_path / "cpu-x" / get_machine_id() / "0001_abc_20250101_000000.json"
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")
    (tmp_path / "cpu-y" / get_machine_id()).mkdir(parents=True)      # another machine's runs
    (tmp_path / "cpu-y" / get_machine_id() / "0001_x.json").write_text("{}")
    cmd, prev = hardware.micro_command("cpu-x", tmp_path, 12, stat="median")
    assert prev == [saved]
    assert cmd[-2:] == ["--benchmark-compare", "--benchmark-compare-fail=median:12%"]
    from pytest_benchmark.utils import parse_compare_fail
    parse_compare_fail(cmd[-1].split("=", 1)[1])        # pytest-benchmark accepts it


def test_micro_main_runs_pytest_in_the_slug_folder(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(hardware, "_run",
                        lambda cmd, capture=False: calls.append(cmd) or subprocess.CompletedProcess(cmd, 3))
    assert hardware.main(["micro", "--storage", str(tmp_path), "--", "-k", "x"]) == 3
    assert f"--benchmark-storage={tmp_path / hardware_slug()}" in calls[0]
    assert "this run becomes the reference" in capsys.readouterr().out


@pytest.mark.parametrize("rc", [0, 1])
def test_micro_main_keeps_only_accepted_runs(monkeypatch, tmp_path, rc):
    from pytest_benchmark.utils import get_machine_id
    runs = tmp_path / hardware_slug() / get_machine_id()
    runs.mkdir(parents=True)
    (runs / "0001_ref.json").write_text("{}")

    def fake_pytest(cmd, capture=False):
        assert "--benchmark-compare" in cmd
        (runs / "0002_new.json").write_text("{}")          # what --benchmark-autosave writes
        return subprocess.CompletedProcess(cmd, rc)

    monkeypatch.setattr(hardware, "_run", fake_pytest)
    assert hardware.main(["micro", "--storage", str(tmp_path)]) == rc
    kept = sorted(p.name for p in runs.iterdir())
    if rc:   # the regressed run is kept aside; the next run compares with 0001 again
        assert kept == ["0001_ref.json", "0002_new.json.rejected"]
        assert hardware.previous_micro_runs(tmp_path / hardware_slug())[-1].name == "0001_ref.json"
    else:
        assert kept == ["0001_ref.json", "0002_new.json"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_wires_the_drivers():
    def dry(*args):       # the target's last command line, whitespace normalised
        # --no-print-directory + a clean env: under `make test` (a nested make) make
        # would otherwise print "make[1]: Leaving directory ..." after the command
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        p = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        lines = [ln for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith("make")]
        return " ".join(lines[-1].split())

    assert dry("bench").endswith("-m bench hardware bench --")
    assert dry("bench", "PRESET=quick", "STRICT=1", "ARGS=seed=1 n_jobs=2").endswith(
        "-m bench hardware bench --preset quick --strict -- seed=1 n_jobs=2")
    assert dry("bench-micro").endswith("-m bench hardware micro --tolerance 25 --")
    assert dry("bench-micro", "BENCH_TOL=10", "ARGS=-k shapley").endswith(
        "micro --tolerance 10 -- -k shapley")


def test_bench_on_several_gpus_runs_one_shard_per_gpu_then_assembles(driver, monkeypatch, capsys):
    """A node with G GPUs: make bench trains the ground truth as G processes, one per GPU
    (game.shard=i/G game.device=cuda:i, at once), then `assemble` runs the valuers from the
    shared cache; a failed shard stops it before assemble. A user's own shard or device is
    left alone."""
    make, results, _ = driver
    fp = hardware.hardware_fingerprint()
    monkeypatch.setattr(hardware, "hardware_fingerprint", lambda **k: {**fp, "device": "cuda", "devices": [
        {"index": i, "name": "GPU", "memory_bytes": 80 * 2**30, "capability": "9.0"} for i in range(3)]})
    _fake_device(monkeypatch, "cuda", (80, 80, 80))
    launched = []

    def parallel(cmds, rcs=(0, 0, 0)):
        launched.append(cmds)
        return list(rcs)
    monkeypatch.setattr(hardware, "_run_parallel", parallel)
    fake = make()
    assert hardware.bench_main(None, [f"results_dir={results}"]) == 0
    (shards,) = launched
    assert [c[3:6] for c in shards] == [["experiment=default_gpu", f"game.shard={i}/3", f"game.device=cuda:{i}"]
                                       for i in range(3)]
    assert fake.calls[0][3:] == ["assemble", "experiment=default_gpu", f"results_dir={results}", "truth=off"]
    assert "3 GPUs: the ground truth as 3 shards" in capsys.readouterr().out

    launched.clear()
    monkeypatch.setattr(hardware, "_run_parallel", lambda cmds: parallel(cmds, (0, 3, 0)))
    fake = make()
    assert hardware.bench_main(None, [f"results_dir={results}"]) == 3
    assert not any("assemble" in c for c in fake.calls) and "shard 1/3 exited with status 3" in capsys.readouterr().err

    launched.clear()
    monkeypatch.setattr(hardware, "_run_parallel", parallel)
    fake = make()
    hardware.bench_main(None, [f"results_dir={results}", "game.device=cuda:1"])
    assert not launched and fake.calls[0][3:5] == ["experiment=default_gpu", f"results_dir={results}"]
