"""Config → objects: the task, the partition, the game and the valuers of a job.

Valuers are a Hydra config group (``conf/valuer/<name>.yaml``); each is built with
``hydra.utils.instantiate`` from its YAML merged with ``valuer_args.<name>``, and
only classes in ``valuers/`` may be named as ``_target_``.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.core.errors import ConfigError
from bench.core.game import Game
from bench.core.models import ModelSpec
from bench.core.partition import make_partition
from bench.core.task import local_pref, synthetic_pref
from bench.core.train import TrainSettings

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def _kwargs(cfg: DictConfig, drop=("kind",)) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in drop}


def build_task(cfg: DictConfig):
    t = cfg.task
    builders = {"synthetic_pref": synthetic_pref, "local_pref": local_pref}
    if t.kind not in builders:
        raise ConfigError(f"task.kind: unknown {t.kind!r}; choose one of {list(builders)}")
    fn = builders[t.kind]
    accepted = set(inspect.signature(fn).parameters)
    kw = _kwargs(t)
    ignored = sorted(set(kw) - accepted)   # e.g. an experiment's generator sizes under task=local_pref
    if ignored:
        print(f"[dvbench] task.kind={t.kind} ignores task.{', task.'.join(ignored)}")
    return fn(**{k: v for k, v in kw.items() if k in accepted})


def build_game(cfg: DictConfig, task=None, partition=None) -> tuple[Game, object]:
    task = task or build_task(cfg)
    part = partition or make_partition(task, **_kwargs(cfg.partition, drop=()))
    fields = set(ModelSpec.__dataclass_fields__)
    model = ModelSpec(**{k: v for k, v in _kwargs(cfg.model, drop=()).items() if k in fields})
    train = TrainSettings(**_kwargs(cfg.train, drop=()))
    game = Game(task, part, model, train, kind=cfg.game.kind, seed=int(cfg.seed), metric=cfg.game.metric,
                cache_dir=cfg.cache_dir, n_jobs=int(cfg.n_jobs), progress=bool(cfg.progress))
    return game, part


BASELINES = ("random", "retrain_shapley")     # always in a job's records


def available_valuers() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "valuer").glob("*.yaml"))


def default_valuers() -> list[str]:
    """What ``valuers=all`` runs: every valuer except those whose YAML says
    ``in_all: false`` (references that cost far more than the preset, e.g. point-level
    permutation Shapley); name those explicitly."""
    return [n for n in available_valuers()
            if OmegaConf.load(CONF_DIR / "valuer" / f"{n}.yaml").get("in_all", True)]


def build_valuer(name: str, overrides: dict | None = None):
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
    return instantiate(vcfg), OmegaConf.to_container(vcfg)
