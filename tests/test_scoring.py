"""Scoring a utility: both responses of a pair in one forward pass (``sequence_logps`` via
``shared_prompt_batch``) equal the two rows prompt + chosen, prompt + rejected scored apart,
to float rounding, on the tiny GPT-2 (learned positions) and on a Llama (rotary positions,
SmolLM2's architecture). Training alike: TRL's DPO loss on the shared-prompt forward
(``SharedPromptPolicy``) has TRL's own loss and gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPEC

from bench.core.train import (SharedPromptPolicy, TrainSettings, coalition_trainer, prepare_examples, response_logps,
                              sequence_logps, shared_prompt_batch, tokenize_pair)


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


def _loss_and_grads(trainer, inputs, shared: bool):
    """TRL's DPO loss of one batch and the gradient of every trained weight, with the
    policy's forward as TRL runs it (two rows per pair) or with the prompt shared."""
    from trl import DPOTrainer
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    compute = type(trainer)._compute_loss if shared else DPOTrainer._compute_loss
    loss = compute(trainer, model, inputs, False)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads, dict(trainer._metrics["train"])


def _llama_base(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch,lora_r,max_length", [("gpt2", None, 128), ("gpt2", 4, 128), ("llama", 4, 128),
                                                    ("gpt2", 4, 0)])
def test_shared_prompt_training_has_trls_loss_and_gradients(tiny_base, tiny_task, tmp_path, arch, lora_r, max_length):
    """One batch of 8 pairs through TRL's loss: the same loss, the same gradient of every
    weight TRL trains (LoRA or the full model), the same logged metrics; also with TRL's
    ``max_length`` cut inside the responses (``max_length=0``: the longest prompt + 1)."""
    base, tok = tiny_base
    if arch == "llama":
        base = _llama_base(tok)
    pairs = tiny_task.train[:8]
    if not max_length:
        max_length = max(len(tokenize_pair(tok, SPEC, p)[0]) for p in pairs) + 1
    s = TrainSettings(epochs=1, batch_size=8, lora_r=lora_r, lora_alpha=8, max_length=max_length)
    examples = prepare_examples(base, tok, SPEC, pairs, s)
    trainer = coalition_trainer(base, tok, SPEC, pairs, s, 0, str(tmp_path), examples)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    split = SharedPromptPolicy(trainer.model, inputs["completion_mask"])._split(inputs["input_ids"],
                                                                                 inputs["attention_mask"])
    assert split is not None and len(split[0]) == 8      # the shared path ran, one row per pair
    if max_length < 128:
        assert min(min(len(c), len(r)) for _, c, r in split[0]) <= 1    # the cut reached the responses
    torch.manual_seed(1)
    with torch.no_grad():         # away from the start (policy = reference: every reward exactly 0, a tie)
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    loss, grads, metrics = _loss_and_grads(trainer, inputs, shared=False)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0                      # a running count TRL logs
    loss2, grads2, metrics2 = _loss_and_grads(trainer, inputs, shared=True)
    assert loss2 == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == grads2.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics.keys() == metrics2.keys()
    for k in metrics:
        np.testing.assert_allclose(metrics2[k], metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_rows_that_do_not_pair_up_run_as_trl_runs_them():
    """A batch whose chosen and rejected rows have different prompts is not reshaped."""
    ids = torch.tensor([[5, 6, 7, 0], [5, 9, 7, 8]])
    att = torch.ones_like(ids)
    comp = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]])
    assert SharedPromptPolicy(None, comp)._split(ids, att) is None
    comp = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    items, (rows, cols) = SharedPromptPolicy(None, comp)._split(ids, att)
    assert items == [([5], [6, 7], [9, 7, 8])]
    assert rows.tolist() == [0, 0, 1, 1, 1] and cols.tolist() == [0, 1, 0, 1, 2]
