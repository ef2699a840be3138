"""DPO arithmetic valuer: the vectorised coalition scoring, its weights, the
compatibility guard, and (on a real tiny game) the identity at single owners."""
import numpy as np
import pytest

from bench.core import shapley
from bench.core.errors import ConfigError
from bench.core.train import utility_metrics
from valuers.dpo_arithmetic import (DPOArithmetic, check_compatible, coalition_utilities,
                                    coalition_weights)


def _random_margins(n=4, P=50, seed=0):
    rng = np.random.default_rng(seed)
    base_c, base_r = rng.normal(-20, 3, P), rng.normal(-20, 3, P)
    owner_c = base_c + rng.normal(0, 1, (n, P))
    owner_r = base_r + rng.normal(0, 1, (n, P))
    return base_c, base_r, owner_c, owner_r


def test_vectorised_scoring_equals_per_coalition_loop():
    base_c, base_r, oc, orj = _random_margins()
    n, beta = oc.shape[0], 0.1
    margins = (oc - base_c) - (orj - base_r)
    tables = coalition_utilities(base_c - base_r, margins, coalition_weights(n, "identity"), beta)
    for mask in range(2 ** n):
        S = shapley.members(mask, n)
        # the coalition model by log-space arithmetic, sequence level:
        # log π_S = Σ_i log π_i − (|S| − 1) log π_0 (log Z cancels within a pair)
        lc = sum(oc[i] for i in S) - (len(S) - 1) * base_c
        lr = sum(orj[i] for i in S) - (len(S) - 1) * base_r
        want = utility_metrics(lc, lr, base_c, base_r, beta)
        for k, v in want.items():
            assert tables[k][mask] == pytest.approx(v, abs=1e-9), (k, mask)


def test_empty_coalition_is_the_base_and_singletons_are_the_owner_models():
    base_c, base_r, oc, orj = _random_margins(n=3)
    margins = (oc - base_c) - (orj - base_r)
    for kind in ("identity", "size"):
        t = coalition_utilities(base_c - base_r, margins, coalition_weights(3, kind, [5, 10, 20]), 0.1)
        assert t["pref_acc"][0] == utility_metrics(base_c, base_r, base_c, base_r, 0.1)["pref_acc"]
        for i in range(3):
            assert t["pref_acc"][1 << i] == utility_metrics(oc[i], orj[i], base_c, base_r, 0.1)["pref_acc"]


def test_size_weights_are_data_shares():
    w = coalition_weights(3, "size", [10, 30, 60])
    assert np.allclose(w[0], 0)
    assert np.allclose(w[1:].sum(1), 1)
    assert np.allclose(w[0b011], [0.25, 0.75, 0])
    assert np.allclose(coalition_weights(3, "identity"), shapley.coalition_masks(3))


def test_bad_weights_name_is_refused():
    with pytest.raises(ConfigError, match=r"^valuer\.dpo_arithmetic\.weights: unknown 'uniform'"):
        DPOArithmetic(weights="uniform")
    with pytest.raises(ConfigError, match=r"^valuer\.dpo_arithmetic_size\.metric: unknown 'acc'"):
        DPOArithmetic(name="dpo_arithmetic_size", metric="acc")
    with pytest.raises(ConfigError, match=r"^valuer\.dpo_arithmetic\.weight: unknown setting"):
        DPOArithmetic(weight="size")


def test_adapters_from_another_training_are_refused():
    good = {"beta": 0.1, "model": "abc", "tokenizer": "t1", "base_task": None}
    check_compatible(dict(good), good, 0)
    for field, bad in [("beta", 0.5), ("model", "other"), ("tokenizer", "t2")]:
        with pytest.raises(ConfigError, match=field):
            check_compatible({**good, field: bad}, good, 2)
    with pytest.raises(ConfigError, match="metadata"):
        check_compatible(None, good, 1)


@pytest.mark.benchmark
def test_benchmark_all_coalitions_n12_1000_pairs(benchmark):
    """Target (issue 3): all 2^12 coalitions over 1,000 eval pairs in < 1 s."""
    rng = np.random.default_rng(0)
    n, P = 12, 1000
    margins, gap = rng.normal(0, 1, (n, P)), rng.normal(0, 3, P)
    w = coalition_weights(n, "identity")

    def score():
        t = coalition_utilities(gap, margins, w, 0.1)["pref_acc"]
        return shapley.exact_shapley(t)

    phi = benchmark(score)
    assert phi.shape == (n,)


def test_single_owner_margin_equals_the_directly_trained_model(tiny_task, tiny_base, monkeypatch):
    """The owner model the arithmetic uses (LoRA weights extracted, saved, re-applied to
    the base and merged) gives the same eval margins as the model TRL just trained."""
    import trl
    from bench.core.train import TrainSettings, dpo_stage, materialize, sequence_logps
    from conftest import SPEC

    captured = {}
    original = trl.DPOTrainer.train

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        captured["model"] = self.model          # the trained peft model, adapter not merged
        return out

    monkeypatch.setattr(trl.DPOTrainer, "train", spy)
    model, tok = tiny_base
    s = TrainSettings(epochs=2, batch_size=8, lr=5e-3, lora_r=4, lora_alpha=8)
    stage, _ = dpo_stage(model, tok, SPEC, tiny_task.train[:24], s, seed=0)
    direct_c, direct_r = sequence_logps(captured["model"], tok, SPEC, tiny_task.eval)
    rebuilt_c, rebuilt_r = sequence_logps(materialize(model, [stage]), tok, SPEC, tiny_task.eval)
    base_c, base_r = sequence_logps(model, tok, SPEC, tiny_task.eval)
    direct = (direct_c - base_c) - (direct_r - base_r)
    rebuilt = (rebuilt_c - base_c) - (rebuilt_r - base_r)
    assert np.abs(direct).max() > 1e-3                 # training moved the margins
    np.testing.assert_allclose(rebuilt, direct, atol=1e-4, rtol=1e-5)
