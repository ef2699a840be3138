"""Config → objects: the task, the partition, the game and the valuers of a job.

Every node is read through its ``Settings`` class (unknown keys refused by name, every
field type- and range-checked); ``check_inputs`` refuses data that would make a
reported metric meaningless before the game exists, ``check_valuers`` the valuer list.
Valuers are a Hydra config group with several choices (``valuer=[loo,shed]``; each
``conf/valuer/<name>.yaml`` lands at ``valuer.<name>``, so ``valuer.shed.n_clusters=20``
is a plain, type-checked override); each is built with ``hydra.utils.instantiate``,
and only classes in ``valuers/`` may be named as ``_target_``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.core.errors import ConfigError
from bench.core.game import Game
from bench.core.hh_rlhf import HHSettings, hh_rlhf
from bench.core.models import ModelSpec
from bench.core.partition import Partition, PartitionSettings, make_partition
from bench.core.task import LocalSettings, SyntheticSettings, Task, local_pref, synthetic_pref
from bench.core.train import TrainSettings

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``conf/config.yaml`` composes with these overrides (Hydra's compose API,
    outside ``@hydra.main``; no output folder is written)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _kwargs(cfg: DictConfig, drop=("kind",)) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in drop}


TASKS = {"synthetic_pref": (synthetic_pref, SyntheticSettings), "local_pref": (local_pref, LocalSettings),
         "hh_rlhf": (hh_rlhf, HHSettings)}


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
    game = Game(task, part, model, train, kind=cfg.game.kind, seed=int(cfg.seeds[0]), metric=cfg.game.metric,
                cache_dir=cfg.cache_dir, n_jobs=int(cfg.n_jobs), progress=bool(cfg.progress),
                device=str(cfg.game.get("device", "auto")), pack=int(cfg.game.get("pack", 1)),
                deterministic=bool(cfg.game.get("deterministic", True)))
    return game, part


def check_trainable(game) -> None:
    """Refuse, before any fine-tune, settings under which no training pair keeps a
    response token: TRL drops every pair whose prompt fills ``train.max_length``, and a
    coalition with no pair left ended in ``torch.cat(): expected a non-empty list``.
    Prompt lengths are counted without special tokens (the fewest TRL can see), so only
    a game that certainly has nothing to train is refused. Loads the base (the job needs
    it next anyway)."""
    from bench.core.models import render_prompt
    _, tok = game.base()
    n = int(game.train.max_length)
    lens = [len(tok(render_prompt(tok, game.model_spec, p.prompt), add_special_tokens=False)["input_ids"])
            for p in game.flat_pairs()]
    if lens and min(lens) >= n:
        raise ConfigError(f"train.max_length: {n} tokens leave no response token in any of the {len(lens)} training "
                          f"pairs (their prompts are {min(lens)}+ tokens; TRL drops such pairs); raise "
                          f"train.max_length above {min(lens)}, or shorten the prompts (task.max_prompt_tokens)")


@contextmanager
def scratch_game(cfg: DictConfig):
    """The game of ``cfg`` on a temporary utility cache (deleted on exit) that shares
    the configured cache's base models, one process, no progress bars: for programs
    that measure fine-tunes afresh (profile, pack-bench). Raises ConfigError on bad
    settings before anything is trained."""
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="dvbench-scratch-"))
    try:
        models = Path(cfg.cache_dir) / "models"          # the base is built (or read) once, in the configured cache
        models.mkdir(parents=True, exist_ok=True)
        (tmp / "models").symlink_to(models.resolve(), target_is_directory=True)
        cfg.cache_dir, cfg.n_jobs, cfg.progress = str(tmp), 1, False
        game, _ = build_game(cfg, build_task(cfg))
        yield game
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Every option of the ``valuer`` config group (``all`` is the group's default
    selection, not a valuer)."""
    return sorted(p.stem for p in (CONF_DIR / "valuer").glob("*.yaml") if p.stem != "all")


def default_valuers() -> list[str]:
    """What ``valuer=all`` selects: the defaults list of ``conf/valuer/all.yaml``."""
    return [str(n) for n in OmegaConf.load(CONF_DIR / "valuer" / "all.yaml").defaults]


def check_valuers(c: dict) -> dict[str, tuple]:
    """The valuers a job runs, built (their settings checked by building them), in
    order, the baselines first: ``{name: (valuer, its resolved config)}``, from the
    composed config as plain data (``valuer.<name>`` = that valuer's config). A node
    without ``_target_`` holds a preset's settings for a valuer that is not selected
    and is ignored."""
    nodes = c.get("valuer") or {}
    if not isinstance(nodes, dict):
        raise ConfigError(f"valuer: {nodes!r}; select valuers with valuer=[loo,shed] or valuer=all")
    asked = [n for n, v in nodes.items() if isinstance(v, dict) and "_target_" in v]
    if not asked:
        raise ConfigError(f"valuer: none selected, so only the baselines {list(BASELINES)} would run, with nothing "
                          f"to compare; select the valuers to benchmark, e.g. valuer=[dpo_arithmetic,shed], or "
                          f"valuer=all")
    names = list(dict.fromkeys([*BASELINES, *asked]))
    unknown = [n for n in names if n not in available_valuers()]
    if unknown:
        raise ConfigError(f"valuer: unknown {unknown}; choose from {available_valuers()}")
    return {n: build_valuer(n, nodes.get(n)) for n in names}


def build_valuer(name: str, overrides: dict | None = None):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    path = CONF_DIR / "valuer" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"valuer: unknown valuer {name!r}; choose from {available_valuers()}")
    vcfg = OmegaConf.merge(OmegaConf.load(path), overrides or {})
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
