"""Which machine is this, what fits on it, and ``make bench`` / ``make bench-micro`` on it.
(The fingerprint and device detection are ``bench.tracking.system``; this is the program.)

    python -m bench hardware fingerprint [--json]    # device, memory, driver, torch/CUDA, CPUs
    python -m bench hardware slug                    # e.g. cpu-2c-24g-amd-epyc
    python -m bench hardware preset                  # the experiment preset that fits
    python -m bench hardware bench [--preset P] [--strict] [-- overrides...]
    python -m bench hardware micro [--tolerance PCT] [-- pytest args...]

``bench`` (what ``make bench`` runs): print the fingerprint, pick the preset (``default``
on a CPU, ``default_gpu`` on a CUDA GPU with enough memory), run ``python -m bench
experiment=<preset> <overrides>`` as a child process, write ``<results>/report.md`` and
a baseline candidate ``<results>/baselines/<slug>.candidate.jsonl``, and, if a committed
``<results>/baselines/<slug>.jsonl`` exists, print the comparison with it. The exit
status is the run's; a regression is reported but fails only with ``--strict``.

``micro`` (what ``make bench-micro`` runs): the ``benchmark``-marked tests under
pytest-benchmark, saved to ``results/benchmarks/<slug>/`` and, when that folder holds an
earlier run, compared with the last one (``--benchmark-compare-fail=mean:<PCT>%``); a run
that fails or regresses is renamed ``*.json.rejected``, so the reference stays the last
accepted run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from bench.core.cache import atomic_write_bytes
from bench.core.errors import fail
from bench.tracking import REPO_DIR, hardware_slug
from bench.tracking.system import cuda_devices, detect_device, hardware_fingerprint

CONF = REPO_DIR / "conf"
GIB = 2**30
# default_gpu trains 8 LoRA adapters at once on SmolLM2-135M (game.pack=8): one packed
# step is 8 x 8 pairs = 128 rows of <= 96 tokens through 30 layers. An estimate, not a
# measurement (no GPU has run it): activations ~45 KB per token and layer in fp32, i.e.
# ~17 GB for 12,288 tokens, about half under bf16 autocast (train.precision=auto), plus
# the base and 8 merged copies to score (~0.5 GB each). 16 GiB leaves room under bf16;
# `make gpu-smoke` prints the measured peak (peak_gpu_mem of each utility record).
GPU_PRESET_MIN_BYTES = 16 * GIB
CPU_PRESET, GPU_PRESET = "default", "default_gpu"
MICRO_TOLERANCE = 25       # whole percent (pytest-benchmark takes no fractions); BENCH_TOL=...
MICRO_STAT = "mean"


# --------------------------------------------------------------------------- fingerprint

def _gib(n: int | None) -> str:
    return "?" if not n else f"{n / GIB:.1f} GiB"


def format_fingerprint(fp: dict) -> str:
    """``hardware_fingerprint(devices=True)`` as a few aligned lines for a terminal."""
    lines = [("hardware", f"{fp['slug']}  (id {fp.get('id')})"), ("device", fp["device"])]
    for d in fp.get("devices") or []:
        desc = f"{d['name']}, {_gib(d['memory_bytes'])}, compute capability {d['capability']}"
        lines.append((f"gpu {d['index']}", desc))
    if fp["device"] == "mps":
        metal = _gib(fp.get("mps_memory_bytes"))
        lines.append(("gpu", f"Apple MPS, unified memory (Metal working set {metal})"))
    if fp["device"] == "cuda":
        lines.append(("driver", fp.get("driver") or "unknown (no nvidia-smi / NVML)"))
    cpu = fp.get("cpu_name") or fp.get("cpu")
    lines.append(("cpu", f"{cpu}, {fp.get('n_cpus')} logical cores, {_gib(fp.get('ram_bytes'))} RAM"))
    cuda = fp.get("cuda_version") or (f"ROCm {fp['hip_version']}" if fp.get("hip_version") else "none")
    torch_line = f"{fp.get('torch') or 'not importable'}, CUDA build {cuda}"
    if fp.get("cudnn"):
        torch_line += f", cuDNN {fp['cudnn']}"
    lines.append(("torch", torch_line))
    lines.append(("python", f"{fp.get('python')} on {fp.get('platform')}"))
    w = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in lines)


# --------------------------------------------------------------------------- presets

def available_presets() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def check_preset(name: str) -> str:
    if name not in available_presets():
        fail(f"preset: no experiment preset {name!r}; choose one of {available_presets()} "
             "(make bench PRESET=<name>)")
    return name


def choose_preset() -> tuple[str, str]:
    """``(preset, why)`` for this machine.

    CUDA with >= 16 GiB on every visible GPU: ``default_gpu`` (6 owners, packed LoRA, bf16 where native).
    A smaller CUDA GPU, Apple MPS or a CPU: ``default`` (4 owners, LoRA), the preset the
    README's numbers come from. MPS gets ``default`` because its memory is shared with
    the CPU and the packed preset is sized and meant for CUDA; ``PRESET=default_gpu``
    tries it anyway.
    """
    device = detect_device()
    if device == "cuda":
        devs = cuda_devices()
        mem = min((d["memory_bytes"] for d in devs), default=0)
        if mem >= GPU_PRESET_MIN_BYTES:
            return GPU_PRESET, (f"CUDA, {len(devs)} GPU(s) with >= {_gib(mem)}: more owners, 8 SmolLM2 LoRA "
                                "fine-tunes packed per pass")
        return CPU_PRESET, (f"CUDA GPU with {_gib(mem)} < {_gib(GPU_PRESET_MIN_BYTES)}: the "
                            "LoRA preset")
    if device == "mps":
        return CPU_PRESET, ("Apple MPS (unified memory): the LoRA preset; "
                            f"PRESET={GPU_PRESET} to try the packed preset")
    return CPU_PRESET, "CPU: the LoRA preset"


# --------------------------------------------------------------------------- make bench

def _run(cmd: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    """One child process (tests replace this); output streams through unless captured."""
    return subprocess.run(cmd, capture_output=capture, text=True)


def _override(overrides: Sequence[str], key: str) -> str | None:
    """The value of ``key=...`` (also ``+key=`` / ``++key=``) among Hydra overrides, last wins."""
    val = None
    for o in overrides:
        k, sep, v = o.partition("=")
        if sep and k.lstrip("+~") == key:
            val = v
    return val


def candidate_records(records: list[dict], experiment: str, commit: str, slug: str,
                      previous: list[dict]) -> list[dict]:
    """The baseline candidate for ``slug``: the newest ``ok`` record per (game, valuer,
    seed) of ``experiment`` at ``commit`` on hardware of this slug, after the records of
    *other* experiments in ``previous`` (so one file keeps every preset of a machine)."""
    from bench.tracking import latest
    mine = [r for r in records if r.get("experiment") == experiment
            and str(r.get("commit", "")) == commit and r.get("status") == "ok"
            and hardware_slug(r.get("hardware") or {}) == slug]
    return [r for r in previous if r.get("experiment") != experiment] + latest(mine)


def write_report(results: Path, experiment: str, commit: str) -> Path | None:
    """``<results>/report.md`` of ``experiment``'s records at ``commit``: ``python -m bench
    report --out`` (tables + plots); the plain ``--markdown`` tables if it has no ``--out``."""
    report = results / "report.md"
    base = [sys.executable, "-m", "bench", "report", "--results", str(results),
            "--experiment", experiment, "--commit", commit]
    rep = _run(base + ["--out", str(report)], capture=True)
    if rep.returncode == 2 and "unrecognized arguments" in (rep.stderr or ""):   # no --out yet
        rep = _run(base + ["--markdown"], capture=True)
        if rep.returncode == 0:
            atomic_write_bytes(report, rep.stdout.encode())
    if rep.returncode:
        print(f"bench: report failed: {(rep.stderr or '').strip()}", file=sys.stderr)
        return None
    print(f"\nwrote {report}")
    return report


def _run_parallel(cmds: list[list[str]]) -> list[int]:
    """Child processes at once, output streaming through (tests replace this); their exit statuses."""
    procs = [subprocess.Popen(c) for c in cmds]
    try:
        return [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        raise


def _ground_truth_on_every_gpu(preset: str, overrides: Sequence[str], gpus: int) -> int:
    """On a node with several GPUs: the ground truth as one shard per GPU, one process each
    (``game.shard=i/G game.device=cuda:i``, README "Several GPUs"), into the shared cache;
    the caller then runs ``assemble`` (the valuers, on the first GPU). The first non-zero
    exit status of a shard, or 0."""
    cmds = [[sys.executable, "-m", "bench", f"experiment={preset}", f"game.shard={i}/{gpus}", f"game.device=cuda:{i}",
             *overrides] for i in range(gpus)]
    print(f"{gpus} GPUs: the ground truth as {gpus} shards, one process per GPU, then assemble on cuda:0", flush=True)
    for c in cmds:
        print("$ " + shlex.join(c), flush=True)
    rcs = _run_parallel(cmds)
    bad = [(i, rc) for i, rc in enumerate(rcs) if rc]
    if bad:
        print(f"\nbench: shard {bad[0][0]}/{gpus} exited with status {bad[0][1]}; rerun make bench (the shards "
              "resume from the cache)", file=sys.stderr)
        return bad[0][1]
    return 0


def bench_main(preset: str | None, overrides: Sequence[str], strict: bool = False) -> int:
    """``make bench``: see the module docstring. Returns the exit status."""
    from bench.analysis.compare import write_baseline
    from bench.tracking import ResultsStore, git_info, read_jsonl

    overrides = [o for o in overrides if o != "--"]
    if _override(overrides, "experiment") is not None:
        fail("ARGS: experiment= is chosen by the preset; use make bench PRESET=<name> "
             "(python -m bench hardware bench --preset <name>)")
    if _override(overrides, "truth") is None:   # it measures this machine: the ground truth is trained
        overrides = [*overrides, "truth=off"]  # here, not served from results/published/truth/
    if preset:
        preset, why = check_preset(preset), "chosen by PRESET"
    fp = hardware_fingerprint(devices=True)
    print(format_fingerprint(fp), flush=True)
    if not preset:
        preset, why = choose_preset()
        check_preset(preset)
    print(f"preset    {preset}  ({why})\n", flush=True)

    slug = fp["slug"]
    results = Path(_override(overrides, "results_dir") or "results")
    experiment = _override(overrides, "experiment_name") or preset
    commit = git_info()["commit"]      # before the run: records are stamped with it
    cmd = [sys.executable, "-m", "bench", f"experiment={preset}", *overrides]
    gpus = len(fp.get("devices") or []) if fp.get("device") == "cuda" else 0
    try:
        if gpus > 1 and _override(overrides, "game.shard") is None and _override(overrides, "game.device") is None:
            rc = _ground_truth_on_every_gpu(preset, overrides, gpus)
            cmd = [sys.executable, "-m", "bench", "assemble", f"experiment={preset}", *overrides]
        else:
            rc = 0
        if rc == 0:
            print("$ " + shlex.join(cmd), flush=True)
            rc = _run(cmd).returncode
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if rc:
        print(f"\nbench: `{shlex.join(['python', *cmd[1:4]])} …` exited with status {rc}", file=sys.stderr)

    records = ResultsStore(results).read(experiment) if (results / "runs").is_dir() else []
    if not any(str(r.get("commit", "")) == commit for r in records):
        print(f"bench: no records of {experiment} at commit {commit[:12]} in {results / 'runs'}; "
              "nothing to report", file=sys.stderr)
        return rc or 2

    write_report(results, experiment, commit)

    # the baseline candidate (only from a run that succeeded)
    base_dir = results / "baselines"
    committed = base_dir / f"{slug}.jsonl"
    candidate = base_dir / f"{slug}.candidate.jsonl"
    if rc == 0:
        prev_file = candidate if candidate.is_file() else committed
        previous = read_jsonl(prev_file) if prev_file.is_file() else []
        recs = candidate_records(records, experiment, commit, slug, previous)
        n = write_baseline(recs, candidate)
        dirty = " (dirty tree)" if any(r.get("dirty") for r in recs
                                       if r.get("experiment") == experiment) else ""
        print(f"wrote {candidate}: {n} records{dirty}; to make it this hardware's baseline:\n"
              f"  mv {candidate} {committed} && git add {committed}")
    else:
        print("bench: no baseline candidate written (the run failed)", file=sys.stderr)

    # the comparison with this hardware's committed baseline
    regressed = False
    if committed.is_file() and any(r.get("experiment") == experiment
                                   for r in read_jsonl(committed)):
        print(f"\n== {experiment} vs the committed baseline of {slug} ==", flush=True)
        cmp = _run([sys.executable, "-m", "bench", "compare", "--results", str(results),
                    "--experiment", experiment, "--commit", commit, "--baseline", str(committed)])
        if cmp.returncode == 1:
            regressed = True
            print(f"\nREGRESSION vs {committed} (see the table above); "
                  + ("failing (--strict)" if strict else
                     "not failing make bench (STRICT=1 makes it fail)"), flush=True)
        elif cmp.returncode:
            print(f"bench: compare exited with status {cmp.returncode}", file=sys.stderr)
    elif committed.is_file():
        print(f"\n{committed} has no {experiment} records: nothing to compare")
    else:
        print(f"\nno committed baseline for {slug} ({committed}): nothing to compare")
    return rc or (1 if strict and regressed else 0)


# --------------------------------------------------------------------------- make bench-micro

def previous_micro_runs(storage: Path) -> list[Path]:
    """Saved pytest-benchmark runs in ``storage`` that ``--benchmark-compare`` would find
    (it looks only in the subfolder of this platform/Python: ``Linux-CPython-3.11-64bit``)."""
    try:
        from pytest_benchmark.utils import get_machine_id
        sub = storage / get_machine_id()
    except Exception:
        return []
    return sorted(sub.glob("[0-9][0-9][0-9][0-9]_*.json")) if sub.is_dir() else []


def micro_command(slug: str, root: Path, tolerance: int, stat: str = MICRO_STAT,
                  extra: Sequence[str] = ()) -> tuple[list[str], list[Path]]:
    """The pytest command line of ``make bench-micro`` and the earlier runs it compares with."""
    storage = Path(root) / slug
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "benchmark", "-p", "no:xdist",
           f"--benchmark-storage={storage}", "--benchmark-autosave"]
    prev = previous_micro_runs(storage)
    if prev:   # pytest-benchmark refuses --benchmark-compare-fail with nothing to compare
        cmd += ["--benchmark-compare", f"--benchmark-compare-fail={stat}:{tolerance}%"]
    return cmd + [a for a in extra if a != "--"], prev


def micro_main(tolerance: int, root: str, stat: str, extra: Sequence[str]) -> int:
    if tolerance < 1:
        fail(f"tolerance: {tolerance} must be a whole percentage >= 1; set BENCH_TOL=<percent>, e.g. 25")
    slug = hardware_slug()
    storage = Path(root) / slug
    cmd, prev = micro_command(slug, Path(root), tolerance, stat, extra)
    print(f"hardware {slug}; runs saved in {storage}")
    if prev:
        print(f"comparing with the last run {prev[-1].name}: fails if a benchmark's {stat} is "
              f"more than {tolerance} % slower")
    else:
        print("no earlier run on this hardware: this run becomes the reference (no comparison)")
    print("$ " + shlex.join(cmd), flush=True)
    before = set(previous_micro_runs(storage))
    try:
        rc = _run(cmd).returncode
    except KeyboardInterrupt:
        rc = 130
    if rc:
        # A run that regressed (or failed) must not become the next reference, or a
        # slowdown would fail once and then pass on every rerun.
        for new in sorted(set(previous_micro_runs(storage)) - before):
            new.rename(new.with_name(new.name + ".rejected"))
            print(f"bench-micro: exit {rc}; kept this run's timings as {new.name}.rejected, so the "
                  f"next run compares with {prev[-1].name if prev else 'nothing'} again (to accept "
                  "a slowdown: make bench-micro BENCH_TOL=<larger>)", file=sys.stderr)
    return rc


# --------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line, as every other dvbench error
        fail(f"arguments: {message}; see python -m bench hardware --help")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m bench hardware", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("fingerprint", help="print this machine's hardware fingerprint")
    p.add_argument("--json", action="store_true", help="as JSON")
    sub.add_parser("slug", help="print the hardware slug (keys per-hardware results)")
    sub.add_parser("preset", help="print the experiment preset that fits this machine")
    p = sub.add_parser("bench", help="make bench: run the fitting preset, report, baseline candidate")
    p.add_argument("--preset", help="experiment preset (default: the one that fits)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when the comparison with the committed baseline regresses")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="Hydra overrides for python -m bench (after --)")
    p = sub.add_parser("micro", help="make bench-micro: pytest-benchmark, stored and compared per hardware")
    p.add_argument("--tolerance", type=int, default=MICRO_TOLERANCE, metavar="PCT",
                   help=f"fail if a benchmark got this many percent slower (whole percent, "
                        f"default {MICRO_TOLERANCE})")
    p.add_argument("--stat", default=MICRO_STAT,
                   choices=["min", "max", "mean", "median", "stddev", "iqr"],
                   help=f"statistic compared (default {MICRO_STAT})")
    p.add_argument("--storage", default="results/benchmarks", metavar="DIR",
                   help="root of the per-hardware storage (default results/benchmarks)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    if args.command == "fingerprint":
        fp = hardware_fingerprint(devices=True)
        print(json.dumps(fp, indent=1) if args.json else format_fingerprint(fp))
    elif args.command == "slug":
        print(hardware_slug())
    elif args.command == "preset":
        name, why = choose_preset()
        print(name)
        print(why, file=sys.stderr)
    elif args.command == "bench":
        return bench_main(args.preset, args.overrides, strict=args.strict)
    elif args.command == "micro":
        return micro_main(args.tolerance, args.storage, args.stat, args.pytest_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
