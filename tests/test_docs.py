"""The docs run as written: the valuer of ``docs/adding-a-valuer.md`` (its module, its YAML
and its known-answer test, copied from the page) on a real tiny game; the sample rows and
the command of ``docs/own-data.md`` through the loader and the config; every relative link
of the README and the docs pointing at a file that exists."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _blocks(page: str, lang: str, after: str = "") -> list[str]:
    """The fenced code blocks of a docs page tagged ``lang`` ("" = untagged), in order
    (only those after the text ``after``)."""
    out, current, tag = [], None, None
    text = (DOCS / page).read_text()
    for line in (text.split(after, 1)[-1] if after else text).splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, tag = [], line[3:].strip()
            else:
                if tag == lang:
                    out.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return out


@pytest.fixture
def singleton(tmp_path, monkeypatch):
    """The walkthrough's ``valuers/singleton.py``, importable as ``valuers.singleton``."""
    module = _blocks("adding-a-valuer.md", "python", after="<!-- executed as written by tests/test_docs.py -->")[0]
    path = tmp_path / "singleton.py"
    path.write_text(module)
    spec = importlib.util.spec_from_file_location("valuers.singleton", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "valuers.singleton", mod)
    spec.loader.exec_module(mod)
    return mod


def test_the_add_a_valuer_walkthrough_runs_as_written(singleton, fresh_cache, make_game):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bench.core.errors import ConfigError
    from valuers.base import Budget
    (yaml,) = _blocks("adding-a-valuer.md", "yaml")
    valuer = instantiate(OmegaConf.create(yaml))          # what build_valuer does with conf/valuer/singleton.yaml
    assert valuer.name == "singleton" and valuer.settings.per_pair is False
    known_answer = _blocks("adding-a-valuer.md", "python")[1]
    ns: dict = {}
    exec(compile(known_answer, "docs/adding-a-valuer.md", "exec"), ns)
    ns["test_singleton_is_exact_on_an_additive_game"]()
    game = make_game(fresh_cache)                          # a real tiny game: 3 owners, TRL fine-tunes
    val = valuer.value(game, Budget())
    t = game.table([0, 1, 2, 4])
    np.testing.assert_allclose(val.owner_values, [t[1] - t[0], t[2] - t[0], t[4] - t[0]])
    assert val.cost.fine_tunes == 3
    with pytest.raises(ConfigError) as e:
        singleton.Singleton(per_pair="yes")
    assert one_line(str(e.value)) and str(e.value).startswith("valuer.singleton.per_pair")


def test_the_try_it_commands_compose():
    """``experiment=first 'valuer=[...]'`` replaces the preset's valuer list."""
    from omegaconf import OmegaConf

    from bench.harness.build import check_valuers, compose_config

    def runs(overrides):
        return list(check_valuers(OmegaConf.to_container(compose_config(overrides), resolve=True)))
    assert runs(["experiment=first", "valuer=[loo]"]) == ["random", "retrain_shapley", "loo"]
    assert runs(["experiment=first"]) == ["random", "retrain_shapley", "dpo_arithmetic", "loo", "mc_shapley", "logra"]


def test_the_own_data_rows_load_and_its_command_composes(tmp_path):
    from bench.harness.build import build_task, compose_config
    (rows,) = _blocks("own-data.md", "jsonl")
    (tmp_path / "prefs.jsonl").write_text(rows)
    (tmp_path / "prefs_eval.jsonl").write_text(rows)
    (cmd,) = [b for b in _blocks("own-data.md", "") if b.startswith("python -m bench task=local_pref")]
    args = cmd.replace("\\\n", " ").split()[3:]
    args = [a.replace("data/", f"{tmp_path}/") for a in args]
    cfg = compose_config(args)
    assert cfg.task.kind == "local_pref" and cfg.partition.kind == "by_source" and cfg.model.kind == "hf"
    task = build_task(cfg)
    assert sorted(task.sources) == ["vendor_a", "vendor_b"] and len(task.train) == 3 and len(task.eval) == 3


def test_every_relative_link_resolves():
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_door():
    """Short, and its first two commands are the main job and the tests."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250 and max(map(len, lines)) <= 200
    assert [x.split()[1] for x in lines if x.startswith("make ")][:2] == ["bench", "test"]


def test_a_file_without_source_under_by_source_is_refused_in_one_line(tmp_path):
    """What docs/own-data.md says: no 'source' column + partition=by_source is one owner,
    refused before anything is trained, with the partition to use instead."""
    import json

    from bench.core.errors import ConfigError
    from bench.core.partition import make_partition
    from bench.harness.build import build_task, compose_config
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(10)]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    task = build_task(compose_config(["task=local_pref", f"task.path={tmp_path}/p.jsonl"]))
    assert task.sources == ["all"]
    with pytest.raises(ConfigError) as e:
        make_partition(task, "by_source")
    assert one_line(str(e.value)) and "no 'source' column" in str(e.value) and "partition=iid" in str(e.value)
    assert make_partition(task, "iid", n_owners=2).n_owners == 2
