"""``python -m bench precision``: what bf16 autocast does to a game's utilities, beside
what a different training seed does to them, and what it does to the fine-tune's time.

Builds the game of a preset and computes its utility table (every coalition, or
``--coalitions`` random ones) under ``train.precision=fp32`` and ``bf16`` for each of
``--seeds`` (>= 2). Utilities go to the configured cache (they are keyed by the
precision they ran in), so an interrupted run resumes; ``--fresh`` uses a temporary
cache instead, so that every fine-tune is timed. It prints, for every utility metric:

    bf16 - fp32        RMS and max over coalitions and seeds of the difference between
                       the two precisions under the same seed
    seed - seed        the same over pairs of seeds under fp32: the noise a utility
                       has anyway
    ratio              RMS(bf16 - fp32) / RMS(seed - seed), with a 95% bootstrap
                       interval over coalitions; below 1: bf16 moves the utilities
                       less than the training seed does

and Spearman's rho of the exact Shapley values (full tables only) between precisions
and between seeds, and the median seconds of a fine-tune and of its scoring under
each precision (fresh records only; cached ones took no time here). Scoring runs in
fp32 under both settings, so the difference is the training's.

    python -m bench precision experiment=quick --seeds 0,1,2
    python -m bench precision experiment=default --seeds 0,1 --fresh
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np

PRECISIONS = ("fp32", "bf16")
N_BOOT = 2000


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench precision", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seeds", type=_seeds, default=[0, 1], help="training seeds, >= 2, comma-separated (default 0,1)")
    ap.add_argument("--coalitions", type=int, default=0,
                    help="random non-empty coalitions per seed (default 0 = all 2^n - 1, and Shapley values)")
    ap.add_argument("--fresh", action="store_true", help="a temporary utility cache: every fine-tune is timed")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=quick")
    return ap


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 0,1,2") from None


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def compare(prec: dict, seeds: list[int], rng: np.random.Generator) -> dict:
    """``prec[p][seed]``: utilities (coalitions in one order) of one metric. The RMS and
    max of bf16 - fp32 (same seed) and of seed - seed (fp32), and their ratio with a
    bootstrap interval over coalitions (both differences resampled together)."""
    d_prec = np.stack([prec["bf16"][s] - prec["fp32"][s] for s in seeds])             # (S, C)
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    d_seed = np.stack([prec["fp32"][a] - prec["fp32"][b] for a, b in pairs])           # (P, C)
    n = d_prec.shape[1]
    boot = []
    for _ in range(N_BOOT):
        idx = rng.integers(0, n, n)
        den = rms(d_seed[:, idx])
        boot.append(rms(d_prec[:, idx]) / den if den > 0 else np.nan)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5]) if np.isfinite(boot).any() else (np.nan, np.nan)
    den = rms(d_seed)
    return {"prec_rms": rms(d_prec), "prec_max": float(np.abs(d_prec).max()), "seed_rms": den,
            "seed_max": float(np.abs(d_seed).max()), "ratio": rms(d_prec) / den if den > 0 else np.nan,
            "ratio_ci": (float(lo), float(hi))}


def _tables(cfg, seeds: list[int], masks: list[int] | None):
    """``{precision: {seed: [record per coalition]}}`` (the empty coalition first when
    ``masks`` is None: every coalition) and the game's owner count."""
    from bench.harness.build import build_game, build_task
    task = build_task(cfg)
    out = {}
    for p in PRECISIONS:
        cfg.train.precision = p
        game, _ = build_game(cfg, task)
        masks_p = masks or list(range(2 ** game.n))
        out[p] = {}
        for s in seeds:
            g = game.with_seed(s)
            g.prefetch(masks_p)
            out[p][s] = [g.record(m) for m in masks_p]
            print(f"[dvbench] precision: {p}, seed {s}: {len(masks_p)} coalitions", flush=True)
    return out, game.n


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from bench.core.errors import ConfigError, fail
    if len(set(args.seeds)) < 2:
        fail("--seeds: give >= 2 distinct seeds (the seed-to-seed difference is the yardstick)")
    if args.coalitions < 0:
        fail("--coalitions: use >= 0 (0 = every coalition)")
    from bench.core.devices import bf16_native
    from bench.core.env import quiet_libraries
    from bench.core.shapley import exact_shapley
    from bench.core.train import METRICS
    from bench.harness.build import compose_config, scratch_game
    from bench.tracking.system import hardware_fingerprint
    quiet_libraries()
    cfg = compose_config(args.overrides)
    cfg.progress = False
    seeds = list(dict.fromkeys(args.seeds))
    try:
        with (scratch_game(cfg) if args.fresh else contextlib.nullcontext()) as scratch:
            if scratch is not None:          # every fine-tune trained here, one process
                cfg.cache_dir = scratch.cache_dir
            masks = None
            if args.coalitions:
                from bench.cli.pack_bench import draw_coalitions
                masks = draw_coalitions(len(scratch.owners) if scratch else _n_owners(cfg), args.coalitions, 0)
            recs, n = _tables(cfg, seeds, masks)
    except ConfigError as e:
        fail(e)
    device = recs["fp32"][seeds[0]][0]["device"]
    hw = hardware_fingerprint()
    print(f"\n[dvbench] precision: {cfg.experiment_name}, model={cfg.model.name}, "
          f"{'full fine-tune' if cfg.train.lora_r is None else f'LoRA r={cfg.train.lora_r}'}, seeds {seeds}, "
          f"{len(recs['fp32'][seeds[0]])} coalitions of {n} owners per seed, device {device} "
          f"({hw.get('cpu_name') or hw.get('cpu')}; bf16 native: {'yes' if bf16_native(device) else 'no'}); "
          f"scoring fp32 under both")
    rng = np.random.default_rng(0)
    print(f"{'metric':<10} {'bf16 - fp32 RMS [max]':>24} {'seed - seed RMS [max]':>24} "
          f"{'ratio [95% CI]':>22}")
    verdicts = []
    first = 0 if masks is not None else 1          # the empty coalition is the base under both
    for metric in METRICS:
        prec = {p: {s: np.array([r["metrics"][metric] for r in recs[p][s][first:]]) for s in seeds}
                for p in PRECISIONS}
        c = compare(prec, seeds, rng)
        lo, hi = c["ratio_ci"]
        print(f"{metric:<10} {c['prec_rms']:>12.4f} [{c['prec_max']:.4f}] {c['seed_rms']:>12.4f} "
              f"[{c['seed_max']:.4f}] {c['ratio']:>10.2f} [{lo:.2f}, {hi:.2f}]")
        verdicts.append((metric, c["ratio"], hi))
    if masks is None:
        from bench.core.ranks import spearman
        metric = cfg.game.metric
        phi = {p: {s: exact_shapley(np.array([r["metrics"][metric] for r in recs[p][s]])) for s in seeds}
               for p in PRECISIONS}
        across = [spearman(phi["bf16"][s], phi["fp32"][s]) for s in seeds]
        between = [spearman(phi["fp32"][a], phi["fp32"][b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        print(f"exact Shapley ({metric}) rho: bf16 vs fp32 per seed {np.round(across, 3).tolist()}; "
              f"seed vs seed under fp32 {np.round(between, 3).tolist()}")
    for p in PRECISIONS:
        timed = [r for s in seeds for r in recs[p][s][first:]]
        tr = [r["train_s"] for r in timed if r["train_s"]]
        ev = [r["eval_s"] for r in timed if r["eval_s"]]
        print(f"{p}: fine-tune median {np.median(tr):.2f} s, scoring median {np.median(ev):.2f} s over {len(tr)} "
              f"fine-tunes ({'all trained in this run' if args.fresh else 'as recorded when each was trained'})"
              if tr else f"{p}: no fine-tune timed")
    worse = [m for m, ratio, hi in verdicts if not hi < 1]
    print("verdict: " + ("bf16 moves every utility less than the training seed does (upper 95% bound of "
                         "the ratio < 1)" if not worse else
                         f"bf16 is not shown to move {', '.join(worse)} less than the training seed does"))
    return 0


def _n_owners(cfg) -> int:
    from bench.harness.build import build_game, build_task
    return build_game(cfg, build_task(cfg))[0].n


if __name__ == "__main__":
    sys.exit(main())
