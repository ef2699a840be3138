"""The harness's metrics of one valuation against the consensus of the other seeds."""
from __future__ import annotations

import numpy as np
import pytest

from bench.core import shapley
from bench.core.partition import Planted
from bench.core.valuation import Valuation
from bench.harness.job import Exact, Reference, consensus_of, evaluate, owner_corruption


def reference(noise=0.05, n=5, seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    weights = np.array([0.3, 0.2, 0.1, -0.1, -0.3])[:n]
    masks = np.arange(2 ** n)
    base = np.array([sum(weights[i] for i in range(n) if m >> i & 1) for m in masks])
    exacts = {}
    for s in seeds:
        t = base + rng.normal(0, noise, size=base.shape)
        t[0] = 0.0
        exacts[s] = Exact(t, shapley.exact_shapley(t))
    planted = Planted(noisy_owners=[4], corrupted_ids=[8, 9])
    owners = [[type("P", (), {"id": 2 * i + k})() for k in range(2)] for i in range(n)]
    return Reference(exacts, consensus_of(exacts), planted, owner_corruption(owners, [8, 9]), list(range(2 * n)))


def test_fidelity_is_against_the_other_seeds_and_the_ceiling_is_this_seeds_exact_values():
    ref = reference()
    for s in (0, 1, 2):
        exact = evaluate(Valuation(ref.exacts[s].phi), s, ref)
        assert exact["fidelity"] == exact["one_seed_exact"]
        np.testing.assert_allclose(ref.consensus.held_out(s), np.mean([ref.exacts[t].phi for t in (0, 1, 2) if t != s], 0))
    truth = evaluate(Valuation(np.array([0.3, 0.2, 0.1, -0.1, -0.3])), 0, ref)
    assert truth["fidelity"]["spearman"] == pytest.approx(1.0)
    assert truth["detection"]["auroc"] == 1.0 and truth["detection_graded"]["concordance"] > 0.75
    assert ref.corruption == [0, 0, 0, 0, 1.0]


def test_a_randomised_valuer_is_scored_by_its_expectation_over_draws():
    ref = reference()
    draws = np.random.default_rng(1).standard_normal((512, 5))
    out = evaluate(Valuation(draws[0], draws=draws), 0, ref)
    assert out["draws"] == {"n": 512}
    assert abs(out["fidelity"]["spearman"]) < 0.06, "random values: expected rank correlation 0"
    assert out["detection"]["auroc"] == pytest.approx(0.5, abs=0.05)
    one = evaluate(Valuation(draws[0]), 0, ref)
    assert one["fidelity"]["spearman"] != out["fidelity"]["spearman"]
    with pytest.raises(ValueError):
        Valuation(draws[0], draws=draws[:, :3]).check(5, 10)
