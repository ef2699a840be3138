"""The results store: append-only JSONL, one file per experiment under ``<root>/runs/``,
one line per (experiment, valuer, game, seed) run; and the helpers that read records.

Records of any schema version are upgraded on read (``bench.tracking.schema``).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from filelock import lock_descriptor

from bench.core.cache import full_disk, no_flock, probe_folder
from bench.core.errors import ConfigError
from bench.tracking.provenance import to_jsonable
from bench.tracking.schema import upgrade


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^\w.=+-]", "_", str(name)).lstrip(".")
    if not safe:
        raise ConfigError(f"experiment: invalid name {name!r}; set experiment=<name>")
    return safe


def dumps_line(record: dict) -> bytes:
    """One record as one JSON line (NaN written as null)."""
    return (json.dumps(to_jsonable(record), allow_nan=False, ensure_ascii=False) + "\n").encode()


# Fields a job's records repeat (the job's config, its consensus and LDS targets, a
# seed's utility table): the store writes each distinct value once, as a plain JSON file
# named by the SHA-256 of its bytes under <root>/shared/, and the record line names it
# (``"shared": {"config": "config-<hash>.json", ...}``); reading puts the values back.
SHARED_FIELDS = ("config", "consensus", "lds_targets", "utility_table")
SHARED_MIN_BYTES = 512       # smaller values stay in the line


def _canonical(value) -> bytes:
    return json.dumps(to_jsonable(value), allow_nan=False, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":")).encode()


def shared_name(field: str, data: bytes) -> str:
    """The file name of a shared value: its field and the SHA-256 of its bytes."""
    import hashlib
    return f"{field}-{hashlib.sha256(data).hexdigest()[:24]}.json"


def share_fields(record: dict, shared_dir: Path) -> dict:
    """``record`` with its large repeated fields written to ``shared_dir`` (content-
    addressed, atomically, once) and named under ``"shared"``: what a line stores."""
    from bench.core.cache import atomic_write_bytes
    out, refs = dict(record), {}
    for field in SHARED_FIELDS:
        if record.get(field) is None:
            continue
        data = _canonical(record[field])
        if len(data) < SHARED_MIN_BYTES:
            continue
        name = shared_name(field, data)
        if not (shared_dir / name).is_file():
            atomic_write_bytes(shared_dir / name, data)
        refs[field] = name
        del out[field]
    if refs:
        out["shared"] = refs
    return out


def _resolve(rec: dict, shared_dir: Path, texts: dict) -> dict:
    """A line's record with its shared fields read back (``texts``: file contents by name)."""
    refs = rec.pop("shared", None)
    for field, name in (refs or {}).items():
        if name not in texts:
            try:
                texts[name] = (shared_dir / name).read_bytes()
            except OSError:
                raise ConfigError(f"results: a record names {shared_dir / name}, which is missing; restore it "
                                  f"(git checkout {shared_dir}) or rerun the job") from None
        rec[field] = json.loads(texts[name])
    return rec


def read_jsonl(path: str | os.PathLike, shared_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records in a JSONL file, their shared fields read back from ``shared_dir``
    (default: ``shared/`` beside the file's folder, as ``<root>/runs/x.jsonl`` has it),
    upgraded to the current schema; unreadable lines (a truncated write) are skipped
    with one warning."""
    path = Path(path)
    shared = Path(shared_dir) if shared_dir is not None else path.parent.parent / "shared"
    texts: dict = {}
    with open(path, "rb") as fh:
        # Never read a line while it is being written. The writer's lock is a flock on
        # the file itself; readers share it (filelock has no shared lock, and an
        # exclusive one on a read-only descriptor fails on NFS), and a read-only file or
        # folder (a committed baseline) needs no lock file of its own.
        try:
            fcntl.flock(fh, fcntl.LOCK_SH)
        except OSError as e:       # a filesystem without flock (a checkout on Lustre): read as is;
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):   # a torn line is skipped below
                raise
        data = fh.read()
    out, bad = [], []
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            bad.append(i)
            continue
        if isinstance(rec, dict):
            out.append(upgrade(_resolve(rec, shared, texts)))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:5]} "
                      "(truncated or interrupted write)", RuntimeWarning, stacklevel=2)
    return out


class ResultsStore:
    """Append-only store: ``<root>/runs/<experiment>.jsonl``, one record per line."""

    def __init__(self, root: str | os.PathLike = "results"):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.shared = self.root / "shared"

    def path(self, experiment: str) -> Path:
        return self.runs / f"{_safe_name(experiment)}.jsonl"

    def _unwritable(self, err: OSError) -> ConfigError:
        why = err.strerror or type(err).__name__
        return ConfigError(f"results_dir: cannot write to {self.runs} ({why}); "
                           "set results_dir=<writable path>")

    def check_writable(self) -> None:
        """Fail fast, before any expensive work, if records could not be saved."""
        try:
            probe_folder(self.runs, "results_dir")     # writable, and flock works (appends need it)
        except OSError as e:
            raise self._unwritable(e) from e

    def append(self, record: dict) -> Path:
        """Append one record as one line; safe with concurrent writers and readers.

        Not a write-and-rename (``bench.core.cache.atomic_write_bytes``): the file grows
        by one line under an exclusive ``flock`` on the file itself (released by the OS
        if the writer dies), then fsync. A line a killed writer left half-written is
        skipped by ``read_jsonl`` and never glued to the next record; one that failed to
        write (a full disk) is cut back, and the error is one line (``cache.full_disk``).
        """
        if not record.get("experiment"):
            raise ValueError("record has no 'experiment'")
        try:
            slim = share_fields(record, self.shared)
        except OSError as e:
            raise full_disk(e, self.shared, "results_dir") or self._unwritable(e) from None
        return self._append_line(self.path(record["experiment"]), dumps_line(slim))

    def compact(self, experiment: str) -> tuple[int, int]:
        """Rewrite ``runs/<experiment>.jsonl`` (atomically) with every record's shared
        fields in ``shared/`` (records written before the store shared them); returns the
        file's (bytes before, bytes after). Reading gives the same records."""
        from bench.core.cache import atomic_write_bytes
        path = self.path(experiment)
        before = path.stat().st_size
        lines = b"".join(dumps_line(share_fields(r, self.shared)) for r in read_jsonl(path, self.shared))
        atomic_write_bytes(path, lines)
        return before, len(lines)

    def _append_line(self, path: Path, line: bytes) -> Path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._unwritable(e) from e
        try:
            try:
                lock_descriptor(fd)
            except OSError as e:
                raise no_flock(self.runs, "results_dir", e) from None
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a crashed writer left half a line: keep ours separate
            from bench.core.faults import die, should_kill
            if should_kill("log"):
                os.write(fd, line[: len(line) // 2])
                os.fsync(fd)
                die()
            try:
                n = os.write(fd, line)
                while n < len(line):  # a short write: the disk filled up (the next write says so)
                    n += os.write(fd, line[n:])
                os.fsync(fd)
            except OSError as e:      # e.g. a full disk: cut the torn line back, keep the records before it
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                raise full_disk(e, path, "results_dir") or self._unwritable(e) from None
        finally:
            os.close(fd)  # releases the lock
        return path

    def experiments(self) -> list[str]:
        return sorted(p.stem for p in self.runs.glob("*.jsonl"))

    def jobs_path(self, experiment: str) -> Path:
        return self.root / "jobs" / f"{_safe_name(experiment)}.jsonl"

    def append_job(self, summary: dict) -> Path:
        """Append a job's summary (its wall time and where it went, its estimate) to
        ``<root>/jobs/<experiment>.jsonl``, the way ``append`` appends a record."""
        if not summary.get("experiment"):
            raise ValueError("job summary has no 'experiment'")
        return self._append_line(self.jobs_path(summary["experiment"]), dumps_line(summary))

    def read_jobs(self) -> list[dict]:
        """Every job summary, in file order (none for jobs from before summaries)."""
        return [r for p in sorted((self.root / "jobs").glob("*.jsonl")) for r in read_jsonl(p)]

    def read(self, experiment: str | None = None) -> list[dict]:
        """All records (of one experiment, if given), in file order."""
        if experiment is not None:
            p = self.path(experiment)
            recs = read_jsonl(p) if p.exists() else []
            return [r for r in recs if r.get("experiment") == experiment]
        return [r for p in sorted(self.runs.glob("*.jsonl")) for r in read_jsonl(p)]


# --------------------------------------------------------------------------- reading records

_SECTIONS = ("fidelity", "one_seed_exact", "detection", "selection", "cost")


def flatten_metrics(record: dict) -> dict[str, float]:
    """``{"fidelity/spearman": .., "detection/auroc": .., "cost/wall_s": .., ...}``.

    Reads every dict under ``record["metrics"]`` plus a top-level ``cost``;
    lists (curves, owner values) are left to tables.
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif obj is None or isinstance(obj, (bool, int, float, np.number)):
            flat[prefix] = to_jsonable(obj)

    metrics = record.get("metrics") or {}
    for name, sec in metrics.items():
        walk(name, sec)
    if "cost" not in metrics and isinstance(record.get("cost"), dict):
        walk("cost", record["cost"])
    order = {s: i for i, s in enumerate(_SECTIONS)}
    return dict(sorted(flat.items(), key=lambda kv: order.get(kv[0].split("/")[0], len(order))))


def get_metric(record: dict, section: str, key: str) -> float | None:
    """``record["metrics"][section][key]`` (``cost`` may also sit at top level); None if absent."""
    for holder in (record.get("metrics") or {}, record):
        sec = holder.get(section)
        if isinstance(sec, dict) and key in sec:
            v = sec[key]
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
    return None


def latest(records: Iterable[dict], keys=("experiment", "game", "valuer", "seed")) -> list[dict]:
    """The newest record (by timestamp, then file order) for each combination of ``keys``."""
    best: dict[tuple, dict] = {}
    for r in records:
        k = tuple(str(r.get(f)) for f in keys)
        if k not in best or str(r.get("timestamp") or "") >= str(best[k].get("timestamp") or ""):
            best[k] = r
    return list(best.values())
