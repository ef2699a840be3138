"""Micro-benchmarks of the hot paths not timed elsewhere: one DPO fine-tune step and
exact Shapley enumeration at 14 and 16 players (12 players: tests/test_shapley.py;
coalition scoring: tests/test_dpo_arithmetic.py; projected-gradient logging:
tests/test_logra.py).

Marked ``benchmark`` (deselected by default); ``make bench-micro`` runs them with
``-p no:xdist``, saves each run under ``results/benchmarks/<hardware slug>/`` and
compares it with the previous run of the same hardware.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import SPEC, TRAIN

from bench.core import shapley
from bench.core.train import dpo_stage


@pytest.mark.benchmark
@pytest.mark.parametrize("steps", [1, 4])
def test_benchmark_dpo_fine_tune_step(benchmark, steps, tiny_task, tiny_base):
    """DPO on the tiny tier (full fine-tune, as ``train=dpo_tiny``) for exactly ``steps``
    optimizer steps: one epoch over ``steps`` batches of 8 pairs through ``dpo_stage``.

    A single optimizer step cannot be timed alone through the public TRL API, so
    ``steps=1`` is one step *plus* what every coalition fine-tune pays around it
    (cloning policy and reference, building the DPOTrainer, tokenizing the pairs,
    copying the trained weights out). The difference between ``steps=4`` and
    ``steps=1``, divided by 3, is the cost of one step on its own.
    """
    model, tok = tiny_base
    settings = dataclasses.replace(TRAIN, epochs=1)
    pairs = tiny_task.train[: steps * settings.batch_size]
    assert len(pairs) == steps * settings.batch_size

    def run():
        return dpo_stage(model, tok, SPEC, pairs, settings, seed=0)

    stage, stats = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert stats["steps"] == steps and stage["kind"] == "full"
    benchmark.extra_info.update(optimizer_steps=steps, pairs=len(pairs),
                                n_params=sum(p.numel() for p in model.parameters()))


@pytest.mark.benchmark
@pytest.mark.parametrize("n", [14, 16])
def test_benchmark_exact_shapley(benchmark, n):
    """Exact Shapley values of n players from a random 2^n utility table."""
    table = np.random.default_rng(n).normal(size=1 << n)
    phi = benchmark(shapley.exact_shapley, table)
    assert phi.shape == (n,)
    shapley.check_efficiency(phi, table, atol=1e-8)
    benchmark.extra_info.update(n_players=n, coalitions=1 << n)
