"""``python -m bench precision``: the comparison of bf16 against fp32 utilities beside
the seed-to-seed yardstick (the part that trains nothing)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.cli.precision import compare, main


def test_a_precision_effect_below_the_seed_noise_reads_below_one():
    rng = np.random.default_rng(1)
    base = rng.normal(size=200)
    fp32 = {s: base + rng.normal(scale=0.1, size=200) for s in (0, 1, 2)}       # seed noise sd 0.1
    bf16 = {s: fp32[s] + rng.normal(scale=0.01, size=200) for s in (0, 1, 2)}   # precision noise sd 0.01
    c = compare({"fp32": fp32, "bf16": bf16}, [0, 1, 2], np.random.default_rng(0))
    assert c["prec_rms"] == pytest.approx(0.01, rel=0.2)
    assert c["seed_rms"] == pytest.approx(0.1 * np.sqrt(2), rel=0.2)         # a difference of two seeds
    lo, hi = c["ratio_ci"]
    assert lo < c["ratio"] < hi < 0.15


def test_a_precision_effect_as_large_as_the_seed_noise_is_not_called_smaller():
    rng = np.random.default_rng(2)
    fp32 = {s: rng.normal(size=100) for s in (0, 1)}
    bf16 = {s: rng.normal(size=100) for s in (0, 1)}
    c = compare({"fp32": fp32, "bf16": bf16}, [0, 1], np.random.default_rng(0))
    assert c["ratio_ci"][1] > 1


@pytest.mark.parametrize("argv, field", [(["--seeds", "0"], "--seeds"), (["--seeds", "1,1"], "--seeds"),
                                         (["--coalitions", "-1"], "--coalitions")])
def test_bad_arguments_fail_in_one_line(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["experiment=smoke"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err
