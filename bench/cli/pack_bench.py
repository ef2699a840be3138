"""``python -m bench pack-bench``: K coalitions' LoRA fine-tunes in one pass vs one by one.

Builds the game of a preset (a temporary utility cache; the base model is reused
from the configured cache), prepares its training pairs once (tokens and reference
log-probs, ``Game.examples``), draws ``--coalitions`` random coalitions of owners
(fixed ``--seed``; with replacement once every non-empty coalition is drawn), and
trains them twice from the base:

    one by one   ``dpo_train`` per coalition (what the game does today)
    packed       ``dpo_train_packed``, ``--k`` coalitions per pass (one forward and
                 one backward per step over all their rows, one adapter each)

It prints the wall seconds of each (training, including each trainer's construction
and the merged model each returns; not scoring), the speed-up (one by one / packed),
and the largest absolute difference between the two adapters of a coalition. That
difference is float rounding: the packed batch is right-padded to its longest row,
and attention over more (masked) keys may round otherwise, which Adam amplifies in
near-zero gradient components (SmolLM2, CPU, 6 steps: ~1e-3 on weights of ~0.04, as
much as ``dpo_train`` moves when only its own batches are padded further; the eval
log-probs then differ by ~1e-4). See ``bench.core.packed``. On a GPU it also prints
the peak memory torch allocated there over the whole run (``make gpu-smoke`` shows it).

Both paths first train one batch's worth of the first coalition untimed, so neither
pays the process's one-time costs (kernels, allocator, lazy imports). Packed training
trains LoRA adapters: a full fine-tune preset (``train.lora_r=null``, e.g. the tiny
tier's) is run with ``train.lora_r=8``, and the output says so.

    python -m bench pack-bench experiment=smoke --k 4 --coalitions 8
    python -m bench pack-bench experiment=default --k 4 --coalitions 8
"""
from __future__ import annotations

import argparse
import sys
import time


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench pack-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--k", type=int, default=4, help="coalitions trained per packed pass (default 4)")
    ap.add_argument("--coalitions", type=int, default=8, help="random coalitions to train (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the coalition draw (default 0)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")
    return ap


def draw_coalitions(n_owners: int, count: int, seed: int) -> list[int]:
    """``count`` random non-empty coalitions (owner bitmasks): distinct while there are
    unused ones, then drawn again."""
    import numpy as np
    rng = np.random.default_rng(seed)
    masks = np.arange(1, 2 ** n_owners)
    out: list[int] = []
    while len(out) < count:
        out += [int(m) for m in rng.permutation(masks)[:count - len(out)]]
    return out


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gpu(device: str) -> str:
    """The most torch allocated on the GPU in this process (both paths and the warm-up)."""
    import torch
    if device != "cuda":
        return f"       -   ({device})"
    return f"{torch.cuda.max_memory_allocated() / 2**30:8.2f} GiB   (torch.cuda.max_memory_allocated, whole run)"


def compare(game, args):
    """Train the same random coalitions one by one and packed ``args.k`` at a time
    (after an untimed warm-up of both paths): (solo results, packed results, solo
    seconds, packed seconds, masks)."""
    from bench.core.packed import dpo_train_packed
    from bench.core.train import FineTuneDiverged, dpo_train
    model, tok = game.base()
    masks = draw_coalitions(game.n, args.coalitions, args.seed)
    coalitions = [[p for i in game.ordered(m) for p in game.owners[i]] for m in masks]
    examples = game.examples(game.flat_pairs())
    spec, s, seed = game.model_spec, game.train, game.seed

    def one_by_one(cs):
        out = []
        for c in cs:
            try:
                stage, stats, trained = dpo_train(model, tok, spec, c, s, seed, examples=examples)
            except FineTuneDiverged as e:
                out.append(e)
                continue
            del trained
            out.append((stage, stats))
        return out

    def packed(cs):
        out = []
        for i in range(0, len(cs), args.k):
            for r in dpo_train_packed(model, tok, spec, cs[i:i + args.k], s, seed, examples):
                out.append(r if isinstance(r, Exception) else r[:2])
        return out

    warm = [coalitions[0][:s.batch_size]]            # untimed warm-up of both paths: one batch per epoch
    one_by_one(warm)
    packed(warm)
    _sync()
    t0 = time.perf_counter()
    solo = one_by_one(coalitions)
    _sync()
    solo_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pack = packed(coalitions)
    _sync()
    pack_s = time.perf_counter() - t0
    return solo, pack, solo_s, pack_s, masks


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)      # options and overrides in any order
    from bench.core.errors import ConfigError, fail
    if args.k < 1:
        fail("--k: use >= 1")
    if args.coalitions < 1:
        fail("--coalitions: use >= 1")
    from bench.core.env import quiet_libraries
    from bench.harness.build import compose_config, scratch_game
    quiet_libraries()
    cfg = compose_config(args.overrides)
    note = ""
    if cfg.train.lora_r is None:
        cfg.train.lora_r = 8
        note = " (the preset fine-tunes in full; packed training trains LoRA adapters)"
    try:
        with scratch_game(cfg) as game:
            solo, pack, solo_s, pack_s, masks = compare(game, args)
    except ConfigError as e:
        fail(e)
    model, s = game.base()[0], game.train
    diff, steps, diverged = 0.0, 0, 0
    for a, b in zip(solo, pack):
        if isinstance(a, Exception) or isinstance(b, Exception):
            diverged += 1
            continue
        steps += a[1]["steps"]
        for key, v in a[0]["state"].items():
            diff = max(diff, (v.detach().float().cpu() - b[0]["state"][key].detach().float().cpu()).abs().max().item())
    device = next(model.parameters()).device.type
    print(f"[dvbench] pack-bench: {cfg.experiment_name}, model={cfg.model.name}, train.lora_r={s.lora_r}{note}, "
          f"{len(masks)} random coalitions of {game.n} owners (seed {args.seed}; {steps} optimizer steps each way), "
          f"--k {args.k} per packed pass, device {device}")
    rows = (("one by one (dpo_train)", f"{solo_s:8.2f} s"),
            (f"packed, {args.k} per pass (dpo_train_packed)", f"{pack_s:8.2f} s"),
            ("speed-up (one by one / packed)", f"{solo_s / pack_s:8.2f}x"),
            ("max |adapter difference|", f"{diff:8.1e}   (packed vs one by one: same coalition, every adapter weight)"),
            ("peak GPU memory", _peak_gpu(device)))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if diverged:
        print(f"diverged (FineTuneDiverged, either path): {diverged} coalition(s), left out of the difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
