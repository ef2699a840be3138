"""The programs, one module each, behind one entry point (``dvbench`` or ``python -m bench``):

    dvbench [run] <hydra overrides>      one experiment job (the default sub-command)
    dvbench assemble <hydra overrides>   check a sharded ground truth is complete, then run
    dvbench report | compare | budget | selection | scaling | hardware | logra-bench | profile | pack-bench | precision
            | gpu-smoke  [--help]

Sub-command modules are imported only when chosen, so ``--help`` of one never
imports the training stack of another.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("bench.cli.run", "one experiment job from Hydra overrides (the default)"),
    "assemble": ("bench.cli.run", "check every ground-truth shard is cached, then run the job"),
    "report": ("bench.cli.report", "tables and plots of recorded runs (results/report.md)"),
    "compare": ("bench.cli.compare", "a commit's records vs a baseline; non-zero exit past tolerance"),
    "budget": ("bench.cli.budget", "fidelity at equal fine-tune budget from recorded runs"),
    "selection": ("bench.cli.selection", "a data-selection curve outside a job"),
    "scaling": ("bench.cli.scaling", "cost of exact retraining, permutation sampling and DPO arithmetic as n grows"),
    "hardware": ("bench.cli.hardware", "fingerprint, preset, make bench and make bench-micro"),
    "logra-bench": ("bench.cli.logra_bench", "LoGra vs naive per-example gradients: speed, memory, accuracy"),
    "profile": ("bench.cli.profile", "where a coalition fine-tune's wall time goes, and its fine-tune efficiency"),
    "pack-bench": ("bench.cli.pack_bench", "K LoRA fine-tunes in one pass vs one by one: speed-up, difference"),
    "precision": ("bench.cli.precision", "bf16 vs fp32 fine-tunes: utility differences beside seed-to-seed, speed"),
    "gpu-smoke": ("bench.cli.gpu_smoke", "every device path once (make gpu-smoke): status, GPU memory, GPU-hours"),
    "truth": ("bench.cli.truth", "the shipped ground truth: export a job's utilities, show them, retrain the canaries"),
    "compact": ("bench.cli.compact", "store a results folder's repeated record fields once (results/<dir>/shared/)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items())
    return (f"usage: dvbench [COMMAND] [ARGS...]   (python -m bench works the same)\n\n{rows}\n\n"
            "Without a command, the arguments are Hydra overrides of `run`; `dvbench run --help` lists "
            "the config groups.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help") and len(argv) == 1:
        print(usage())
        return
    name = argv[0] if argv and argv[0] in COMMANDS else "run"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    if name == "assemble":          # = game.shard=assemble (bench/core/shard.py)
        argv = ["game.shard=assemble", *argv]
    from bench.core.env import use_environment
    use_environment(argv)           # offline unless the arguments opt in; before any hub library import
    module = importlib.import_module(COMMANDS[name][0])
    sys.exit(module.main(argv) or 0)
