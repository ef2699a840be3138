"""Packed training (``bench.core.packed.dpo_train_packed``): K coalitions' LoRA adapters
trained in one pass end where each would have ended trained alone by ``dpo_train``.

Every test trains with ``max_grad_norm`` 0.05 (TRL's default 1.0 never bites on the
tiny tier: gradient norms are 0.02-0.15), so per-adapter clipping is exercised (a
clip over all adapters together would not match the solo runs), with a fractional
number of epochs (the last epoch cut short), warm-up and weight decay.

Tolerances: a packed batch is right-padded to its longest row, and attention over a
longer (masked) key length may round differently (torch's SDPA CPU kernel does; more
rows alone change no bit), so K > 1 matches to float rounding (adapter weights ~0.2
in size; atol 1e-5), not bit for bit. With K = 1 the shapes are the solo run's:
bit-identical on the CPU, checked to 1e-6.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
from conftest import SPEC, TRAIN, one_line, run_cli

import bench.core.train as T
from bench.core.packed import dpo_train_packed
from bench.core.train import FineTuneDiverged, dpo_train, prepare_examples

S = dataclasses.replace(TRAIN, lora_r=4, lora_alpha=8, lr=1e-2, epochs=1.5, batch_size=4, warmup_ratio=0.2,
                        weight_decay=0.1)
MAX_GRAD_NORM = 0.05
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def clipping():
    """TRL's config with a gradient clip that bites (both paths read ``train._dpo_config``)."""
    real = T._dpo_config

    def config(*args, **kwargs):
        c = real(*args, **kwargs)
        c.max_grad_norm = MAX_GRAD_NORM
        return c
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "_dpo_config", config)
        yield


@pytest.fixture(scope="module")
def pool(tiny_partition):
    return [p for o in tiny_partition.owners for p in o]


@pytest.fixture(scope="module")
def coalitions(pool):
    """Four coalitions of different sizes: 4, 3, 2 and 1 batches of up to 4 pairs per
    epoch, so 6, 5, 3 and 2 steps at 1.5 epochs; across owners, and overlapping."""
    return [pool[0:16], pool[14:24], pool[40:46], pool[3:5]]


@pytest.fixture(scope="module")
def ready(tiny_base, pool):
    model, tok = tiny_base
    return prepare_examples(model, tok, SPEC, pool, S)


@pytest.fixture(scope="module")
def solo(tiny_base, coalitions, ready):
    """Each coalition trained alone by ``dpo_train``."""
    model, tok = tiny_base
    return [dpo_train(model, tok, SPEC, c, S, 0, examples=ready) for c in coalitions]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_run(got, want, atol: float = ATOL) -> None:
    (stage, stats, model), (stage0, stats0, model0) = got, want
    assert stage.keys() >= {"kind", "config", "state"} and stage["kind"] == "lora"
    assert stage["config"] == stage0["config"]
    assert max_diff(stage["state"], stage0["state"]) <= atol
    assert stats["steps"] == stats0["steps"]
    for key in ("first_loss", "final_loss"):
        assert math.isclose(stats[key], stats0[key], rel_tol=1e-5, abs_tol=1e-6)
    # the merged model scores like the solo run's
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert max_diff(model.state_dict(), model0.state_dict()) <= atol


def test_one_coalition_reproduces_dpo_train(tiny_base, coalitions, ready, solo):
    model, tok = tiny_base
    (got,) = dpo_train_packed(model, tok, SPEC, [coalitions[0]], S, 0, ready)
    assert_same_run(got, solo[0], atol=1e-6)
    assert got[1]["steps"] == 6


def test_four_coalitions_at_once_match_their_solo_runs(tiny_base, coalitions, ready, solo):
    model, tok = tiny_base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = dpo_train_packed(model, tok, SPEC, coalitions, S, 0, ready)
    assert [g[1]["steps"] for g in got] == [6, 5, 3, 2]     # the finished ones dropped out of later batches
    for g, w in zip(got, solo):
        assert_same_run(g, w)
    # the start model is untouched: same weights, no patched forward, nothing trainable added
    assert max_diff(model.state_dict(), before) == 0
    assert "forward" not in vars(model) and not any("lora" in n for n, _ in model.named_parameters())


def test_the_only_difference_is_the_padding(tiny_base, coalitions, ready, monkeypatch):
    """With every batch padded to one length (TRL's ``pad_to_multiple_of`` = max_length),
    packing adds no padding: K = 4 is then bit-identical to the solo runs on the CPU
    (BLAS gives each row the same bits whatever the number of rows). The solo runs with
    TRL's two rows per pair, as the packed step runs them (``train.SHARED_PROMPT``)."""
    model, tok = tiny_base
    clipped = T._dpo_config
    monkeypatch.setattr(T, "SHARED_PROMPT", False)

    def config(*args, **kwargs):
        c = clipped(*args, **kwargs)
        c.pad_to_multiple_of = S.max_length
        return c
    monkeypatch.setattr(T, "_dpo_config", config)
    want = [dpo_train(model, tok, SPEC, c, S, 0, examples=ready) for c in coalitions]
    got = dpo_train_packed(model, tok, SPEC, coalitions, S, 0, ready)
    for (stage, stats, _), (stage0, stats0, _) in zip(got, want):
        assert max_diff(stage["state"], stage0["state"]) == 0
        assert stats == stats0


def test_a_diverging_coalition_is_dropped_and_the_others_train_on(tiny_base, coalitions, ready, solo, monkeypatch):
    model, tok = tiny_base
    # one pair of coalition 1 gets a NaN reference log-prob: its loss goes NaN at the step that draws it
    row = ready.row_of[T._content(coalitions[1][4])]
    poisoned = copy.copy(ready)
    poisoned.dataset = ready.dataset.map(
        lambda ex, i: {"ref_chosen_logps": float("nan") if i == row else ex["ref_chosen_logps"]}, with_indices=True)
    with pytest.raises(FineTuneDiverged):
        dpo_train(model, tok, SPEC, coalitions[1], S, 0, examples=poisoned)      # alone, it diverges too
    calls = []
    cls = T._trainer_class()
    real = cls.compute_loss

    def spy(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls.append((id(self), math.isfinite(float(loss))))
        return loss
    monkeypatch.setattr(cls, "compute_loss", spy)
    got = dpo_train_packed(model, tok, SPEC, coalitions[:3], S, 0, poisoned)
    assert isinstance(got[1], FineTuneDiverged) and "non-finite loss" in str(got[1])
    assert_same_run(got[0], solo[0])
    assert_same_run(got[2], solo[2])
    # the diverged coalition's trainer computed no loss after its first non-finite one
    bad = next(t for t, finite in calls if not finite)
    mine = [finite for t, finite in calls if t == bad]
    assert mine[-1] is False and mine.count(False) == 1 and len(mine) <= 3     # first epoch: 3 batches


def test_activation_checkpointing_routes_the_recomputed_forward(tiny_base, coalitions, ready):
    """Under checkpointing the backward recomputes each layer's forward: it must see
    the same adapters per row (else the gradients would be the base model's)."""
    model, tok = tiny_base
    s = dataclasses.replace(S, gradient_checkpointing=True)
    want = [dpo_train(model, tok, SPEC, c, s, 0, examples=ready) for c in coalitions[1:3]]
    got = dpo_train_packed(model, tok, SPEC, coalitions[1:3], s, 0, ready)
    for g, w in zip(got, want):
        assert_same_run(g, w)


def test_full_fine_tune_is_refused(tiny_base, coalitions, ready):
    model, tok = tiny_base
    with pytest.raises(ValueError, match="train.lora_r") as e:
        dpo_train_packed(model, tok, SPEC, coalitions, dataclasses.replace(S, lora_r=None), 0, ready)
    assert one_line(str(e.value))


def test_no_coalition_is_refused(tiny_base, ready):
    model, tok = tiny_base
    with pytest.raises(ValueError, match="coalitions"):
        dpo_train_packed(model, tok, SPEC, [], S, 0, ready)


def test_pack_bench_draws_distinct_coalitions_then_repeats():
    from bench.cli.pack_bench import draw_coalitions
    first = draw_coalitions(3, 7, seed=0)
    assert sorted(first) == list(range(1, 8))                      # every non-empty coalition of 3 owners once
    more = draw_coalitions(3, 10, seed=0)
    assert more[:7] == first and all(1 <= m < 8 for m in more)
    assert draw_coalitions(3, 5, seed=1) != draw_coalitions(3, 5, seed=0)


def test_pack_bench_refuses_bad_counts():
    for flag in ("--k", "--coalitions"):
        code, _, err = run_cli(["pack-bench", "experiment=smoke", flag, "0"])
        assert code == 2 and flag in err and one_line(err)


def test_bf16_autocast_packs_like_its_solo_run_and_really_runs_in_bf16(tiny_base, coalitions, ready, solo,
                                                                     monkeypatch):
    """``train.precision=bf16``: the packed forward runs under the trainers' autocast,
    as TRL's prepared model does, so K = 1 reproduces ``dpo_train`` under bf16 (with
    TRL's two rows per pair, as the packed step runs them); and bf16 is not fp32 under
    another name (the adapters differ beyond float rounding)."""
    model, tok = tiny_base
    monkeypatch.setattr(T, "SHARED_PROMPT", False)
    sb = dataclasses.replace(S, precision="bf16")
    want = dpo_train(model, tok, SPEC, coalitions[0], sb, 0, examples=ready)
    (got,) = dpo_train_packed(model, tok, SPEC, [coalitions[0]], sb, 0, ready)
    assert_same_run(got, want, atol=1e-6)
    assert max_diff(want[0]["state"], solo[0][0]["state"]) > 1e-4
