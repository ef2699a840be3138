"""Scoring a utility: both responses of a pair in one forward pass (``sequence_logps`` via
``shared_prompt_batch``) equal the two rows prompt + chosen, prompt + rejected scored apart,
to float rounding, on the tiny GPT-2 (learned positions) and on a Llama (rotary positions,
SmolLM2's architecture)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPEC

from bench.core.train import response_logps, sequence_logps, shared_prompt_batch, tokenize_pair


def _two_rows(model, items) -> np.ndarray:
    """[2n]: chosen, rejected of each pair, as two right-padded rows each (the way scoring
    worked before one pass did both), fp32 logits summed in fp64."""
    out = []
    for p, c, r in items:
        for comp in (c, r):
            seq = torch.tensor([p + comp])
            targets = torch.zeros_like(seq, dtype=torch.bool)
            targets[0, len(p):] = True
            out.append(float(response_logps(model, seq, torch.ones_like(seq), targets, torch.float32,
                                            torch.float64)[0]))
    return np.array(out)


def _shared(model, items, pad=0) -> np.ndarray:
    b = shared_prompt_batch(items, pad)
    inner = getattr(model, model.base_model_prefix)
    hidden = inner(input_ids=b["ids"], attention_mask=b["mask"], position_ids=b["positions"]).last_hidden_state
    lp = torch.log_softmax(model.get_output_embeddings()(hidden[b["rows"], b["src"]]).float(), -1)
    lp = lp.gather(-1, b["ids"][b["rows"], b["tgt"]][:, None])[:, 0]
    return torch.zeros(2 * len(items), dtype=torch.float64).index_add(0, b["slot"], lp.double()).numpy()


@pytest.mark.parametrize("cut", ["none", "responses", "prompts"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_one_pass_per_pair_equals_two_rows(tiny_base, tiny_task, cut, batch_size):
    """TRL's cut (``max_length``) as well: none, inside the responses, inside the prompts."""
    model, tok = tiny_base
    pairs = tiny_task.eval[:12]
    full = [tokenize_pair(tok, SPEC, p) for p in pairs]
    shortest = min(len(a) for a, _, _ in full)
    max_length = {"none": None, "responses": max(len(a) for a, _, _ in full) + 2, "prompts": shortest - 1}[cut]
    items = [(a, c, r) if max_length is None else
             (a[:max_length], c[:max(0, max_length - len(a))], r[:max(0, max_length - len(a))]) for a, c, r in full]
    lc, lr = sequence_logps(model, tok, SPEC, pairs, batch_size, max_length)
    want = _two_rows(model, items)
    np.testing.assert_allclose(np.stack([lc, lr], 1).ravel(), want, rtol=1e-5, atol=1e-5)
    if cut == "prompts":                                   # nothing of a response left to score
        assert (lc == 0).all() and (lr == 0).all()
    else:
        assert (lc < 0).all() and (lr < 0).all()


def test_a_llama_with_rotary_positions_and_responses_of_unequal_lengths():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    draw = lambda n: rng.integers(1, 50, n).tolist()     # noqa: E731
    items = [(draw(7), draw(3), draw(5)), (draw(2), draw(6), draw(1)), (draw(11), draw(4), draw(4)),
             (draw(1), draw(1), draw(9))]
    with torch.no_grad():
        got, want = _shared(model, items), _two_rows(model, items)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the mask is what makes it right: without it, the rejected response reads the chosen one
    b = shared_prompt_batch(items[:1], 0)
    assert not b["mask"][0, 0, 7 + 3, 7:10].any() and b["mask"][0, 0, 7 + 3, :7].all()
    assert b["positions"][0].tolist() == [*range(10), *range(7, 12)]
