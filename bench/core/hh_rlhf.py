"""Anthropic HH-RLHF as a preference task (``task.kind=hh_rlhf``), offline by default.

The data ships inside the package: ``bench/data/hh_rlhf/test.jsonl.gz``, the
harmless-base test split of Anthropic's public ``hh-rlhf`` repository (2,312 rows,
MIT, provenance and sha256 in ``bench/data/hh_rlhf/PROVENANCE.md``). Its sha256 is
checked on every load; a changed file is refused. Opt-in online (``task.online=true``),
the same format is read from the hub id ``Anthropic/hh-rlhf`` through ``datasets``
(``data_dir=task.subset``, ``split=task.split``); ``task.path`` reads a local file
of the same format (``.jsonl`` or ``.jsonl.gz``).

Each row is ``{"chosen": dialogue, "rejected": dialogue}``, a dialogue being turns
``\\n\\nHuman: ...`` / ``\\n\\nAssistant: ...``. The standard preprocessing:

* a turn starts only at a boundary ``\\n\\nHuman:`` / ``\\n\\nAssistant:``; the word
  ``Human:`` inside a turn's text (not after a blank line) is text;
* the prompt is the dialogue up to and including the last ``\\n\\nAssistant:`` turn
  marker, kept as messages ``[{"role": "user" | "assistant", "content": ...}]``
  (contents stripped); chosen and rejected are the two final Assistant turns, stripped;
* a row is dropped, and counted under the first reason that applies (``REASONS``):
  ``malformed``        no ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns, text before the
                       first turn, no turn before the final one, or a dialogue that
                       does not end on an Assistant turn;
  ``prefix_mismatch``  chosen's and rejected's turns before the final one differ
                       (contents compared after stripping whitespace);
  ``empty``            a final Assistant turn with no text;
  ``identical``        the two final turns are equal after stripping whitespace;
  ``prompt_too_long``  the rendered prompt counts more than ``max_prompt_tokens``.

Prompt length is measured by ``count_tokens`` (default ``approx_tokens``: characters / 4,
rounded up, the usual rule of thumb for English BPE vocabularies such as SmolLM2's;
no tokenizer is loaded to build a task). The harness can pass the model tokenizer's
count to ``hh_rlhf(token_counter=...)`` or replace the module-level ``count_tokens``.

``Pair.prompt`` is a string (pairs are hashed into every cache key and read by the
trainer as text): the messages rendered by ``render_messages`` as
``Human: <u1>\\n\\nAssistant: <a1>\\n\\nHuman: <u2>`` (HH's own turn markers, no trailing
``Assistant:``: the model's prompt template, ``models.render_prompt``, adds the
generation cue, and with ``model.chat_template=true`` wraps the string in one user turn).
``prompt_messages`` turns the string back into the messages, for a harness that wants
to render the dialogue turn by turn with a chat template.

Splits are deterministic per ``seed``: the file's row indices are shuffled once
(``random.Random(f"hh_rlhf/{seed}")``), the dropped rows are left out of that order,
and the survivors are dealt in order into eval, test, train, warm-up (``n_eval``,
``n_test``, ``n_train``, ``n_warmup`` rows). A larger ``n_train`` adds rows without
changing the others; a stricter ``max_prompt_tokens`` only removes rows from their
places. Each split is sorted by file row and numbered from 0 (``Pair.id``);
``Pair.source`` is the subset (``harmless-base``).
"""
from __future__ import annotations

import gzip
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.core.errors import ConfigError
from bench.core.settings import Settings, setting
from bench.core.task import Pair, Task, jsonl_objects

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "hh_rlhf"
EMBEDDED_FILE = DATA_DIR / "test.jsonl.gz"
EMBEDDED_SHA256 = "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
EMBEDDED_SUBSET, EMBEDDED_SPLIT, EMBEDDED_ROWS = "harmless-base", "test", 2312
HUB_ID = "Anthropic/hh-rlhf"
# the preference subsets (data_dir) of Anthropic/hh-rlhf; red-team-attempts holds
# transcripts, not chosen / rejected pairs
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
ROLE = {"Human": "user", "Assistant": "assistant"}
LABEL = {"user": "Human", "assistant": "Assistant"}
REASONS = ("malformed", "prefix_mismatch", "empty", "identical", "prompt_too_long")


def approx_tokens(text: str) -> int:
    """A tokenizer-free token count: characters / 4, rounded up."""
    return (len(text) + 3) // 4


count_tokens: Callable[[str], int] = approx_tokens   # the default counter (a hook: replace to use a tokenizer's)


# ------------------------------------------------------------------ the dialogue format

def split_turns(text: str) -> list[tuple[str, str]] | None:
    """``[(role, content), ...]`` of an HH dialogue (roles ``user`` / ``assistant``,
    contents as written, not stripped), or None when it is not one: no turn markers, or
    text before the first. A dialogue may start with ``Human:`` without the blank line."""
    if not isinstance(text, str):
        return None
    if not text.startswith("\n\n"):
        stripped = text.lstrip()
        if not (stripped.startswith("Human:") or stripped.startswith("Assistant:")):
            return None
        text = "\n\n" + stripped
    parts = _TURN.split(text)        # [before, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        return None
    return [(ROLE[parts[i]], parts[i + 1]) for i in range(1, len(parts), 2)]


def render_messages(messages: list[dict]) -> str:
    """The prompt string of ``Pair.prompt``: ``Human: ...\\n\\nAssistant: ...`` turns."""
    return "\n\n".join(f"{LABEL[m['role']]}: {m['content']}" if m["content"] else f"{LABEL[m['role']]}:"
                       for m in messages)


def prompt_messages(prompt: str) -> list[dict]:
    """The messages of a rendered prompt (the inverse of ``render_messages``)."""
    turns = split_turns(prompt)
    if turns is None:
        raise ValueError(f"not an HH prompt: {prompt[:60]!r}")
    return [{"role": r, "content": c.strip()} for r, c in turns]


def dialogue_messages(prompt: str) -> list[dict]:
    """The chat messages of a prompt: an HH dialogue ("Human: ...\n\nAssistant: ...") as
    its turns, any other prompt as one user turn."""
    if prompt.startswith("Human:"):
        turns = split_turns("\n\n" + prompt)
        if turns:
            return [{"role": r, "content": c.strip()} for r, c in turns]
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Example:
    """One parsed row: the shared dialogue as messages, the two final Assistant turns."""
    row: int                    # the row's index in its file
    messages: tuple             # ({"role", "content"}, ...) up to the last Assistant turn
    chosen: str
    rejected: str

    @property
    def prompt(self) -> str:
        return render_messages(list(self.messages))


def parse_row(chosen: str, rejected: str, row: int = 0, max_prompt_tokens: int | None = None,
              counter: Callable[[str], int] | None = None) -> tuple[Example | None, str | None]:
    """``(example, None)``, or ``(None, reason)`` with the first of ``REASONS`` that applies."""
    tc, tr = split_turns(chosen), split_turns(rejected)
    if (tc is None or tr is None or len(tc) < 2 or len(tr) < 2
            or tc[-1][0] != "assistant" or tr[-1][0] != "assistant"):
        return None, "malformed"
    pc = [(r, c.strip()) for r, c in tc[:-1]]
    if pc != [(r, c.strip()) for r, c in tr[:-1]]:
        return None, "prefix_mismatch"
    a, b = tc[-1][1].strip(), tr[-1][1].strip()
    if not a or not b:
        return None, "empty"
    if a == b:
        return None, "identical"
    ex = Example(row, tuple({"role": r, "content": c} for r, c in pc), a, b)
    if max_prompt_tokens is not None and (counter or count_tokens)(ex.prompt) > max_prompt_tokens:
        return None, "prompt_too_long"
    return ex, None


def parse_rows(rows: list[dict], where: str, max_prompt_tokens: int | None = None,
               counter: Callable[[str], int] | None = None) -> tuple[list[Example], dict[str, int]]:
    """The usable examples of a file's rows and the count of each drop reason (every
    reason listed, 0 included). Refuses, in one line naming ``where``: a row without
    string ``chosen`` / ``rejected``, a file with no row in the dialogue format, one
    whose every row has mismatched prefixes, one with nothing usable."""
    if not rows:
        raise ConfigError(f"{where}: no rows; point it at a non-empty file of HH-RLHF rows")
    for i, r in enumerate(rows):
        bad = [k for k in ("chosen", "rejected") if not isinstance(r.get(k), str)]
        if bad:
            raise ConfigError(f"{where}: row {i} has no string {' / '.join(repr(k) for k in bad)}; every row of an "
                              f"HH-RLHF file is {{\"chosen\": dialogue, \"rejected\": dialogue}} (for prompt / "
                              f"chosen / rejected columns use task=local_pref)")
    kept, dropped = [], dict.fromkeys(REASONS, 0)
    for i, r in enumerate(rows):
        ex, why = parse_row(r["chosen"], r["rejected"], i, max_prompt_tokens, counter)
        if ex is None:
            dropped[why] += 1
        else:
            kept.append(ex)
    n = len(rows)
    if dropped["malformed"] == n:
        raise ConfigError(f"{where}: not in the HH dialogue format: none of its {n} rows has chosen and rejected as "
                          f"'\\n\\nHuman: ...\\n\\nAssistant: ...' turns ending on an Assistant turn; give "
                          f"Anthropic/hh-rlhf rows (or use task=local_pref for prompt / chosen / rejected columns)")
    if dropped["prefix_mismatch"] == n - dropped["malformed"]:
        raise ConfigError(f"{where}: every row's chosen and rejected differ before their final Assistant turn "
                          f"({dropped['prefix_mismatch']} of {n} rows), so no row has a shared prompt; give rows "
                          f"whose two dialogues are the same up to the last '\\n\\nAssistant:' and differ only in "
                          f"the reply")
    if not kept:
        counts = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
        fix = ("raise task.max_prompt_tokens" if dropped["prompt_too_long"]
               else "give rows with two different, non-empty final replies")
        raise ConfigError(f"{where}: none of its {n} rows is usable (dropped: {counts}); {fix}")
    return kept, dropped


# ------------------------------------------------------------------ reading the rows

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path, where: str) -> list[dict]:
    """The rows of a ``.jsonl`` or ``.jsonl.gz`` file (one JSON object per line)."""
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{where}: could not read {str(path)!r} ({type(e).__name__}: {cause}); give a .jsonl or "
                          f".jsonl.gz file of HH-RLHF rows") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: {str(path)!r} is not UTF-8 (byte {e.object[e.start]:#x} at offset {e.start}); "
                          f"re-encode it as UTF-8") from None
    return jsonl_objects(text, where, path, 'an object {"chosen": dialogue, "rejected": dialogue} (HH-RLHF)')


def embedded_rows() -> list[dict]:
    """The embedded harmless-base test split, its sha256 checked first."""
    if not EMBEDDED_FILE.is_file():
        raise ConfigError(f"task.path: null selects the embedded HH-RLHF file, but {str(EMBEDDED_FILE)!r} is "
                          f"missing; reinstall dvbench (pip install -e .) or set task.path=<an HH .jsonl.gz file>")
    got = file_sha256(EMBEDDED_FILE)
    if got != EMBEDDED_SHA256:
        raise ConfigError(f"task.path: the embedded HH-RLHF file {str(EMBEDDED_FILE)!r} has sha256 {got[:16]}..., "
                          f"not the recorded {EMBEDDED_SHA256[:16]}... (it was changed); restore it (git checkout "
                          f"bench/data/hh_rlhf/test.jsonl.gz, or reinstall dvbench) or set task.path=<your copy>")
    return read_jsonl(EMBEDDED_FILE, "task.path")


def file_rows(path: str, sha256: str | None = None) -> list[dict]:
    """A local HH-format file's rows; ``sha256``, when given, must match the file."""
    p = Path(path)
    if not p.name.endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(f"task.path: {path!r} is not a .jsonl or .jsonl.gz file; give an HH-RLHF file (or null "
                          f"for the embedded one, or task.online=true for the hub)")
    if not p.is_file():
        raise ConfigError(f"task.path: file {path!r} not found; give an existing .jsonl / .jsonl.gz file "
                          f"(or null for the embedded one)")
    if p.stat().st_size == 0:
        raise ConfigError(f"task.path: file {path!r} is empty; point it at a non-empty file")
    if sha256 is not None:
        got = file_sha256(p)
        if got != sha256.lower():
            raise ConfigError(f"task.sha256: {path!r} has sha256 {got[:16]}..., not the pinned {sha256[:16]}...; "
                              f"point task.path at the pinned file or update task.sha256")
    return read_jsonl(p, "task.path")


def hub_rows(subset: str, split: str) -> list[dict]:
    """``Anthropic/hh-rlhf`` ``data_dir=subset`` ``split`` through ``datasets`` (downloads)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("task.online: reading Anthropic/hh-rlhf needs the datasets package; pip install "
                          "datasets (or use the embedded file, task.online=false)") from None
    try:
        ds = datasets.load_dataset(HUB_ID, data_dir=subset, split=split)
    except Exception as e:  # network, offline mode, a missing split: one line with the cause
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"task.online: could not load {HUB_ID} data_dir={subset!r} split={split!r} "
                          f"({type(e).__name__}: {cause}); check the network (and that HF_HUB_OFFLINE / "
                          f"HF_DATASETS_OFFLINE are unset), or use the embedded file with task.online=false") from None
    return [dict(r) for r in ds.to_list()]


# ------------------------------------------------------------------ the task

@dataclass(frozen=True)
class HHSettings(Settings):
    """The ``task`` config node of ``task.kind=hh_rlhf``."""
    prefix = "task"
    path: str | None = setting(None, "null = the embedded harmless-base test split (2,312 rows, sha256 checked); "
                                     "or a local .jsonl / .jsonl.gz file of HH-RLHF rows")
    sha256: str | None = setting(None, "pin task.path's sha256 (checked on load); null = only the embedded file "
                                       "is checked, against its recorded sha256")
    online: bool = setting(False, "read Anthropic/hh-rlhf from the hub through datasets (downloads at run time); "
                                  "set it on the command line, task.online=true, so the hub is not kept offline")
    subset: str = setting(EMBEDDED_SUBSET, "the hub data_dir (online); offline only harmless-base is embedded",
                          choices=SUBSETS)
    split: str = setting(EMBEDDED_SPLIT, "the hub split (online); the embedded file is the test split",
                         choices=SPLITS)
    n_train: int = setting(400, "training pairs (the pool partitions split among owners)", min=1)
    n_eval: int = setting(100, "held-out eval pairs (never partitioned or corrupted); >= 2", min=2)
    n_test: int = setting(0, "second held-out split (experiment=selection is judged on it); 0 = none, else >= 2",
                          min=0)
    n_warmup: int = setting(0, "tiny tier: pairs held out as the base model's warm-up text (0 = it warms up on "
                                "the training pool)", min=0)
    seed: int = setting(0, "seed of the train / eval / test / warm-up split", min=0)
    max_prompt_tokens: int = setting(256, "rows whose rendered prompt counts more tokens (characters / 4) are "
                                          "dropped and counted", min=1)
    name: str = setting("hh_rlhf", "the task's name")

    def check(self) -> None:
        if self.n_test == 1:
            raise self.error("n_test", "1: a utility is a mean over its pairs, so 1 pair makes every metric 0, "
                                       "0.5 or 1; use 0 (no test split) or >= 2")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise self.error("sha256", f"{self.sha256!r} is not a sha256 (64 hex digits); give the file's "
                                       f"sha256sum or null")
        if self.online:
            if self.path is not None:
                raise self.error("path", f"{self.path!r} and task.online=true both name the data; set "
                                         f"task.path=null to read the hub, or task.online=false to read the file")
            if self.sha256 is not None:
                raise self.error("sha256", "pins a file, and task.online=true reads the hub; set task.sha256=null")
        elif self.path is None:
            if self.subset != EMBEDDED_SUBSET:
                raise self.error("subset", f"{self.subset!r} is not embedded (only {EMBEDDED_SUBSET} ships); set "
                                           f"task.online=true to download it, or task.path=<its .jsonl.gz>")
            if self.split != EMBEDDED_SPLIT:
                raise self.error("split", f"{self.split!r}: the embedded file is the {EMBEDDED_SPLIT} split only; "
                                          f"set task.split={EMBEDDED_SPLIT}, or task.online=true to download the "
                                          f"{self.split} split")
            if self.sha256 is not None and self.sha256.lower() != EMBEDDED_SHA256:
                raise self.error("sha256", f"{self.sha256[:16]}... pins a file, but the embedded file's sha256 is "
                                           f"{EMBEDDED_SHA256[:16]}...; set task.sha256=null (the embedded file is "
                                           f"always checked) or task.path=<the pinned file>")


def _pairs(examples: list[Example], source: str) -> list[Pair]:
    examples = sorted(examples, key=lambda e: e.row)
    return [Pair(i, source, e.prompt, e.chosen, e.rejected) for i, e in enumerate(examples)]


def hh_rlhf(path: str | None = None, sha256: str | None = None, online: bool = False,
            subset: str = EMBEDDED_SUBSET, split: str = EMBEDDED_SPLIT, n_train: int = 400, n_eval: int = 100,
            n_test: int = 0, n_warmup: int = 0, seed: int = 0, max_prompt_tokens: int = 256,
            name: str = "hh_rlhf", token_counter: Callable[[str], int] | None = None) -> Task:
    """HH-RLHF pairs as a ``Task`` (see the module docstring). ``Task.dropped`` = the
    count of each drop reason (``REASONS``, zeros included). ``token_counter`` measures a
    rendered prompt (default: the module-level ``count_tokens``, characters / 4)."""
    s = HHSettings(path=path, sha256=sha256, online=online, subset=subset, split=split, n_train=n_train,
                   n_eval=n_eval, n_test=n_test, n_warmup=n_warmup, seed=seed,
                   max_prompt_tokens=max_prompt_tokens, name=name)
    if online:
        rows, what = hub_rows(subset, split), f"{HUB_ID} {subset} {split}"
        where = "task.subset"
    elif path is None:
        rows, what = embedded_rows(), f"embedded {EMBEDDED_SUBSET} {EMBEDDED_SPLIT}"
        where = "task.path"
    else:
        rows, what = file_rows(path, sha256), repr(path)
        where = "task.path"
    examples, dropped = parse_rows(rows, where, s.max_prompt_tokens, token_counter)

    order = list(range(len(rows)))
    random.Random(f"hh_rlhf/{seed}").shuffle(order)
    by_row = {e.row: e for e in examples}
    usable = [by_row[i] for i in order if i in by_row]
    want = n_eval + n_test + n_train + n_warmup
    if want > len(usable):
        raise ConfigError(f"task.n_train: n_eval {n_eval} + n_test {n_test} + n_train {n_train} + n_warmup "
                          f"{n_warmup} = {want} pairs, but {what} has {len(usable)} usable (of {len(rows)} rows, "
                          f"{len(rows) - len(usable)} dropped); lower task.n_train (or the other sizes)")
    cuts, at = {}, 0
    for split_name, k in (("eval", n_eval), ("test", n_test), ("train", n_train), ("warmup", n_warmup)):
        cuts[split_name], at = _pairs(usable[at:at + k], subset), at + k
    n_drop = sum(dropped.values())
    if n_drop:
        reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
        print(f"[dvbench] task {name}: {what}: {len(rows)} rows, {len(usable)} usable; dropped {n_drop}: {reasons}"
              + (f" (prompt > {max_prompt_tokens} tokens)" if dropped["prompt_too_long"] else ""))
    return Task(name=name, train=cuts["train"], eval=cuts["eval"], warmup=cuts["warmup"], sources=[subset],
                test=cuts["test"], dropped=dropped)
