"""``python -m bench profile``: the phase arithmetic on a known profile, and the
reference-pass timer (patched in and restored)."""
from __future__ import annotations

import pstats

import pytest

from bench.cli.profile import ORDER, breakdown, timing_reference_passes

TRL = "/site-packages/trl/trainer/dpo_trainer.py"


def _stats(cumulative: dict) -> pstats.Stats:
    """A Stats object holding the given cumulative seconds per (file, function)."""
    class Fake(pstats.Stats):
        def __init__(self):      # no profile to load
            self.stats = {(f, 1, fn): (1, 1, 0.0, ct, {}) for (f, fn), ct in cumulative.items()}
    return Fake()


def test_phases_add_up_and_reference_passes_leave_the_steps():
    st = _stats({(TRL, "__init__"): 1.5, (TRL, "_prepare_dataset"): 0.5, (TRL, "_precompute_ref_logps"): 0.25,
                 (TRL, "training_step"): 6.0, ("/x/torch/utils/checkpoint.py", "recompute_fn"): 1.0,
                 ("/r/bench/core/train.py", "sequence_logps"): 1.0, ("/r/bench/core/train.py", "to_dataset"): 0.25,
                 ("/r/bench/core/cache.py", "put_json"): 0.1, ("/elsewhere/train.py", "sequence_logps"): 9.0})
    res = breakdown(st, wall=12.0, reference_s=2.25)      # 0.25 s precomputed + 2.0 s inside the steps
    p = res["phases"]
    assert list(p) == list(ORDER)
    assert p["dataset + tokenisation"] == pytest.approx(0.75)      # to_dataset + TRL's preparation
    assert p["trainer construction"] == pytest.approx(1.5 - 0.5 - 0.25)
    assert p["reference log-probs"] == pytest.approx(2.25)
    assert p["optimizer steps"] == pytest.approx(6.0 - 2.0 - 1.0)  # steps less reference and recomputation
    assert p["evaluation"] == pytest.approx(1.0)                   # only bench's sequence_logps
    assert sum(p.values()) == pytest.approx(12.0)                  # "other" closes the wall
    assert res["efficiency"] == pytest.approx((3.0 + 1.0) / 12.0)


def test_reference_timer_is_restored():
    import trl.trainer.dpo_trainer as dpo
    original = dpo.disable_gradient_checkpointing
    with timing_reference_passes() as total:
        assert dpo.disable_gradient_checkpointing is not original
    assert dpo.disable_gradient_checkpointing is original and total == [0.0]


def test_bad_count_is_one_line(capsys):
    from conftest import run_cli
    code, _, err = run_cli(["profile", "--coalitions", "0"])
    assert code == 2 and err.strip() == "error: --coalitions: use >= 1"


def _saved(tmp_path, name="default", dirty=False):
    """A profile as ``--save`` writes it (figures made up, the shape real)."""
    import argparse
    import json
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from bench.cli.profile import save
    cfg = OmegaConf.create({"experiment_name": name, "model": {"name": "smollm2-135m"}, "train": {"precision": "fp32"}})
    res = {"wall_s": 20.0, "efficiency": 0.8, "phases": dict.fromkeys(ORDER, 0.0) | {"optimizer steps": 12.0,
                                                                                   "evaluation": 4.0, "other": 4.0}}
    args = argparse.Namespace(coalitions=2, overrides=[f"experiment={name}"])
    path = save(str(tmp_path / "profile" / f"{name}.json"), cfg, res, [1, 2], 11.0, 15.0,
                SimpleNamespace(peak=3 * 2**30, delta=2**30), args)
    rec = json.loads(open(path).read())
    rec["dirty"] = dirty                  # whatever state this checkout is in
    open(path, "w").write(json.dumps(rec))
    return rec


def test_a_saved_profile_becomes_the_readmes_cost_table(tmp_path):
    from bench.analysis.report import PROFILE_BEGIN, PROFILE_END, read_profiles, update_readme
    from bench.core.errors import ConfigError
    from test_verdicts import planted
    rec = _saved(tmp_path)
    assert rec["per_fine_tune_s"] == 10.0 and rec["command"] == "python -m bench profile --coalitions 2 experiment=default"
    assert {"commit", "dirty", "hardware", "timestamp"} <= rec.keys()
    from bench.analysis.report import README_BEGIN, README_END
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n\n{PROFILE_BEGIN}\nhand-typed\n{PROFILE_END}\ntail\n")
    update_readme(readme, planted(), profiles=read_profiles(tmp_path / "profile"))
    text = readme.read_text()
    assert "hand-typed" not in text and text.endswith(PROFILE_END + "\ntail\n")
    table = text.split(PROFILE_BEGIN)[1]
    assert "| optimizer steps | 6.00 |" in table and "| **wall per fine-tune** | **10.00** |" in table
    assert "| once per process and game | 26.0 |" in table and "`python -m bench profile --coalitions 2" in table
    _saved(tmp_path, "quick", dirty=True)
    with pytest.raises(ConfigError, match="profile quick.json was saved from a dirty tree"):
        update_readme(readme, planted(), profiles=read_profiles(tmp_path / "profile"))
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")          # profiles but nowhere to put them
    with pytest.raises(ConfigError, match="profile:begin"):
        update_readme(readme, planted(), profiles=read_profiles(tmp_path / "profile"), allow_dirty=True)


def test_save_wants_a_json_name(capsys):
    from conftest import run_cli
    code, _, err = run_cli(["profile", "--save", "out.txt", "experiment=smoke"])
    assert code == 2 and err.strip().startswith("error: --save: 'out.txt' is not a .json file name")
