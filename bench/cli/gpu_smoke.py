"""``python -m bench gpu-smoke`` (``make gpu-smoke``): every device path once, in minutes.

Three stages, each a child ``python -m bench ...`` with its own timeout, in a fresh
temporary folder (results, cache, Hydra output; deleted afterwards unless ``--keep``),
so nothing of the user's results or cache is read or written:

    a  the tiny tier (experiment=smoke, shrunk) with every valuer family: exact and
       permutation Shapley, DPO arithmetic (margins and generation), the influence
       family (logra, influence_naive, ekfac, trak, tracin, datainf) and SHED, with
       n_jobs=2 workers and game.device=<device>
    b  the packed trainer against one by one (pack-bench on the same tiny tier)
    c  make bench's preset choice (hardware bench) on a shrunk default_gpu: 2 seeds,
       3 owners of 6 pairs (one flipped, one copy), 4 adapters per pass,
       3 LDS subsets, 3 valuers

After each stage it prints one table: a row per record with its status, device, GPUs,
GPU-hours, peak GPU memory, wall seconds and error (pack-bench writes no records; its
own table is shown instead), then one summary line. The exit status is 1 if any stage
failed (non-zero exit, timeout, no records, or a record that is not ``ok``).

``--device cpu`` is the dry run: the same stages on the CPU (stage c then names
``--preset default_gpu``, since on a CPU make bench would pick ``default``).

    python -m bench gpu-smoke                    # cuda if available, else cpu
    python -m bench gpu-smoke --device cpu --stages a,b
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.core.errors import fail

GIB = 2**30
GPU_PRESET = "default_gpu"
# the tiny tier, shrunk: 3 owners of 8/5/5 pairs (as the kill/resume and determinism tests)
TINY = ("experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8",
        "partition.sizes=[8,5,5]", "task.n_warmup_per_source=40", "model.warmup_epochs=1")
FAMILIES = ("retrain_shapley", "mc_shapley", "dpo_arithmetic", "dpo_arithmetic_gen", "logra",
            "influence_naive", "ekfac", "trak", "tracin", "datainf", "shed")
# default_gpu (SmolLM2-135M + LoRA, packed 8 per pass), shrunk to 2^3 coalitions per seed, 4 per pass
SHRUNK_GPU = ("seeds=[0,1]", "task.sources=[arithmetic,capitals]", "task.n_train_per_source=12",
              "task.n_eval_per_source=6", "partition.owner_sources=[arithmetic,capitals]",
              "partition.sizes=[6,6]", "partition.noisy_owners=[1]", "partition.duplicate_pairs=[[2,0]]",
              "game.pack=4", "lds.n_subsets=3", "valuer=[retrain_shapley,logra,dpo_arithmetic_gen]",
              "valuer.dpo_arithmetic_gen.n_prompts=4", "valuer.dpo_arithmetic_gen.max_new_tokens=4")


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    timeout_s: int           # on a GPU; the CPU dry run gets CPU_TIMEOUT_FACTOR times as long
    records: bool = True     # the child writes records (pack-bench does not)


STAGES = {s.key: s for s in (
    Stage("a", "tiny tier, every valuer family, n_jobs=2", 180),
    Stage("b", "packed trainer vs one by one (pack-bench)", 60, records=False),
    Stage("c", f"make bench's preset choice on a shrunk {GPU_PRESET}", 240),
)}
CPU_TIMEOUT_FACTOR = 10   # the dry run: on 2 shared cores stage c alone took 29 minutes


def stage_command(key: str, device: str, work: Path) -> list[str]:
    """The child's ``python -m bench ...`` command line of stage ``key``."""
    run = [f"results_dir={work / key}", f"cache_dir={work / 'cache'}", f"hydra.run.dir={work / key / 'hydra'}",
           "logger=none", "progress=false", f"game.device={device}"]
    bench = [sys.executable, "-m", "bench"]
    if key == "a":
        return [*bench, *TINY, *run, "n_jobs=2", "lds.n_subsets=3", f"valuer=[{','.join(FAMILIES)}]",
                "valuer.mc_shapley.max_permutations=2", "valuer.mc_shapley.min_permutations=2",
                "valuer.dpo_arithmetic_gen.n_prompts=4", "valuer.dpo_arithmetic_gen.max_new_tokens=4",
                "valuer.shed.n_clusters=4", "valuer.shed.passes=1", "valuer.trak.proj_dim=64"]
    if key == "b":
        return [*bench, "pack-bench", "--k", "4", "--coalitions", "4", *TINY, *run, "train.lora_r=8"]
    if key == "c":   # on a CPU make bench picks `default`: name the GPU preset instead
        preset = [] if device == "cuda" else ["--preset", GPU_PRESET]
        return [*bench, "hardware", "bench", *preset, "--", *SHRUNK_GPU, *run]
    raise KeyError(key)


def resolve_device(device: str) -> str:
    """``auto`` = cuda if torch sees a GPU, else cpu; ``cuda`` without one is refused."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; use --device cpu for the dry run")
    return device


def parse_stages(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in STAGES]
    if bad or not keys:
        fail(f"--stages: {text!r}; choose some of {','.join(STAGES)}, e.g. --stages a,c")
    return list(dict.fromkeys(keys))


# --------------------------------------------------------------------------- one stage

def run_child(cmd: list[str], log: Path, timeout_s: float) -> int | None:
    """Run ``cmd`` with its output to ``log``; the exit status, or None on timeout (its
    whole process group, workers included, is killed)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _last_line(error) -> str:
    lines = [s for s in str(error or "").strip().splitlines() if s.strip()]
    return lines[-1].strip()[:100] if lines else ""


def read_records(results: Path) -> list[dict]:
    """Every record under ``<results>/runs/`` (each experiment file)."""
    from bench.tracking import read_jsonl
    files = sorted((results / "runs").glob("*.jsonl"))
    return [r for f in files for r in read_jsonl(f)]


def utility_peak(cache: Path) -> int | None:
    """The largest ``peak_gpu_mem`` of the cached utilities (None when none records it)."""
    import json
    peaks = []
    for f in (cache / "utility").glob("*/*.json"):
        try:
            peaks.append(json.loads(f.read_text()).get("peak_gpu_mem"))
        except (OSError, ValueError, AttributeError):
            continue
    peaks = [p for p in peaks if isinstance(p, int)]
    return max(peaks) if peaks else None


def record_table(records: list[dict]) -> str:
    """One row per record: experiment, valuer, seed, status, device, GPUs, GPU-hours,
    peak GPU memory, wall seconds, the error's last line."""
    head = ("experiment", "valuer", "seed", "status", "device", "gpus", "GPU-h", "peak GPU mem", "wall s", "error")
    rows = [head]
    for r in records:
        c = r.get("cost") or {}
        rows.append((str(r.get("experiment")), str(r.get("valuer")), str(r.get("seed")), str(r.get("status")),
                     str(c.get("device", "?")), str(c.get("gpus", "?")), f"{c.get('gpu_hours') or 0:.4f}",
                     _gib(c.get("peak_gpu_mem_bytes")), f"{c.get('wall_s') or 0:.1f}", _last_line(r.get("error"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def judge(stage: Stage, rc: int | None, records: list[dict], device: str) -> list[str]:
    """Why the stage failed (empty = it passed)."""
    why = []
    if rc is None:
        why.append("timed out")
    elif rc:
        why.append(f"exit status {rc}")
    if stage.records:
        if not records:
            why.append("no records")
        bad = [r for r in records if r.get("status") != "ok"]
        if bad:
            why.append(f"{len(bad)} record(s) not ok: " + ", ".join(f"{r.get('valuer')}/{r.get('seed')}" for r in bad))
        if stage.key == "c" and device == "cuda" and records and {r.get("experiment") for r in records} != {GPU_PRESET}:
            why.append(f"make bench chose {sorted({r.get('experiment') for r in records})}, not {GPU_PRESET}")
    return why


def report_stage(stage: Stage, rc: int | None, wall: float, timeout_s: float, work: Path, log: Path,
                 device: str) -> bool:
    """Print the stage's table and verdict; True when it passed."""
    results = work / stage.key
    records = read_records(results) if stage.records else []
    status = "timed out" if rc is None else f"exit {rc}"
    print(f"{status} after {wall:.1f} s (timeout {timeout_s:.0f} s)")
    text = log.read_text(errors="replace").splitlines()
    if stage.records:
        print(record_table(records) if records else "(no records)")
        gpu_h = sum((r.get("cost") or {}).get("gpu_hours") or 0 for r in records)
        peaks = [(r.get("cost") or {}).get("peak_gpu_mem_bytes") for r in records]
        peak = max((p for p in peaks if p is not None), default=None)
        print(f"stage GPU-hours {gpu_h:.4f}; peak GPU memory of a valuer {_gib(peak)}, "
              f"of a utility {_gib(utility_peak(work / 'cache'))}")
    else:
        start = next((i for i, s in enumerate(text) if s.startswith("[dvbench] pack-bench:")), None)
        print("\n".join(text[start:]) if start is not None else "(no pack-bench table)")
    why = judge(stage, rc, records, device)
    if why:
        print("FAILED: " + "; ".join(why))
        if rc != 0:                               # the child's own last words (also on a timeout)
            print("--- last lines of the log ---\n" + "\n".join(text[-15:]))
    else:
        print("ok")
    return not why


# --------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench gpu-smoke", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where every stage runs (default auto: cuda if available, else cpu)")
    ap.add_argument("--stages", default=",".join(STAGES), help="which stages, e.g. a,c (default all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (<stage>.log, records, cache)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keys = parse_stages(args.stages)
    device = resolve_device(args.device)
    factor = 1 if device == "cuda" else CPU_TIMEOUT_FACTOR
    work = Path(tempfile.mkdtemp(prefix="dvbench-gpu-smoke-"))
    print(f"[dvbench] gpu-smoke: device {device}, stages {','.join(keys)}, in {work}", flush=True)
    t0, passed = time.perf_counter(), {}
    try:
        for key in keys:
            stage = STAGES[key]
            cmd, log, timeout_s = stage_command(key, device, work), work / f"{key}.log", stage.timeout_s * factor
            (work / key).mkdir(parents=True, exist_ok=True)
            print(f"\n== stage {key}: {stage.title} ==\n$ {shlex.join(cmd)}", flush=True)
            t1 = time.perf_counter()
            rc = run_child(cmd, log, timeout_s)
            passed[key] = report_stage(stage, rc, time.perf_counter() - t1, timeout_s, work, log, device)
            sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, ok in passed.items() if not ok]
    print(f"\ngpu-smoke: {len(passed) - len(failed)} stage(s) ok, {len(failed)} failed"
          + (f" ({','.join(failed)})" if failed else "")
          + f"; {(time.perf_counter() - t0) / 60:.1f} min wall on {device}"
          + (f"; kept {work}" if args.keep else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
