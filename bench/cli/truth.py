"""``python -m bench truth``: the ground truth that ships with the repository
(``bench/core/truth.py``; a job reads it with ``truth=auto``).

    python -m bench truth export experiment=first        # the job's cached utilities -> results/published/truth/first/
    python -m bench truth show experiment=first          # what is shipped, what it lacks, how this machine differs
    python -m bench truth canary experiment=first        # retrain the canaries here; exit 1 if one moved past the noise

``export`` writes every utility of the experiment's seeds and LDS subsets found in
``cache_dir`` (or already shipped: a re-export after another shard merges them), with
the commit and code version that computed them. When the cache was filled by another
commit's code (a long job run from a worktree), name it: ``--code <code version>
--commit <sha>`` (``python -c "from bench.core.game import code_version; print(code_version())"``
run in that commit's tree prints the first). Export from a committed tree.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench truth", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("action", choices=("export", "show", "canary"))
    ap.add_argument("--dest", help="export: the folder (default results/published/truth/<experiment_name>)")
    ap.add_argument("--code", help="export: the code version that filled the cache, when not this tree's")
    ap.add_argument("--commit", help="export with --code: the commit of that code")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=first")
    args = ap.parse_intermixed_args(argv)
    from bench.core.errors import ConfigError, fail
    if bool(args.code) != bool(args.commit):
        fail("--code and --commit: give both (the code version that filled the cache and its commit) or neither")
    from bench.core.env import quiet_libraries
    quiet_libraries()
    try:
        return ACTIONS[args.action](args)
    except ConfigError as e:
        fail(e)


def _games(overrides: list[str], truth: str | None = None):
    """The experiment's games (seeds, then LDS seeds), the LDS items and the config."""
    from omegaconf import OmegaConf

    from bench.harness.build import build_game, build_task, compose_config
    from bench.harness.checks import check_config
    from bench.harness.eta import lds_items
    cfg = compose_config(overrides)
    check_config(cfg)
    cfg.progress = False
    game, _ = build_game(cfg, build_task(cfg))
    games = {int(s): game.with_seed(int(s)) for s in cfg.seeds}
    lds_cfg = OmegaConf.to_container(cfg.lds, resolve=True)
    lds_games = {int(s): game.with_seed(int(s)) for s in lds_cfg["seeds"]} if lds_cfg["n_subsets"] else {}
    return cfg, games, lds_games, lds_items(list(lds_games.values()), lds_cfg), lds_cfg


def _shipped(cfg):
    """(folder, loaded truth) the job's ``truth`` setting names (``off`` reads the shipped one)."""
    from bench.core import truth as T
    from bench.harness.truth import truth_folder
    folder, _ = truth_folder(str(cfg.truth) if cfg.truth != "off" else "auto", str(cfg.experiment_name))
    return folder, T.load(folder)


def export(args) -> int:
    from pathlib import Path

    from bench.core import truth as T
    from bench.harness.truth import TRUTH_ROOT, attach_truth
    from bench.tracking.provenance import git_info
    from bench.tracking.system import hardware_fingerprint
    cfg, games, lds_games, items, lds_cfg = _games(args.overrides)
    dest = Path(args.dest) if args.dest else TRUTH_ROOT / str(cfg.experiment_name)
    every = [*games.values(), *lds_games.values()]
    if (dest / T.MANIFEST).is_file():              # merge: what is shipped stays, the cache adds to it
        attach_truth(str(dest), str(cfg.experiment_name), every)
    prov = {**git_info(), "cpu": hardware_fingerprint().get("cpu")}
    if args.code:
        for g in every:
            g._static["code"] = args.code        # look the cache up under the code that filled it
        prov.update(commit=args.commit, dirty=False)
    elif prov["dirty"]:
        print("[dvbench] warning: the tree has uncommitted changes; the manifest says dirty=true (export from a "
              "committed tree so its commit reproduces the table)")
    bases = [(g, 0) for g in lds_games.values()]      # the LDS seeds' base scores (their targets' reference)
    m = T.export(list(games.values()), items, dest, str(cfg.experiment_name), prov,
                 {k: lds_cfg[k] for k in ("n_subsets", "frac", "seed", "seeds")}, extra=bases)
    c = m["contents"]
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"[dvbench] truth exported to {dest}: coalitions per seed {c['coalitions']} of {c['coalitions_per_seed']}"
          f"{' (complete)' if c['complete'] else ' (incomplete: run the missing shards, export again)'}, LDS subsets "
          f"{c['lds_subsets']}, {size / 1e6:.2f} MB, {len(m['canaries'])} canaries")
    return 0


def show(args) -> int:
    from bench.core import truth as T
    cfg, games, _, _, _ = _games(args.overrides)
    folder, truth = _shipped(cfg)
    g = next(iter(games.values()))
    why = T.mismatch(truth, g)
    c = truth.counts()
    print(f"{folder}: commit {truth.manifest['drift'].get('commit')}, code {truth.manifest['drift'].get('code')}")
    print(f"  coalitions per seed: {c['coalitions']} of {c['coalitions_per_seed']}; LDS subsets {c['lds_subsets']}")
    print(f"  this job's game: {'the same' if why is None else 'another (' + why + ')'}")
    drift = T.drift_of(truth, g)
    print(f"  drift from this machine: {drift or 'none'}")
    print(f"  canaries: " + ", ".join(f"seed {x['seed']} mask {x['mask']} ({x['n_train']} pairs)"
                                      for x in truth.manifest["canaries"]))
    return 0


def canary(args) -> int:
    from bench.core import truth as T
    cfg, games, _, _, _ = _games(args.overrides)
    _, truth = _shipped(cfg)
    why = T.mismatch(truth, next(iter(games.values())))
    if why:
        from bench.core.errors import ConfigError
        raise ConfigError(f"truth canary: this job's game is not the shipped one ({why}); drop the override")
    rows = T.canary_rows(truth, games)
    print(f"{'seed':>4} {'mask':>5} {'metric':<10} {'shipped':>10} {'now':>10} {'diff':>10} {'tolerance':>10}  ok")
    for r in rows:
        print(f"{r['seed']:>4} {r['mask']:>5} {r['metric']:<10} {r['shipped']:>10.5f} {r['now']:>10.5f} "
              f"{r['diff']:>+10.2e} {r['tolerance']:>10.2e}  {'yes' if r['ok'] else 'NO'}")
    bad = [r for r in rows if not r["ok"]]
    print(f"[dvbench] truth canary: {len(rows) - len(bad)}/{len(rows)} within {T.CANARY_SIGMAS:g} seed-to-seed SD "
          f"(floor {T.CANARY_FLOOR:g} of the table's spread)" + ("" if not bad else
                                                                  f"; {len(bad)} moved: the code, libraries or "
                                                                  f"hardware here change the utilities"))
    return 1 if bad else 0


ACTIONS = {"export": export, "show": show, "canary": canary}

if __name__ == "__main__":
    sys.exit(main())
