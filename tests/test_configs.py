"""Every shipped config composes with Hydra, resolves, and builds what it names."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import REPO, one_line
from omegaconf import OmegaConf

from bench.core.errors import ConfigError
from bench.core.game import Game
from bench.core.models import ModelSpec
from bench.core.partition import make_partition
from bench.harness.build import (available_valuers, build_game, build_task, build_valuer, check_valuers,
                                  default_valuers)
from bench.core.task import synthetic_pref
from bench.core.train import TrainSettings

CONF = REPO / "conf"


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(): hcompose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def test_groups_exist():
    for group in ("experiment", "valuer", "model", "task", "partition", "game", "train", "logger"):
        assert _names(group), group
    assert set(_names("experiment")) >= {"smoke", "quick", "default"}


@pytest.mark.parametrize("name", _names("experiment"))
def test_experiment_composes_and_builds(compose, name, tmp_path, monkeypatch):
    cfg = compose([f"experiment={name}", f"results_dir={tmp_path}"])
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert c["experiment_name"] == name
    assert c["cache_dir"] == f"{tmp_path}/cache"
    # the valuers it selects exist and build with its per-valuer settings
    built = check_valuers(c)
    names = list(built)
    assert names[:2] == ["random", "retrain_shapley"] and set(names) <= set(available_valuers())
    for v in names:
        valuer, vcfg = built[v]
        assert valuer.name == v
        for k, val in (c["valuer"].get(v) or {}).items():
            assert vcfg[k] == val
    # data and partition build as declared (no model is loaded)
    task = build_task(cfg)
    if c["task"]["kind"] == "hh_rlhf":
        assert (len(task.train), len(task.eval)) == (c["task"]["n_train"], c["task"]["n_eval"])
    else:
        assert task.sources == c["task"]["sources"]
        assert len(task.train) == c["task"]["n_train_per_source"] * len(task.sources)
    import bench.core.partition as P        # topics from fake embeddings: no MiniLM here
    monkeypatch.setattr(P, "embed_prompts", lambda ps: np.array([[len(p), p.count(" "), sum(map(ord, p)) % 97]
                                                                 for p in ps], dtype=float))
    game, part = build_game(cfg, task)
    assert isinstance(game, Game) and game.kind == c["game"]["kind"]
    assert part.n_owners == game.n
    want = c["partition"]
    if want["sizes"]:
        assert part.sizes()[:len(want["sizes"])] == want["sizes"]
    n_base = want["n_owners"] if want["kind"] != "by_source" else len(want["owner_sources"] or task.sources)
    assert part.n_owners == n_base + len(want["duplicate_pairs"]) + len(want.get("near_duplicate_pairs") or [])
    assert set(want["noisy_owners"]) <= set(part.planted.noisy_owners)
    for i, src in enumerate(want["owner_sources"] or []):
        assert {p.source for p in part.owners[i]} == {src}
    for copy, orig in want["duplicate_pairs"]:
        assert [p.id for p in part.owners[copy]] == [p.id for p in part.owners[orig]]


def test_experiment_comments_match_configs(compose):
    """What the experiment files say they plant is what they plant."""
    smoke = compose(["experiment=smoke"])
    _, part = build_game(smoke)
    assert part.planted.noisy_owners == [2] and {p.source for p in part.owners[2]} == {"tone"}
    quick = compose(["experiment=quick"])
    _, part = build_game(quick)
    assert part.planted.noisy_owners == [4] and {p.source for p in part.owners[4]} == {"tone"}
    assert part.planted.duplicate_pairs == [[5, 1]]
    default = compose(["experiment=default"])
    _, part = build_game(default)
    assert part.planted.noisy_owners == [3] and {p.source for p in part.owners[3]} == {"arithmetic"}
    assert part.n_owners == 4
    graded = compose(["experiment=graded"])
    _, part = build_game(graded)
    assert part.planted.corruption == [0, 0, 0.25, 0.5, 1.0, 1.0, 0, 0]
    assert part.planted.duplicate_pairs == [[6, 0]] and part.planted.near_duplicate_pairs == [[7, 1]]


def test_valuer_group_all_lists_options_of_the_group():
    """conf/valuer/all.yaml (valuer=all, the default) selects options of this group only,
    and every option but the point-level reference (hours on the presets)."""
    assert set(default_valuers()) == set(available_valuers()) - {"point_mc_shapley"}
    assert set(available_valuers()) == set(_names("valuer")) - {"all"}


@pytest.mark.parametrize("name", available_valuers())
def test_valuer_instantiates(name):
    valuer, vcfg = build_valuer(name)
    assert valuer.name == name == vcfg["name"]
    assert callable(getattr(valuer, "value", None))
    assert vcfg["_target_"].split(".")[-1] == type(valuer).__name__


def test_valuer_overrides_reach_the_object():
    valuer, _ = build_valuer("mc_shapley", {"max_permutations": 3, "seed": 5})
    assert valuer.kw["max_permutations"] == 3 and valuer.seed == 5
    with pytest.raises(ConfigError) as e:
        build_valuer("nope")
    assert one_line(str(e.value)) and "retrain_shapley" in str(e.value)
    assert available_valuers() == [n for n in _names("valuer") if n != "all"]


SMALL_TASK = ["task.n_train_per_source=8", "task.n_eval_per_source=4", "task.n_warmup_per_source=4"]


@pytest.mark.parametrize("group, name", [(g, n) for g in ("model", "task", "partition", "game", "train", "logger")
                                         for n in _names(g)])
def test_group_option_composes(compose, group, name, tmp_path):
    cfg = compose([f"{group}={name}", f"results_dir={tmp_path}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    sec = c[group]
    if group == "model":
        fields = set(ModelSpec.__dataclass_fields__)
        unknown = set(sec) - fields
        assert not unknown, unknown
        ModelSpec(**sec)
    elif group == "task":
        assert sec["kind"] in ("synthetic_pref", "local_pref", "hh_rlhf")
        if sec["kind"] == "synthetic_pref":
            task = build_task(compose([f"task={name}", *SMALL_TASK]))
            assert task.train and task.eval
        elif sec["kind"] == "hh_rlhf":             # the embedded file: offline, no model
            task = build_task(compose([f"task={name}", "task.n_train=20", "task.n_eval=10"]))
            assert (len(task.train), len(task.eval)) == (20, 10)
        else:
            assert sec["path"] == "???"          # must be given by the user
            import inspect
            from bench.core.task import local_pref
            params = set(inspect.signature(local_pref).parameters)
            assert set(sec) - {"kind"} <= params, set(sec) - params
    elif group == "partition":
        task = synthetic_pref(n_train_per_source=12, n_eval_per_source=2, n_warmup_per_source=0)
        kw = {k: v for k, v in sec.items()}
        # by_topic: fake prompt embeddings (tests/test_hh_rlhf.py covers it; no MiniLM here)
        fake = lambda ps: np.array([[len(p), p.count(" "), sum(map(ord, p)) % 97] for p in ps], dtype=float)
        part = make_partition(task, **kw, embed_fn=fake if sec["kind"] == "by_topic" else None)
        assert part.n_owners >= 2 and min(part.sizes()) >= 1
        assert part.description.startswith(sec["kind"])
    elif group == "game":
        assert sec["kind"] in ("union", "sequential")
        g, _ = build_game(compose([f"game={name}", *SMALL_TASK, f"results_dir={tmp_path}"]))
        assert g.kind == sec["kind"] and g.metric == sec["metric"]
    elif group == "train":
        s = TrainSettings(**sec)
        assert s.lr > 0 and s.epochs > 0 and s.batch_size >= 1
        assert set(sec) == {f.name for f in dataclasses.fields(TrainSettings)}
    elif group == "logger":
        assert sec["mode"] in ("offline", "online", "disabled")
        assert sec["dir"] == f"{tmp_path}/wandb"


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_partition_kind_reaches_make_partition(compose, name):
    cfg = compose([f"partition={name}", *SMALL_TASK])
    _, part = build_game(cfg)
    assert part.description.startswith(name), part.description
    assert part.n_owners == cfg.partition.n_owners


def test_check_overrides_names_group_and_choices():
    from bench.cli.run import check_overrides
    msg = check_overrides(["model=nope"])
    assert msg and one_line(msg)
    assert "model" in msg and "nope" in msg
    for choice in _names("model"):
        assert choice in msg
    for bad in (["experiment=nope"], ["task=nope"], ["+partition=nope"], ["seed=1", "game=union,nope"]):
        m = check_overrides(bad)
        assert m and one_line(m) and "nope" in m, bad
    assert check_overrides(["model=tiny", "experiment=smoke", "seed=3", "game=union,sequential",
                            "results_dir=/tmp/x", "-m"]) is None
