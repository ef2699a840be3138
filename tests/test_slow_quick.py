"""Slow end-to-end check of the retraining valuers on the `quick` preset (6 owners,
one flipped, one duplicate): run with `make test-slow` or `pytest -m slow`."""

import numpy as np
import pytest

from conftest import run_cli, read_records


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    code, _, err = run_cli(["experiment=quick", "logger=none", f"results_dir={tmp_path}",
                            f"hydra.run.dir={tmp_path}/hydra", "valuer=[random,loo,retrain_shapley,mc_shapley]",
                            "progress=false"])
    assert code == 0, err[-2000:]
    all_recs = read_records(tmp_path, "quick")
    assert sorted({r["seed"] for r in all_recs}) == [0, 1, 2]
    recs = {r["valuer"]: r for r in all_recs if r["seed"] == 0}
    assert set(recs) == {"random", "loo", "retrain_shapley", "mc_shapley"}
    exact = recs["retrain_shapley"]
    phi, phi2 = np.array(exact["exact_values"]), np.array(exact["reference_values"])   # seed 0; seeds 1, 2
    table = np.array(exact["utility_table"])
    assert abs(phi.sum() - (table[-1] - table[0])) < 1e-9                      # efficiency
    noisy, (copy, orig) = exact["planted"]["noisy_owners"], exact["planted"]["duplicate_pairs"][0]
    for values in (phi, phi2):                                                 # both seeds
        assert int(np.argmin(values)) in noisy and values[noisy[0]] < 0        # noisy owner lowest, negative
        assert abs(values[copy] - values[orig]) < 1e-9                         # exact twins in the union game
    assert recs["loo"]["metrics"]["detection"]["auroc"] == 1.0
    mc = recs["mc_shapley"]
    assert mc["metrics"]["fidelity"]["rel_l2"] < 0.5 and mc["cost"]["fine_tunes"] <= 63
