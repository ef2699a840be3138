"""Tasks: the generated preference task and local JSONL / Parquet files."""
from __future__ import annotations

import json

import pytest
from conftest import TASK_KW, one_line

from bench.core.errors import ConfigError
from bench.core.task import SOURCES, local_pref, synthetic_pref


def _rows(task_split):
    return [(p.id, p.source, p.prompt, p.chosen, p.rejected) for p in task_split]


# ------------------------------------------------------------------ synthetic

def test_synthetic_deterministic_per_seed():
    a, b = synthetic_pref(**TASK_KW), synthetic_pref(**TASK_KW)
    assert _rows(a.train) == _rows(b.train)
    assert _rows(a.eval) == _rows(b.eval)
    assert _rows(a.warmup) == _rows(b.warmup)
    assert a.fingerprint() == b.fingerprint()
    c = synthetic_pref(**{**TASK_KW, "seed": 1})
    assert _rows(c.train) != _rows(a.train)
    assert _rows(c.eval) != _rows(a.eval)
    assert c.fingerprint() != a.fingerprint()


def test_synthetic_sizes_ids_and_sources():
    task = synthetic_pref(sources=SOURCES, n_train_per_source=15, n_eval_per_source=7,
                          n_warmup_per_source=5, seed=3)
    assert len(task.train) == 15 * len(SOURCES) and len(task.eval) == 7 * len(SOURCES)
    for split in (task.train, task.eval, task.warmup):
        ids = [p.id for p in split]
        assert len(ids) == len(set(ids)), "ids must be unique within a split"
    for split in (task.train, task.eval):
        counts = {s: sum(p.source == s for p in split) for s in SOURCES}
        assert set(counts) == set(SOURCES) and min(counts.values()) > 0, counts
    assert task.sources == list(SOURCES)


def test_eval_prompts_use_other_wordings():
    task = synthetic_pref(sources=SOURCES, n_train_per_source=60, n_eval_per_source=40,
                          n_warmup_per_source=0, seed=0)
    train_prompts = {p.prompt for p in task.train}
    leaked = [p.prompt for p in task.eval if p.prompt in train_prompts]
    assert not leaked, leaked[:5]


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_chosen_differs_from_rejected(seed):
    """The generator never makes a degenerate pair (what local files drop: chosen ==
    rejected after stripping whitespace), in any split, and every field is a non-empty string."""
    task = synthetic_pref(sources=SOURCES, n_train_per_source=100, n_eval_per_source=40,
                          n_warmup_per_source=40, n_test_per_source=40, seed=seed, arith_max=3)
    for split in (task.train, task.eval, task.warmup, task.test):
        assert split
        same = [p for p in split if p.chosen.strip() == p.rejected.strip()]
        assert not same, same[:3]
        assert all(isinstance(x, str) and x.strip() for p in split for x in (p.prompt, p.chosen, p.rejected))
    assert task.dropped == {}


def test_synthetic_answers_are_correct():
    """The chosen answer is the right one (the task teaches what it claims)."""
    task = synthetic_pref(sources=["arithmetic", "reversal"], n_train_per_source=30,
                          n_eval_per_source=10, n_warmup_per_source=0, seed=2)
    import re
    for p in task.train + task.eval:
        if p.source == "arithmetic":
            a, b = map(int, re.findall(r"\d+", p.prompt))
            assert int(p.chosen) == a + b and int(p.rejected) != a + b
        else:
            word = re.search(r"(?:word|Spell|Write|is) (\w+)", p.prompt).group(1)
            assert p.chosen == word[::-1] and sorted(p.rejected) == sorted(p.chosen)


@pytest.mark.parametrize("kw, field", [
    (dict(sources=[]), "task.sources"), (dict(sources=["nope"]), "task.sources[0]"),
    (dict(n_train_per_source=0), "task.n_train_per_source"), (dict(sources="tone"), "task.sources"),
    (dict(sources=["tone", "tone"]), "task.sources"), (dict(n_eval_per_source="5"), "task.n_eval_per_source"),
    (dict(seed=1.5), "task.seed")])
def test_synthetic_bad_settings(kw, field):
    with pytest.raises(ConfigError) as e:
        synthetic_pref(**{**TASK_KW, **kw})
    assert one_line(str(e.value)) and str(e.value).startswith(field + ":"), str(e.value)


# ------------------------------------------------------------------ local files

ROWS = [{"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}",
         "source": "even" if i % 2 == 0 else "odd"} for i in range(10)]


def _write(path, rows):
    import datasets
    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.to_json(str(path), lines=True)
    return path


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_local_pref_with_heldout_fraction(tmp_path, ext):
    path = _write(tmp_path / f"data.{ext}", ROWS)
    task = local_pref(str(path), eval_fraction=0.2, seed=0)
    assert len(task.eval) == 2 and len(task.train) == 8
    got = {(p.prompt, p.chosen, p.rejected, p.source) for p in task.train + task.eval}
    assert got == {(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in ROWS}
    # held out, not shared
    assert not {p.prompt for p in task.train} & {p.prompt for p in task.eval}
    assert [p.id for p in task.train] == list(range(8)) and [p.id for p in task.eval] == [0, 1]
    assert task.sources == ["even", "odd"]
    # seeded: same seed, same split; the split is a function of the seed
    again = local_pref(str(path), eval_fraction=0.2, seed=0)
    assert [p.prompt for p in again.eval] == [p.prompt for p in task.eval]
    splits = {tuple(p.prompt for p in local_pref(str(path), eval_fraction=0.2, seed=s).eval)
              for s in range(6)}
    assert len(splits) > 1


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_local_pref_with_eval_path(tmp_path, ext):
    train = _write(tmp_path / f"train.{ext}", ROWS)
    ev_rows = [{"prompt": "held?", "chosen": "yes", "rejected": "no"},
               {"prompt": "held 2?", "chosen": "sure", "rejected": "nope"}]
    ev = _write(tmp_path / f"eval.{ext}", ev_rows)
    task = local_pref(str(train), eval_path=str(ev))
    assert [p.prompt for p in task.train] == [r["prompt"] for r in ROWS]
    assert [(p.prompt, p.chosen, p.rejected) for p in task.eval] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in ev_rows]
    assert {p.source for p in task.eval} == {"all"}          # no source column -> one source
    assert task.warmup == []


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("missing", ["chosen", "prompt"])
def test_local_pref_missing_column(tmp_path, ext, missing):
    rows = [{k: v for k, v in r.items() if k != missing} for r in ROWS]
    path = _write(tmp_path / f"data.{ext}", rows)
    with pytest.raises(ConfigError) as e:
        local_pref(str(path))
    msg = str(e.value)
    assert one_line(msg) and repr(missing) in msg and "task.path" in msg


def test_local_pref_missing_column_in_eval_file(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS)
    ev = _write(tmp_path / "eval.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ConfigError) as e:
        local_pref(str(train), eval_path=str(ev))
    assert one_line(str(e.value)) and "'rejected'" in str(e.value) and "task.eval_path" in str(e.value)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_local_pref_empty_file(tmp_path, ext):
    path = tmp_path / f"empty.{ext}"
    path.write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        local_pref(str(path))
    assert one_line(str(e.value)) and "empty" in str(e.value)


def test_local_pref_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        local_pref(str(tmp_path / "nope.jsonl"))
    assert one_line(str(e.value)) and "not found" in str(e.value)


def test_local_pref_malformed_file_is_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": \n not json at all\n')
    with pytest.raises(ConfigError) as e:
        local_pref(str(path))
    assert one_line(str(e.value))


def test_local_pref_hub_path_needs_online():
    with pytest.raises(ConfigError) as e:
        local_pref("someone/some-preference-dataset")
    msg = str(e.value)
    assert one_line(msg) and "online" in msg


def test_local_pref_too_few_rows(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ConfigError) as e:
        local_pref(str(path))
    assert one_line(str(e.value))


def test_test_split_is_held_out_and_keeps_the_fingerprint():
    """The optional test split: deterministic, eval wordings, different draws, no
    effect on the task fingerprint (so games with and without it share caches)."""
    plain = synthetic_pref(**TASK_KW)
    task = synthetic_pref(**TASK_KW, n_test_per_source=5)
    again = synthetic_pref(**TASK_KW, n_test_per_source=5)
    assert plain.test == [] and len(task.test) == 5 * len(TASK_KW["sources"])
    assert task.test == again.test
    assert task.train == plain.train and task.eval == plain.eval
    assert task.fingerprint() == plain.fingerprint()
    ev = {p.prompt for p in task.eval}
    assert {p.prompt for p in task.test} - ev, "test draws differ from the eval draws"
    with pytest.raises(ConfigError, match="task.n_test_per_source"):
        synthetic_pref(**TASK_KW, n_test_per_source=-1)


def test_local_pref_test_path(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS)
    test = _write(tmp_path / "test.jsonl", [{"prompt": "t?", "chosen": "a", "rejected": "b"}])
    task = local_pref(str(train), test_path=str(test))
    assert [p.prompt for p in task.test] == ["t?"]
    assert local_pref(str(train)).test == []


# ------------------------------------------------------------------ row types and degenerate rows

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("col", ["prompt", "chosen", "rejected", "source"])
@pytest.mark.parametrize("bad, kind", [(5, "5 (a number)"), (["a", "b"], '["a", "b"] (a list)'), (None, "null"),
                                       (True, "true (true/false)"), ({"text": "a"}, '{"text": "a"} (an object)')])
def test_non_string_field_names_row_and_column(tmp_path, col, bad, kind):
    rows = [dict(r) for r in ROWS]
    rows[3][col] = bad
    with pytest.raises(ConfigError) as e:
        local_pref(str(_jsonl(tmp_path / "d.jsonl", rows)))
    msg = str(e.value)
    assert one_line(msg) and msg.startswith(f"task.path: row 3: {col!r} is {kind}, not a string; "), msg


def test_non_string_column_in_parquet_and_missing_key(tmp_path):
    rows = [{**r, "chosen": i} for i, r in enumerate(ROWS)]     # an integer column
    with pytest.raises(ConfigError, match=r"^task\.path: row 0: 'chosen' is 0 \(a number\)"):
        local_pref(str(_write(tmp_path / "d.parquet", rows)))
    rows = [dict(r) for r in ROWS]
    del rows[4]["rejected"]                                       # one row without the key
    with pytest.raises(ConfigError, match=r"^task\.eval_path: row 4: 'rejected' is null, not a string"):
        local_pref(str(_jsonl(tmp_path / "t.jsonl", ROWS)), eval_path=str(_jsonl(tmp_path / "e.jsonl", rows)))


def test_bad_ids_and_json_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"^task\.path: row 0: 'id' is \[1\] \(a list\)"):
        local_pref(str(_jsonl(tmp_path / "a.jsonl", [{**r, "id": [i + 1]} for i, r in enumerate(ROWS)])))
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n[1, 2]\n")
    with pytest.raises(ConfigError, match=r"line 3 is \[1, 2\] \(a list\), not an object"):
        local_pref(str(path))


def test_json_list_and_columns_files(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS))
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    a, b = local_pref(str(listed)), local_pref(str(cols))
    assert a.train == b.train and a.eval == b.eval and len(a.train) == 8


def test_degenerate_rows_are_dropped_and_counted(tmp_path, capsys):
    rows = [dict(r) for r in ROWS]
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[7]["rejected"] = " " + rows[7]["chosen"] + "\n"           # the same after stripping
    ev = [{"prompt": "q?", "chosen": "yes", "rejected": "yes "}, {"prompt": "r?", "chosen": "a", "rejected": "b"},
          {"prompt": "s?", "chosen": "c", "rejected": "d"}]
    task = local_pref(str(_jsonl(tmp_path / "t.jsonl", rows)), eval_path=str(_jsonl(tmp_path / "e.jsonl", ev)))
    assert task.dropped == {"task.path": 2, "task.eval_path": 1}
    assert len(task.train) == 8 and [p.id for p in task.train] == list(range(8)) and len(task.eval) == 2
    assert all(p.chosen.strip() != p.rejected.strip() for p in task.train + task.eval)
    out = [ln for ln in capsys.readouterr().out.splitlines() if "dropped" in ln]
    assert out == ["[dvbench] task: dropped 3 rows whose chosen == rejected after stripping whitespace "
                   "(nothing to prefer): task.path 2, task.eval_path 1"]
    clean = local_pref(str(_jsonl(tmp_path / "c.jsonl", ROWS)))
    assert clean.dropped == {"task.path": 0} and "dropped" not in capsys.readouterr().out
    # the dropped rows leave the fingerprint as if they had never been in the file
    kept = [r for i, r in enumerate(rows) if i not in (2, 7)]
    again = local_pref(str(_jsonl(tmp_path / "k.jsonl", kept)), eval_path=str(_jsonl(tmp_path / "e2.jsonl", ev[1:])))
    assert again.fingerprint() == task.fingerprint()


def test_all_rows_degenerate_is_refused(tmp_path):
    rows = [{**r, "rejected": r["chosen"]} for r in ROWS]
    with pytest.raises(ConfigError) as e:
        local_pref(str(_jsonl(tmp_path / "d.jsonl", rows)))
    assert one_line(str(e.value)) and str(e.value).startswith("task.path: all 10 rows have chosen == rejected")


@pytest.mark.parametrize("kw, field", [(dict(eval_fraction=1.0), "task.eval_fraction"),
                                       (dict(path="???"), "task.path"), (dict(online="yes"), "task.online"),
                                       (dict(max_prompt_chars=0), "task.max_prompt_chars")])
def test_local_bad_settings(tmp_path, kw, field):
    with pytest.raises(ConfigError) as e:
        local_pref(**{"path": str(_jsonl(tmp_path / "d.jsonl", ROWS)), **kw})
    assert one_line(str(e.value)) and str(e.value).startswith(field + ":"), str(e.value)
