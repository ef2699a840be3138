"""task=hh_rlhf (bench/core/hh_rlhf.py) and partition kind by_topic: the HH dialogue
split on hand-written dialogues, the drop counts, deterministic disjoint splits, the
embedded file's sha256 check, the hub path (a fake ``datasets``), topic owners on fake
embeddings, and the bad inputs. No model, no tokenizer, no MiniLM, no network."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
import sys
import types
from collections import Counter

import numpy as np
import pytest
from conftest import one_line

from bench.core import hh_rlhf as H
from bench.core import partition as P
from bench.core.errors import ConfigError
from bench.core.hh_rlhf import HHSettings, hh_rlhf, parse_row, parse_rows, prompt_messages, split_turns
from bench.core.partition import make_partition


def dialogue(*turns: str) -> str:
    """``dialogue("hi", "hello", "more?", "yes")`` = HH text, Human first, turns alternating."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def row(prefix: tuple, chosen: str, rejected: str) -> dict:
    return {"chosen": dialogue(*prefix, chosen), "rejected": dialogue(*prefix, rejected)}


def write(tmp_path, rows, name="hh.jsonl", gz=False) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    p = tmp_path / (name + (".gz" if gz else ""))
    p.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return str(p)


def content(split):
    return {(p.prompt, p.chosen, p.rejected) for p in split}


@pytest.fixture(scope="module")
def embedded():
    return hh_rlhf()


# ------------------------------------------------------------------ the dialogue split

def test_single_turn():
    ex, why = parse_row(dialogue("How do I bake bread?", "Mix flour and water."),
                        dialogue("How do I bake bread?", "No idea."))
    assert why is None
    assert list(ex.messages) == [{"role": "user", "content": "How do I bake bread?"}]
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Human: How do I bake bread?", "Mix flour and water.", "No idea.")


def test_multi_turn_prompt_is_the_shared_dialogue_up_to_the_last_assistant_turn():
    pre = ("Hi there", "Hello! How can I help?", "Tell me a joke", "Why did the chicken...", "Another one")
    ex, why = parse_row(dialogue(*pre, "Sure: knock knock."), dialogue(*pre, "No more jokes."))
    assert why is None
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in ex.messages] == list(pre)
    assert ex.prompt == ("Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\n"
                         "Assistant: Why did the chicken...\n\nHuman: Another one")
    assert (ex.chosen, ex.rejected) == ("Sure: knock knock.", "No more jokes.")
    assert prompt_messages(ex.prompt) == list(ex.messages)        # the rendered prompt parses back


def test_the_word_human_inside_a_turn_is_text():
    """``Human:`` not after a blank line (as in HH's own rows) splits nothing."""
    chosen = "The label Human: is a speaker tag.  Human: you asked, so here it is.\nAssistant: also text"
    pre = ("What does 'Human:' mean in a transcript? Human: a tag.",)
    ex, why = parse_row(dialogue(*pre, chosen), dialogue(*pre, "Nothing."))
    assert why is None
    assert ex.chosen == chosen
    assert ex.messages[0]["content"] == pre[0]
    assert prompt_messages(ex.prompt) == list(ex.messages)


def test_trailing_and_leading_whitespace():
    """Turn contents and the final replies are stripped; a prompt that differs only in
    whitespace is the same prompt; a dialogue may start without the blank line."""
    chosen = "\n\nHuman:   Hello there  \n\nAssistant:   Hi!  \n\n"
    rejected = "Human: Hello there\n\nAssistant: Go away.\n"
    ex, why = parse_row(chosen, rejected)
    assert why is None
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Human: Hello there", "Hi!", "Go away.")


def test_split_turns_refuses_what_is_not_a_dialogue():
    assert split_turns("just a reply") is None
    assert split_turns("preamble\n\nHuman: hi\n\nAssistant: yo") is None
    assert split_turns(5) is None
    assert split_turns("\n\nHuman: hi\n\nAssistant: yo") == [("user", " hi"), ("assistant", " yo")]


# ------------------------------------------------------------------ drop counts

def test_drop_counts_per_reason():
    good = [row(("q%d" % i,), "yes %d" % i, "no %d" % i) for i in range(3)]
    rows = good + [
        {"chosen": "plain text", "rejected": "other text"},                                   # malformed
        {"chosen": dialogue("q", "a", "ends on a human turn"), "rejected": dialogue("q", "b")},  # malformed
        {"chosen": dialogue("q"), "rejected": dialogue("q")},                                 # malformed: no reply
        {"chosen": dialogue("q", "a"), "rejected": dialogue("other q", "b")},                 # prefix_mismatch
        {"chosen": dialogue("q", "x", "r", "a"), "rejected": dialogue("q", "y", "r", "b")},   # prefix_mismatch
        {"chosen": dialogue("q", "a"), "rejected": dialogue("q", "   ")},                     # empty
        {"chosen": dialogue("q", "same "), "rejected": dialogue("q", " same")},               # identical
        row(("x" * 400,), "a", "b"),                                                          # prompt_too_long
    ]
    kept, dropped = parse_rows(rows, "task.path", max_prompt_tokens=50)
    assert dropped == {"malformed": 3, "prefix_mismatch": 2, "empty": 1, "identical": 1, "prompt_too_long": 1}
    assert [e.row for e in kept] == [0, 1, 2]
    # the counter is a parameter (the harness can pass a tokenizer's count)
    _, d = parse_rows(rows, "task.path", max_prompt_tokens=50, counter=lambda s: 1)
    assert d["prompt_too_long"] == 0
    assert H.approx_tokens("abcd") == 1 and H.approx_tokens("abcde") == 2


def test_drops_are_recorded_on_the_task_and_printed(tmp_path, capsys):
    rows = [row(("q%d" % i,), "yes", "no") for i in range(8)] + [
        {"chosen": dialogue("q", "a"), "rejected": dialogue("other", "b")},
        {"chosen": dialogue("q", "a"), "rejected": dialogue("q", "")}]
    task = hh_rlhf(path=write(tmp_path, rows), n_train=4, n_eval=2, n_test=2)
    assert task.dropped == {"malformed": 0, "prefix_mismatch": 1, "empty": 1, "identical": 0, "prompt_too_long": 0}
    out = [ln for ln in capsys.readouterr().out.splitlines() if "dropped" in ln]
    assert len(out) == 1 and "dropped 2: prefix_mismatch 1, empty 1" in out[0], out
    assert task.sources == ["harmless-base"] and {p.source for p in task.train} == {"harmless-base"}


# ------------------------------------------------------------------ the embedded file

def test_embedded_file_parses(embedded, capsys):
    rows = H.embedded_rows()
    assert len(rows) == H.EMBEDDED_ROWS == 2312
    kept, dropped = parse_rows(rows, "task.path", max_prompt_tokens=None)
    assert dropped == {"malformed": 0, "prefix_mismatch": 5, "empty": 4, "identical": 0, "prompt_too_long": 0}
    assert len(kept) == 2303
    # at the default max_prompt_tokens=256 (characters / 4) the longest dialogues go too
    assert embedded.dropped == {**dropped, "prompt_too_long": 262}
    assert (len(embedded.train), len(embedded.eval), len(embedded.test), len(embedded.warmup)) == (400, 100, 0, 0)
    for split in (embedded.train, embedded.eval):
        assert [p.id for p in split] == list(range(len(split)))
        assert all(p.prompt.startswith("Human: ") and p.chosen and p.rejected and p.chosen != p.rejected
                   for p in split)
        assert all(H.approx_tokens(p.prompt) <= 256 for p in split)
    assert H.file_sha256(H.EMBEDDED_FILE) == H.EMBEDDED_SHA256
    assert (H.DATA_DIR / "LICENSE").read_text().startswith("MIT License")
    assert H.EMBEDDED_SHA256 in (H.DATA_DIR / "PROVENANCE.md").read_text()


def test_splits_are_deterministic_per_seed_and_disjoint(embedded):
    again = hh_rlhf()
    assert again.fingerprint() == embedded.fingerprint() and again.test == embedded.test
    other = hh_rlhf(seed=1)
    assert other.fingerprint() != embedded.fingerprint()
    t = hh_rlhf(n_train=300, n_eval=50, n_test=40, n_warmup=60, seed=3)
    splits = {"train": t.train, "eval": t.eval, "test": t.test, "warmup": t.warmup}
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "eval": 50, "test": 40, "warmup": 60}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not content(splits[a]) & content(splits[b]), (a, b)


def test_a_larger_pool_keeps_the_held_out_splits_and_extends_train():
    small, large = hh_rlhf(n_train=100, n_eval=30, seed=2), hh_rlhf(n_train=300, n_eval=30, seed=2)
    assert large.eval == small.eval
    assert content(small.train) < content(large.train)


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    rows = H.read_jsonl(H.EMBEDDED_FILE, "task.path")
    rows[7]["chosen"] = rows[7]["chosen"].replace("a", "e", 1)
    changed = write(tmp_path, rows, "test.jsonl", gz=True)
    assert hashlib.sha256(open(changed, "rb").read()).hexdigest() != H.EMBEDDED_SHA256
    # the embedded file, changed: task.path names it and the fix
    monkeypatch.setattr(H, "EMBEDDED_FILE", type(H.EMBEDDED_FILE)(changed))
    with pytest.raises(ConfigError) as e:
        hh_rlhf()
    msg = str(e.value)
    assert one_line(msg) and msg.startswith("task.path: the embedded HH-RLHF file") and "git checkout" in msg
    monkeypatch.undo()
    # a user's copy with its sha256 pinned
    with pytest.raises(ConfigError) as e:
        hh_rlhf(path=changed, sha256=H.EMBEDDED_SHA256)
    assert one_line(str(e.value)) and str(e.value).startswith("task.sha256: ") and "not the pinned" in str(e.value)
    # the unchanged copy, pinned, reads
    same = tmp_path / "same.jsonl.gz"
    shutil.copy(H.EMBEDDED_FILE, same)
    assert hh_rlhf(path=str(same), sha256=H.EMBEDDED_SHA256).fingerprint() == hh_rlhf().fingerprint()


# ------------------------------------------------------------------ the hub (opt-in), with a fake datasets

def test_hub_reads_the_subset_through_datasets(monkeypatch):
    calls = []
    rows = [row(("q%d" % i,), "yes", "no") for i in range(10)]

    class Fake:
        def to_list(self):
            return rows

    def load_dataset(name, **kw):
        calls.append((name, kw))
        return Fake()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = hh_rlhf(online=True, subset="helpful-base", split="train", n_train=6, n_eval=4)
    assert calls == [("Anthropic/hh-rlhf", {"data_dir": "helpful-base", "split": "train"})]
    assert task.sources == ["helpful-base"] and len(task.train) == 6

    def offline(name, **kw):
        raise ConnectionError("Couldn't reach the hub\n(offline mode)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ConfigError) as e:
        hh_rlhf(online=True)
    assert one_line(str(e.value)) and str(e.value).startswith("task.online: could not load Anthropic/hh-rlhf")


# ------------------------------------------------------------------ bad input: one line, the field and the fix

@pytest.mark.parametrize("case, start", [
    ("not_dialogue", "task.path: not in the HH dialogue format"),
    ("local_pref_columns", "task.path: row 0 has no string 'chosen'"),
    ("all_mismatched", "task.path: every row's chosen and rejected differ before their final Assistant turn"),
    ("all_too_long", "task.path: none of its 4 rows is usable (dropped: prompt_too_long 4); raise "
                     "task.max_prompt_tokens"),
    ("too_few", "task.n_train: n_eval 100 + n_test 0 + n_train 400 + n_warmup 0 = 500 pairs"),
    ("not_json", "task.path: "),
    ("wrong_suffix", "task.path: "),
    ("missing", "task.path: file "),
    ("not_gzip", "task.path: could not read "),
    ("truncated_gzip", "task.path: could not read "),
])
def test_bad_files(tmp_path, case, start):
    pairs = [row(("q%d" % i,), "yes", "no") for i in range(4)]
    files = {
        "not_dialogue": lambda: write(tmp_path, [{"chosen": "Sure.", "rejected": "No."}] * 4),
        "local_pref_columns": lambda: write(tmp_path, [{"prompt": "Hi", "completion": "x"}] * 4),
        "all_mismatched": lambda: write(tmp_path, [{"chosen": dialogue("q%d" % i, "a"),
                                                    "rejected": dialogue("other", "b")} for i in range(4)]),
        "all_too_long": lambda: write(tmp_path, [row(("x" * 2000,), "a", "b")] * 4),
        "too_few": lambda: write(tmp_path, pairs),
        "not_json": lambda: (tmp_path / "bad.jsonl").write_text("{not json\n") and str(tmp_path / "bad.jsonl"),
        "wrong_suffix": lambda: write(tmp_path, pairs, "hh.csv"),
        "missing": lambda: str(tmp_path / "nope.jsonl"),
        "not_gzip": lambda: (tmp_path / "x.jsonl.gz").write_bytes(b"plain text") and str(tmp_path / "x.jsonl.gz"),
        "truncated_gzip": lambda: (tmp_path / "t.jsonl.gz").write_bytes(H.EMBEDDED_FILE.read_bytes()[:5000])
        and str(tmp_path / "t.jsonl.gz"),
    }
    with pytest.raises(ConfigError) as e:
        hh_rlhf(path=files[case]())
    assert one_line(str(e.value)) and str(e.value).startswith(start), str(e.value)


@pytest.mark.parametrize("kw, start", [
    (dict(subset="nope"), "task.subset: unknown 'nope'; choose one of ['harmless-base'"),
    (dict(subset="red-team-attempts", online=True), "task.subset: unknown 'red-team-attempts'"),
    (dict(subset="helpful-base"), "task.subset: 'helpful-base' is not embedded"),
    (dict(split="train"), "task.split: 'train': the embedded file is the test split only"),
    (dict(split="validation"), "task.split: unknown 'validation'"),
    (dict(online=True, path="x.jsonl"), "task.path: 'x.jsonl' and task.online=true both name the data"),
    (dict(sha256="abc"), "task.sha256: 'abc' is not a sha256"),
    (dict(sha256="0" * 64), "task.sha256: 0000000000000000... pins a file"),
    (dict(n_test=1), "task.n_test: 1: a utility is a mean over its pairs"),
    (dict(n_eval=1), "task.n_eval: 1; use a value >= 2"),
    (dict(max_prompt_tokens=0), "task.max_prompt_tokens: 0; use a value >= 1"),
])
def test_bad_settings_before_any_reading(monkeypatch, kw, start):
    def no_reading(*a, **k):
        raise AssertionError("read data before the settings were checked")

    for fn in ("embedded_rows", "file_rows", "hub_rows"):
        monkeypatch.setattr(H, fn, no_reading)
    with pytest.raises(ConfigError) as e:
        hh_rlhf(**kw)
    assert one_line(str(e.value)) and str(e.value).startswith(start), str(e.value)
    with pytest.raises(ConfigError):
        HHSettings.of(kw, prefix="task")


def test_config_node_composes_and_builds():
    from omegaconf import OmegaConf

    from bench.harness.build import build_task, compose_config
    from bench.harness.checks import task_settings
    cfg = compose_config(["task=hh_rlhf", "task.n_train=50", "task.n_eval=20"])
    node = OmegaConf.to_container(cfg.task)
    assert set(node) - {"kind"} == {f.name for f in dataclasses.fields(HHSettings)}, "every setting in the YAML"
    assert task_settings(node).n_train == 50
    task = build_task(cfg)
    assert task.name == "hh_rlhf" and (len(task.train), len(task.eval)) == (50, 20)
    assert task.fingerprint() == hh_rlhf(n_train=50, n_eval=20).fingerprint()


# ------------------------------------------------------------------ owners by topic (fake embeddings)

def fake_embed(prompts: list[str]) -> np.ndarray:
    """Deterministic per prompt, with topic structure: 3 centres (by a keyword) + noise."""
    keys = ("steal", "drug", "kill")
    out = []
    for p in prompts:
        centre = np.zeros(8)
        hit = [i for i, k in enumerate(keys) if k in p.lower()]
        centre[hit[0] if hit else 3] = 4.0
        noise = np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)).normal(size=8)
        out.append(centre + noise)
    return np.array(out)


@pytest.fixture(scope="module")
def pool():
    return hh_rlhf(n_train=200, n_eval=20, seed=0)


def test_by_topic_is_deterministic_and_loses_no_pair(pool):
    a, b, c = (make_partition(pool, kind="by_topic", n_owners=4, seed=s, embed_fn=fake_embed) for s in (0, 0, 1))
    assert a.fingerprint() == b.fingerprint() and a.sizes() == b.sizes()
    for part in (a, c):
        ids = [p.id for o in part.owners for p in o]
        assert Counter(ids) == Counter(p.id for p in pool.train), "lost or duplicated pairs"
        by_id = {p.id: p for p in pool.train}
        assert all(p == by_id[p.id] for o in part.owners for p in o)
        assert part.n_owners == 4 and part.sizes() == sorted(part.sizes(), reverse=True)
        assert part.description.startswith("by_topic")
        assert not content([p for o in part.owners for p in o]) & content(pool.eval), "eval never partitioned"
    # the topics follow the embedding: the "steal" prompts mostly share one owner
    steal = Counter(i for i, o in enumerate(a.owners) for p in o if "steal" in p.prompt.lower())
    assert steal and max(steal.values()) >= 0.8 * sum(steal.values())


def test_by_topic_uses_the_module_hook_and_sizes_sample_topics(pool, monkeypatch):
    seen = []

    def hook(prompts):
        seen.append(len(prompts))
        return fake_embed(prompts)

    monkeypatch.setattr(P, "embed_prompts", hook)
    part = make_partition(pool, kind="by_topic", n_owners=3, seed=0)
    assert seen == [len(pool.train)] and sum(part.sizes()) == len(pool.train)
    small = make_partition(pool, kind="by_topic", n_owners=3, sizes=[10, 8, 5], seed=0)
    assert small.sizes() == [10, 8, 5]
    assert all({p.id for p in o} <= {p.id for p in t} for o, t in zip(small.owners, part.owners)), \
        "owner i samples topic i"
    with pytest.raises(ConfigError) as e:
        make_partition(pool, kind="by_topic", n_owners=3, sizes=[10, 8, 500], seed=0)
    assert one_line(str(e.value)) and str(e.value).startswith("partition.sizes: owner 2 wants 500")


def test_by_topic_planted_noise(pool):
    clean = make_partition(pool, kind="by_topic", n_owners=4, seed=0, embed_fn=fake_embed)
    noisy = make_partition(pool, kind="by_topic", n_owners=4, seed=0, embed_fn=fake_embed, noisy_owners=[2],
                           duplicate_pairs=[[4, 0]])
    assert [p.id for p in noisy.owners[2]] == [p.id for p in clean.owners[2]]
    assert all((p.chosen, p.rejected) == (q.rejected, q.chosen) for p, q in zip(noisy.owners[2], clean.owners[2]))
    assert noisy.owners[4] == noisy.owners[0] and noisy.planted.duplicate_pairs == [[4, 0]]
    assert noisy.planted.noisy_owners == [2] and noisy.planted.corruption == [0, 0, 1.0, 0, 0]
    graded = make_partition(pool, kind="by_topic", n_owners=4, seed=0, embed_fn=fake_embed,
                            flip_fracs=[0, 0.5, 0, 0], garbled_owners=[3], near_duplicate_pairs=[[4, 1]])
    assert graded.planted.noisy_owners == [1, 3, 4]
    assert graded.planted.corruption[3] == 1.0 and graded.planted.corruption[4] == graded.planted.corruption[1]
    assert {p.id for p in pool.train} >= {p.id for o in graded.owners[:4] for p in o}


@pytest.mark.parametrize("kw, start", [
    (dict(n_owners=None), "partition.n_owners: kind=by_topic needs the number of topics"),
    (dict(n_owners=500), "partition.n_owners: 500 exceeds the 200 training examples"),
    (dict(n_owners=3, sizes=[1, 2]), "partition.sizes: 2 sizes for 3 owners"),
])
def test_by_topic_bad_settings_before_embedding(pool, kw, start):
    def never(prompts):
        raise AssertionError("embedded before the settings were checked")

    with pytest.raises(ConfigError) as e:
        make_partition(pool, kind="by_topic", embed_fn=never, **kw)
    assert one_line(str(e.value)) and str(e.value).startswith(start), str(e.value)


def test_by_topic_more_owners_than_distinct_embeddings(pool):
    with pytest.raises(ConfigError) as e:
        make_partition(pool, kind="by_topic", n_owners=4, embed_fn=lambda ps: np.ones((len(ps), 3)))
    assert one_line(str(e.value)) and str(e.value).startswith("partition.n_owners: 4 exceeds the 1 distinct")
