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
