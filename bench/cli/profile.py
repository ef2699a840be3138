"""``python -m bench profile``: where a coalition fine-tune's wall time goes.

Builds the game of a preset, then trains a few coalitions afresh (a temporary
utility cache; the base model is reused from the configured cache) under cProfile,
and splits their wall time into phases by the functions that ran. The work done
once per game (loading the base, scoring it on the eval pairs, and preparing the
training pool: TRL's tokenisation and reference log-probs of every pair) is timed
apart, before the profile:

    dataset + tokenisation    bench's to_dataset/rows_for and TRL's dataset preparation
    trainer construction      DPOTrainer.__init__ (less its dataset preparation)
    reference log-probs       TRL's reference forward passes (precomputed or per step; timed
                              around TRL's no-checkpointing context, which holds exactly them)
    recomputation             activation-checkpoint recomputation in the backward pass
    optimizer steps           TRL's training steps, less the two lines above
    evaluation                scoring the trained model on the eval pairs
    cache I/O                 reading and writing cache entries and stage weights
    other                     the rest (model copies, merging adapters, bookkeeping)

Fine-tune efficiency = (optimizer steps + evaluation) / wall: the share of the time
spent in passes that change the model or score it.

    python -m bench profile experiment=smoke --coalitions 3

``--save FILE.json`` also writes the figures with the commit, the machine and the
command (atomically). Files saved under ``results/published/profile/`` (from a
committed tree) become the README's "What a fine-tune costs" table at ``make report``:

    python -m bench profile experiment=default --coalitions 2 --save results/published/profile/default.json
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import sys
import time

# (phase, file suffix, function name): the outermost calls that make up each phase
PHASES = (
    ("dataset + tokenisation", "bench/core/train.py", "to_dataset"),
    ("dataset + tokenisation", "bench/core/train.py", "rows_for"),
    ("dataset + tokenisation", "trl/trainer/dpo_trainer.py", "_prepare_dataset"),
    ("recomputation", "torch/utils/checkpoint.py", "recompute_fn"),
    ("evaluation", "bench/core/train.py", "sequence_logps"),
    ("cache I/O", "bench/core/cache.py", "get_json"),
    ("cache I/O", "bench/core/cache.py", "put_json"),
    ("cache I/O", "bench/core/cache.py", "get_tensors"),
    ("cache I/O", "bench/core/cache.py", "put_tensors"),
)
TRAINER_INIT = ("trl/trainer/dpo_trainer.py", "__init__")
TRAINING_STEP = ("trl/trainer/dpo_trainer.py", "training_step")
ORDER = ("dataset + tokenisation", "trainer construction", "reference log-probs", "recomputation",
         "optimizer steps", "evaluation", "cache I/O", "other")


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of every function ``name`` defined in a file ending in ``suffix``."""
    return sum(v[3] for (f, _, fn), v in stats.stats.items() if fn == name and f.replace(os.sep, "/").endswith(suffix))


@contextlib.contextmanager
def timing_reference_passes():
    """TRL runs every reference forward pass (per step, or precomputed) inside its
    ``disable_gradient_checkpointing`` context: time that context. Yields a list whose
    one element accumulates the seconds."""
    import trl.trainer.dpo_trainer as dpo
    original, total = dpo.disable_gradient_checkpointing, [0.0]

    @contextlib.contextmanager
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            with original(*args, **kwargs):
                yield
        finally:
            total[0] += time.perf_counter() - t0

    dpo.disable_gradient_checkpointing = timed
    try:
        yield total
    finally:
        dpo.disable_gradient_checkpointing = original


def breakdown(stats: pstats.Stats, wall: float, reference_s: float) -> dict:
    """Seconds per phase (``ORDER``) and the fine-tune efficiency, from one profile and
    the timed reference passes."""
    out = dict.fromkeys(ORDER, 0.0)
    for phase, suffix, name in PHASES:
        out[phase] += cumulative(stats, suffix, name)
    prepare = cumulative(stats, "trl/trainer/dpo_trainer.py", "_prepare_dataset")
    precomputed = cumulative(stats, "trl/trainer/dpo_trainer.py", "_precompute_ref_logps")
    out["trainer construction"] = max(cumulative(stats, *TRAINER_INIT) - prepare - precomputed, 0.0)
    out["reference log-probs"] = reference_s
    in_steps = max(reference_s - precomputed, 0.0)        # reference passes made inside training steps
    step = cumulative(stats, *TRAINING_STEP)
    out["optimizer steps"] = max(step - in_steps - out["recomputation"], 0.0)
    out["other"] = max(wall - sum(v for k, v in out.items() if k != "other"), 0.0)
    eff = (out["optimizer steps"] + out["evaluation"]) / wall if wall > 0 else float("nan")
    return {"wall_s": wall, "phases": out, "efficiency": eff}


def format_breakdown(res: dict, title: str) -> str:
    wall = res["wall_s"]
    lines = [title, f"{'phase':24s} {'seconds':>8s} {'share':>6s}"]
    for k in ORDER:
        v = res["phases"][k]
        lines.append(f"{k:24s} {v:8.2f} {100 * v / wall if wall else 0:5.1f}%")
    lines.append(f"{'wall':24s} {wall:8.2f}")
    lines.append(f"fine-tune efficiency (optimizer steps + evaluation) / wall = {res['efficiency']:.2f}")
    return "\n".join(lines)


def measure(game, coalitions: int):
    """Time the once-per-game work, then profile ``coalitions`` single-owner fine-tunes."""
    from bench.core.resources import PeakRSS
    t0 = time.perf_counter()
    game.base()
    game.utility(0)                                   # the base's eval log-probs, once per game
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    game.examples(game.flat_pairs())                  # tokenisation + reference log-probs, once per game
    prepare_s = time.perf_counter() - t0
    masks = [1 << i for i in range(min(coalitions, game.n))]
    prof = cProfile.Profile()
    with timing_reference_passes() as reference_s, PeakRSS(every_s=0.01) as mem:
        t0 = time.perf_counter()
        prof.enable()
        for m in masks:
            game.utility(m)
        prof.disable()
        wall = time.perf_counter() - t0
    return prof, wall, reference_s[0], base_s, prepare_s, mem, masks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--coalitions", type=int, default=3, help="single-owner coalitions to train (default 3)")
    ap.add_argument("--save", metavar="FILE.json", help="also write the figures, commit and machine to this file")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")
    args = ap.parse_intermixed_args(argv)      # options and overrides in any order
    from bench.core.errors import ConfigError, fail
    if args.coalitions < 1:
        fail("--coalitions: use >= 1")
    if args.save and not args.save.endswith(".json"):
        fail(f"--save: {args.save!r} is not a .json file name; e.g. --save results/published/profile/default.json")
    t_start = time.perf_counter()
    from bench.core.env import quiet_libraries
    from bench.harness.build import compose_config, scratch_game
    quiet_libraries()
    cfg = compose_config(args.overrides)
    try:
        with scratch_game(cfg) as game:
            imports_s = time.perf_counter() - t_start
            prof, wall, reference_s, base_s, prepare_s, mem, masks = measure(game, args.coalitions)
            setup_s = imports_s + base_s
    except ConfigError as e:
        fail(e)
    res = breakdown(pstats.Stats(prof), wall, reference_s)
    print(f"[dvbench] profile: {cfg.experiment_name}, model={cfg.model.name}, {len(masks)} coalition(s), "
          f"imports + model load + base eval {setup_s:.1f} s (once per process), training pool prepared "
          f"({len(game.flat_pairs())} pairs tokenised + reference log-probs) {prepare_s:.1f} s (once per game "
          f"and process); profiled under cProfile (adds overhead to Python-heavy phases)")
    print(format_breakdown(res, f"{len(masks)} fine-tunes, per fine-tune {wall / len(masks):.2f} s"))
    print(f"memory: resident {mem.start / 2**20:.0f} MiB before the fine-tunes, peak {mem.peak / 2**20:.0f} MiB "
          f"(+{mem.delta / 2**20:.0f} MiB; sampled every 10 ms)")
    if args.save:
        saved = save(args.save, cfg, res, masks, setup_s, prepare_s, mem, args)
        print(f"[dvbench] profile saved to {saved}")
    return 0


def save(path: str, cfg, res: dict, masks: list[int], setup_s: float, prepare_s: float, mem, args) -> str:
    """The profile as one JSON object (``bench.analysis.report.profile_block`` reads it)."""
    import json

    from bench.core.cache import atomic_write_bytes
    from bench.tracking.provenance import git_info, utc_timestamp
    from bench.tracking.system import hardware_fingerprint
    out = {"schema": 1, "experiment": cfg.experiment_name, "model": cfg.model.name,
           "precision": cfg.train.precision, "fine_tunes": len(masks), "masks": masks,
           "per_fine_tune_s": res["wall_s"] / len(masks), "wall_s": res["wall_s"], "phases": res["phases"],
           "efficiency": res["efficiency"], "once_per_process_s": setup_s, "pool_prepared_s": prepare_s,
           "peak_rss_bytes": mem.peak, "rss_growth_bytes": mem.delta,
           "command": "python -m bench profile " + " ".join([f"--coalitions {args.coalitions}", *args.overrides]),
           **git_info(), "hardware": hardware_fingerprint(), "timestamp": utc_timestamp()}
    atomic_write_bytes(path, (json.dumps(out, indent=1) + "\n").encode())     # makes its folder
    return path


if __name__ == "__main__":
    sys.exit(main())
