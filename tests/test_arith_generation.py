"""DPO arithmetic, generation mode: the per-token combination (|S| = 1 is the
owner's own softmax, ∅ the base's), greedy decoding against ``model.generate``,
determinism, top-p, prompt selection, and the valuer end to end on a tiny game
(efficiency on both reward axes). The slow test runs it through the CLI."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import SPEC, TRAIN, run_cli, read_records

from bench.core import shapley
from bench.core.errors import ConfigError
from bench.core.game import Game
from valuers.arith_generation.valuer import (NEG, DPOArithmeticGeneration, _left_pad, combine, decode,
                                      coalition_generator, generate_coalition, sampling_logprobs,
                                      select_prompts)
from valuers.base import Budget

FAST = dict(n_prompts=4, max_new_tokens=6)
# The session's tiny base only ever emits spaces; a slightly stronger one (~3 s to
# build) makes greedy decoding produce varied text and EOS, so the comparisons bite.
GEN_SPEC = dataclasses.replace(SPEC, n_embd=64, warmup_epochs=4)


@pytest.fixture(scope="module")
def game(tmp_path_factory, tiny_task, tiny_partition):
    """A tiny 3-owner union game with its single-owner stages trained (once per module)."""
    root = tmp_path_factory.mktemp("gen-cache")
    g = Game(tiny_task, tiny_partition, GEN_SPEC, TRAIN, kind="union", cache_dir=root, progress=False)
    g.prefetch([1 << i for i in range(g.n)])
    return g


@pytest.fixture(scope="module")
def setup(game):
    """(base, owner models, tokenizer, prompt ids of 4 eval prompts, their pairs)."""
    v = DPOArithmeticGeneration(**FAST)
    base, tok = game.base()
    pairs = select_prompts(game.eval, 4, seed=0)
    return base, v.owner_models(game), tok, v.prompt_ids(game, pairs), pairs


def _prefill_logits(model, prompts, pad):
    ids, mask, pos = _left_pad(prompts, pad)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :].float()


# ------------------------------------------------------------------ the arithmetic

def test_single_owner_and_empty_coalition_are_the_models_own_softmax(setup):
    base, owners, tok, prompts, _ = setup
    f0 = _prefill_logits(base, prompts, tok.pad_token_id)
    assert torch.allclose(combine([], f0), torch.log_softmax(f0, -1), atol=1e-6, rtol=0)
    for m in owners:
        fi = _prefill_logits(m, prompts, tok.pad_token_id)
        assert torch.allclose(combine([fi], f0), torch.log_softmax(fi, -1), atol=1e-6, rtol=0)
        assert torch.allclose(combine([fi], None), torch.log_softmax(fi, -1), atol=1e-6, rtol=0)
    # two owners: the log-space sum minus the base, explicitly
    f1, f2 = (_prefill_logits(m, prompts, tok.pad_token_id) for m in owners[:2])
    want = torch.log_softmax(f1, -1) + torch.log_softmax(f2, -1) - torch.log_softmax(f0, -1)
    assert torch.allclose(combine([f1, f2], f0), want, atol=1e-5, rtol=0)


def test_combination_is_fp32_and_finite_with_minus_inf_logits():
    g = torch.Generator().manual_seed(0)
    f = [torch.randn(3, 11, generator=g, dtype=torch.float64) for _ in range(4)]
    f[1][0, 2] = float("-inf")                    # an owner rules out a token
    f[0][1, 5] = float("-inf")                    # the base rules one out
    f[2][2, :] = float("nan")
    z = combine(f[1:], f[0])
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert z[0, 2] < NEG / 2                      # still (practically) impossible
    lq = sampling_logprobs(z, 1.0, 1.0)
    assert torch.allclose(lq.exp().sum(-1), torch.ones(3))


def test_temperature_and_top_p_apply_after_combining():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])) + 7.0     # unnormalised z
    assert torch.allclose(sampling_logprobs(z, 1.0, 1.0).exp(), torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)
    p = sampling_logprobs(z, 1.0, 0.7).exp()      # nucleus {0.5, 0.3}, renormalised
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]), atol=1e-6)
    p = sampling_logprobs(z, 1.0, 0.4).exp()      # the top token alone
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0]]))
    hot = sampling_logprobs(z, 2.0, 1.0).exp()
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(hot, (want / want.sum())[None], atol=1e-6)


# ------------------------------------------------------------------ decoding

def _hf_greedy(model, tok, prompts, T):
    ids, mask, _ = _left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=T,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        cut = r.index(tok.eos_token_id) + 1 if tok.eos_token_id in r else len(r)
        rows.append(r[:cut])
    return rows


def test_greedy_single_owner_equals_generate(setup):
    base, owners, tok, prompts, _ = setup
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6, temperature=0)
    assert len({len(p) for p in prompts}) > 1                  # left padding is exercised
    seen = set()
    for i, m in enumerate(owners):
        got = generate_coalition([m], base, prompts, **kw)["tokens"]
        assert got == _hf_greedy(m, tok, prompts, 6), f"owner {i}"
        seen |= {tuple(r) for r in got}
    got = generate_coalition([], base, prompts, **kw)["tokens"]
    assert got == _hf_greedy(base, tok, prompts, 6)
    seen |= {tuple(r) for r in got}
    assert len(seen) > 2 and len({t for r in seen for t in r}) > 2    # not a constant stream


def test_sampler_is_deterministic_for_a_seed(setup):
    base, owners, tok, prompts, _ = setup
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6)
    run = lambda seed, mask: generate_coalition(owners[:2] if mask else [], base, prompts * 3, **kw,
                                                generator=coalition_generator(seed, mask))
    a, b, c = run(0, 3), run(0, 3), run(1, 3)
    assert a["tokens"] == b["tokens"] and np.array_equal(a["logw"], b["logw"])
    assert a["tokens"] != c["tokens"]
    # |S| <= 1 at temperature 1: the per-token policy is the sequence policy (log w = 0)
    assert np.allclose(run(0, 0)["logw"], 0, atol=1e-4)
    one = generate_coalition(owners[:1], base, prompts, **kw, generator=coalition_generator(0, 1))
    assert np.allclose(one["logw"], 0, atol=1e-4)
    assert np.abs(a["logw"]).max() > 1e-3         # a real coalition is not normalised per token


def test_shared_prefill_changes_nothing(setup):
    """Each model's prompt prefill is computed once and its KV cache copied per coalition."""
    base, owners, tok, prompts, _ = setup
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6)
    store, fwd = {}, []
    for mask in range(8):
        S = [owners[i] for i in shapley.members(mask, 3)]
        a = generate_coalition(S, base, prompts, **kw, generator=coalition_generator(0, mask))
        b = generate_coalition(S, base, prompts, **kw, generator=coalition_generator(0, mask), prefill=store)
        assert a["tokens"] == b["tokens"] and np.array_equal(a["logw"], b["logw"]), mask
        fwd.append(a["forwards"] - b["forwards"])
    assert len(store) == 4 and sum(fwd) == len(prompts) * (1 + 3 + 3 * 3 + 4 - 4)   # prefills saved


def test_decode_concatenates_character_tokens(setup):
    _, _, tok, _, _ = setup
    ids = tok(" Canberra")["input_ids"] + [tok.eos_token_id]
    assert decode(tok, ids) == " Canberra"


def test_prompts_are_stratified_and_deterministic(tiny_task):
    sel = select_prompts(tiny_task.eval, 7, seed=0)
    assert sel == select_prompts(tiny_task.eval, 7, seed=0)
    assert sel != select_prompts(tiny_task.eval, 7, seed=1)
    counts = {s: sum(p.source == s for p in sel) for s in tiny_task.sources}
    assert sorted(counts.values()) == [2, 2, 3] and len({p.id for p in sel}) == 7
    assert len(select_prompts(tiny_task.eval, 10 ** 6)) == len(tiny_task.eval)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="reward_axis"):
        DPOArithmeticGeneration(reward_axis="honest")
    with pytest.raises(ConfigError, match="top_p"):
        DPOArithmeticGeneration(top_p=0)
    with pytest.raises(ConfigError, match=r"^valuer\.dpo_arithmetic_gen\.reweight: true needs n_samples"):
        DPOArithmeticGeneration(reweight=True)
    with pytest.raises(ConfigError, match=r"^valuer\.dpo_arithmetic_gen\.n_prompts: '3' is not an integer"):
        DPOArithmeticGeneration(n_prompts="3")


def test_config_builds_the_valuer():
    from bench.harness.build import build_valuer
    v, cfg = build_valuer("dpo_arithmetic_gen", {"n_prompts": 3})
    assert isinstance(v, DPOArithmeticGeneration) and v.n_prompts == 3 and cfg["reward_axis"] == "sum"


# ------------------------------------------------------------------ the valuer

def test_valuer_efficiency_signature_and_cost(game):
    v = DPOArithmeticGeneration(**FAST, n_samples=2, reward_axis="helpful")
    val = v.value(game, Budget())
    ex = val.extras
    n = game.n
    for axis in ("helpful", "harmless", "sum"):
        t = np.array(ex["tables"][axis])
        assert t.shape == (2 ** n,) and np.all((t >= 0) & (t <= 2))
        phi = shapley.exact_shapley(t)
        assert phi.sum() == pytest.approx(t[-1] - t[0], abs=1e-9)
    assert np.allclose(val.owner_values, shapley.exact_shapley(np.array(ex["tables"]["helpful"])))
    sig = ex["signature"]
    assert set(sig) == {"helpful", "harmless"} and all(len(s) == n for s in sig.values())
    assert np.allclose(np.add(sig["helpful"], sig["harmless"]), shapley.exact_shapley(np.array(ex["tables"]["sum"])))
    g = ex["generation"]
    assert g["n_prompts"] == 4 and g["n_coalitions"] == 2 ** n
    assert 0 < g["tokens"] <= 2 ** n * 4 * 2 * 6 and g["seconds"] > 0
    assert len(ex["importance"]["per_coalition"]) == 2 ** n
    assert "table" not in ex            # reward utilities are not the game's metric
    c = val.cost
    assert c.fine_tunes == n and c.phases["generation"] > 0 and c.device_s >= c.phases["generation"]
    # a rerun with the same seed gives the same generations, hence the same tables
    again = v.value(game, Budget()).extras
    assert again["tables"] == ex["tables"]


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_cli_smoke_with_generation_valuer(tmp_path):
    args = ["experiment=smoke", "valuer=[retrain_shapley,dpo_arithmetic_gen]", "logger=none",
            f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra", "n_jobs=1", "progress=false"]
    code, _, err = run_cli(args)
    assert code == 0, err[-3000:]
    recs = read_records(tmp_path)
    rec = next(r for r in recs if r["valuer"] == "dpo_arithmetic_gen")
    assert rec["status"] == "ok", rec.get("error")
    sig = rec["extras"]["signature"]
    assert set(sig) == {"helpful", "harmless"} and all(len(s) == rec["n_owners"] for s in sig.values())
    t = np.array(rec["extras"]["tables"]["sum"])
    assert np.sum(rec["owner_values"]) == pytest.approx(t[-1] - t[0], abs=1e-9)
    assert rec["cost"]["fine_tunes"] == rec["n_owners"] and rec["extras"]["generation"]["tokens"] > 0
