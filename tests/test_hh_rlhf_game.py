"""The real-data path end to end on the tiny tier: task=hh_rlhf, a character tokenizer
and LM warm-up built from the HH text, a 3-owner game under two seeds, offline, in
seconds; dialogues become chat turns on a model with a chat template; eval pairs longer
than train.max_length are cut as TRL cuts training pairs."""
from __future__ import annotations


import numpy as np
import pytest
from conftest import run_cli, read_records

from bench.core.hh_rlhf import dialogue_messages, hh_rlhf, render_messages

HH_TINY = ["task=hh_rlhf", "model=tiny", "train=dpo_tiny", "partition=iid", "partition.n_owners=3",
           "task.n_train=18", "task.n_eval=8", "task.n_warmup=24", "task.max_prompt_tokens=20",
           "train.epochs=1", "model.warmup_epochs=1", "model.n_embd=64", "seeds=[0,1]", "valuer=[loo]", "logger=none",
           "progress=false", "n_jobs=1", "lds.n_subsets=0", "experiment_name=hh_tiny"]


def test_a_tiny_hh_game_runs_offline_and_finds_nothing_it_should_not(tmp_path):
    code, out, err = run_cli([*HH_TINY, f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"])
    assert code == 0, err[-3000:]
    recs = read_records(tmp_path, "hh_tiny")
    assert {(r["valuer"], r["seed"]) for r in recs} == {(v, s) for v in ("random", "retrain_shapley", "loo")
                                                       for s in (0, 1)}
    exact = [r for r in recs if r["valuer"] == "retrain_shapley"]
    for r in exact:
        table = np.array(r["utility_table"])
        assert np.isfinite(table).all() and len(table) == 8
        assert abs(sum(r["exact_values"]) - (table[-1] - table[0])) < 1e-9
        assert r["task_dropped"]["prompt_too_long"] > 0 and r["owner_sizes"] == [6, 6, 6]


def test_dialogues_become_chat_turns():
    task = hh_rlhf(n_train=5, n_eval=2, max_prompt_tokens=256)
    multi = next(p for p in task.train + task.eval if "\n\nAssistant:" in p.prompt)
    msgs = dialogue_messages(multi.prompt)
    assert [m["role"] for m in msgs][:2] == ["user", "assistant"] and render_messages(msgs) == multi.prompt
    assert dialogue_messages("What is 2 + 2?") == [{"role": "user", "content": "What is 2 + 2?"}]


def test_eval_scoring_cuts_pairs_at_max_length_like_training():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.core.models import ModelSpec, build_char_tokenizer
    from bench.core.task import Pair
    from bench.core.train import sequence_logps
    pairs = [Pair(0, "s", "a" * 30, "b" * 40, "c" * 10), Pair(1, "s", "ab", "ba", "bb")]
    tok = build_char_tokenizer(["abc"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=1, n_head=2))
    spec = ModelSpec()
    full_c, full_r = sequence_logps(model, tok, spec, pairs)
    cut_c, cut_r = sequence_logps(model, tok, spec, pairs, max_length=50)
    # (to float rounding: a pair's one row holds both responses, so a cut moves the columns of the other)
    same = lambda a, b: a == pytest.approx(b, rel=1e-6)     # noqa: E731
    assert same(cut_c[1], full_c[1]) and same(cut_r[1], full_r[1]), "pairs that fit are untouched"
    assert same(cut_r[0], full_r[0]) and cut_c[0] > full_c[0] + 1, "a cut response sums fewer (negative) log-probs"
    with pytest.raises(Exception):
        sequence_logps(model, tok, spec, [Pair(2, "s", "a" * 100, "b" * 100, "c")])   # past n_positions, uncut
