"""Config → objects: the task, the partition, the game and the valuers of a job.

Every node is read through its ``Settings`` class (unknown keys refused by name, every
field type- and range-checked); ``check_inputs`` refuses data that would make a
reported metric meaningless before the game exists, ``check_valuers`` the valuer list.
Valuers are a Hydra config group (``conf/valuer/<name>.yaml``); each is built with
``hydra.utils.instantiate`` from its YAML merged with ``valuer_args.<name>``, and
only classes in ``valuers/`` may be named as ``_target_``.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.core.errors import ConfigError
from bench.core.game import Game
from bench.core.models import ModelSpec
from bench.core.partition import Partition, PartitionSettings, make_partition
from bench.core.task import LocalSettings, SyntheticSettings, Task, local_pref, synthetic_pref
from bench.core.train import TrainSettings

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def _kwargs(cfg: DictConfig, drop=("kind",)) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in drop}


TASKS = {"synthetic_pref": (synthetic_pref, SyntheticSettings), "local_pref": (local_pref, LocalSettings)}


def build_task(cfg: DictConfig) -> Task:
    t = cfg.task
    if t.kind not in TASKS:
        raise ConfigError(f"task.kind: unknown {t.kind!r}; choose one of {list(TASKS)}")
    fn, settings = TASKS[t.kind]
    accepted = {f.name for f in fields(settings)}
    kw = _kwargs(t)
    ignored = sorted(set(kw) - accepted)   # e.g. an experiment's generator sizes under task=local_pref
    if ignored:
        print(f"[dvbench] task.kind={t.kind} ignores task.{', task.'.join(ignored)}")
    s = settings.of({k: v for k, v in kw.items() if k in accepted}, prefix="task")
    return fn(**s.to_dict())


def build_game(cfg: DictConfig, task=None, partition=None) -> tuple[Game, Partition]:
    """The job's game; ``check_inputs`` first, so nothing is trained on inputs it refuses."""
    task = task or build_task(cfg)
    part = partition or make_partition(task, **PartitionSettings.of(_kwargs(cfg.partition, drop=()),
                                                                   prefix="partition").to_dict())
    model = ModelSpec.of(_kwargs(cfg.model, drop=()), prefix="model")
    train = TrainSettings.of(_kwargs(cfg.train, drop=()), prefix="train")
    check_inputs(cfg, task, part)
    game = Game(task, part, model, train, kind=cfg.game.kind, seed=int(cfg.seed), metric=cfg.game.metric,
                cache_dir=cfg.cache_dir, n_jobs=int(cfg.n_jobs), progress=bool(cfg.progress))
    return game, part


def check_inputs(cfg: DictConfig | dict, task: Task, partition: Partition) -> None:
    """What needs the data, once task and partition exist and before the game does:
    eval (and test) sets of >= 2 pairs, LDS subsets with examples in and out, a clean
    owner for detection, selection sizes within the training set."""
    c = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    local = (c.get("task") or {}).get("kind") == "local_pref"
    for split, pairs, key in (("eval", task.eval, "task.eval_fraction" if local else "task.n_eval_per_source"),
                              ("test", task.test, "task.test_path" if local else "task.n_test_per_source")):
        if split == "test" and not pairs:
            continue                  # no test split: none asked for
        if len(pairs) < 2:
            if local and split == "eval" and (c["task"].get("eval_path") or c["task"].get("eval_split")):
                key = "task.eval_path"
            raise ConfigError(f"{key}: the {split} set has {len(pairs)} usable pair(s); a utility is a mean over "
                              f"its pairs, so 1 pair makes every metric 0, 0.5 or 1; give the {split} set >= 2 pairs")
    n = sum(partition.sizes())
    lds = c.get("lds") or {}
    if lds.get("n_subsets"):
        k = int(round(lds["frac"] * n))
        if not 0 < k < n:
            raise ConfigError(f"lds.frac: {lds['frac']} of the {n} training examples gives subsets of {k}; choose "
                              f"a frac that leaves at least one example in and one out (or lds.n_subsets=0)")
    noisy = set(partition.planted.noisy_owners)
    if noisy and len(noisy) == partition.n_owners:
        raise ConfigError(f"partition.noisy_owners: every owner ({sorted(noisy)}, duplicates of noisy owners "
                          f"included) is noisy, so detection has no clean owner to tell them from; leave at least "
                          f"one owner clean")
    sel = c.get("selection") or {}
    if sel.get("valuers"):
        from bench.core.selection import target_count
        for i, size in enumerate(sel["sizes"]):
            target_count(size, n, f"selection.sizes[{i}]")


BASELINES = ("random", "retrain_shapley")     # always in a job's records


def available_valuers() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "valuer").glob("*.yaml"))


def default_valuers() -> list[str]:
    """What ``valuers=all`` runs: every valuer except those whose YAML says
    ``in_all: false`` (references that cost far more than the preset, e.g. point-level
    permutation Shapley); name those explicitly."""
    return [n for n in available_valuers()
            if OmegaConf.load(CONF_DIR / "valuer" / f"{n}.yaml").get("in_all", True)]


def check_valuers(c: dict) -> tuple[list[str], dict]:
    """The valuers a job runs (the baselines first) and their ``valuer_args``, from the
    config as plain data; every valuer's settings checked by building it. Refuses an
    empty list (only the baselines would run), a name listed twice, an unknown name and
    ``valuer_args`` of no valuer."""
    valuers = c["valuers"]
    if valuers == "all":
        asked = default_valuers()
    elif isinstance(valuers, list):
        asked = [str(v) for v in valuers]
    else:
        raise ConfigError(f"valuers: {valuers!r}; use `all` or a list, e.g. valuers=[loo,shed]")
    if not asked:
        raise ConfigError(f"valuers: empty, so only the baselines {list(BASELINES)} would run, with nothing to "
                          f"compare; name the valuers to benchmark, e.g. valuers=[dpo_arithmetic,shed], or "
                          f"valuers=all")
    twice = sorted({v for v in asked if asked.count(v) > 1})
    if twice:
        raise ConfigError(f"valuers: {twice} listed twice; name each valuer once")
    names = list(dict.fromkeys([*BASELINES, *asked]))
    unknown = [n for n in names if n not in available_valuers()]
    if unknown:
        raise ConfigError(f"valuers: unknown {unknown}; choose from {available_valuers()}")
    valuer_args = c.get("valuer_args") or {}
    stray = sorted(set(valuer_args) - set(available_valuers()))
    if stray:
        raise ConfigError(f"valuer_args: {stray} name no valuer; choose from {available_valuers()}")
    for n, args in valuer_args.items():
        if not isinstance(args, dict):
            raise ConfigError(f"valuer_args.{n}: {args!r} is not a mapping; set its options one by one, "
                              f"e.g. +valuer_args.{n}.seed=1")
    for n in names:
        build_valuer(n, valuer_args.get(n))
    return names, valuer_args


def build_valuer(name: str, overrides: dict | None = None):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    path = CONF_DIR / "valuer" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"valuers: unknown valuer {name!r}; choose from {available_valuers()}")
    vcfg = OmegaConf.merge(OmegaConf.load(path), overrides or {})
    vcfg.pop("in_all", None)                # a harness setting, not the valuer's
    target = str(vcfg.get("_target_", ""))
    if not target.startswith("valuers."):   # config-driven construction: the project's own classes only
        raise ConfigError(f"valuer {name}: _target_ {target!r} is not a class in valuers/; "
                          f"point it at valuers.<module>.<Class>")
    try:
        valuer = instantiate(vcfg)
    except InstantiationException as e:      # Hydra wraps the valuer's own one-line ConfigError
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
    return valuer, OmegaConf.to_container(vcfg)
