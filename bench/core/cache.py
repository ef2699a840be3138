"""A content-addressed on-disk store, written atomically, and the project's one file writer.

``atomic_write_bytes`` writes every file the project replaces whole (cache entries,
embeddings, reports, plots, baselines): a temp file in the same folder whose name
carries the writer's pid, fsynced, then ``os.replace``d into place, so a reader sees
either the old file or the whole new one, and ``sweep_stale_tmp`` can tell a dead
writer's leftover from a live one's. A truncated or unreadable cache entry (a crash
of another tool, a full disk) reads as missing and is recomputed.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path


def content_key(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """This process's umask, read without changing it where Linux says (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (temp file with the writer's pid, fsync,
    rename; the folder is created). ``DVBENCH_KILL_AT=cache_write:<n>`` (``bench.core.faults``)
    kills the writer between the fsync and the rename. Returns ``path``."""
    from bench.core.faults import die, should_kill
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid is in the temp name, so a later run can tell a dead writer's leftover
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())   # as open() would make it, not mkstemp's 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if should_kill("cache_write"):
            die()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def check_folder(path: str | os.PathLike, field: str) -> None:
    """Fail in one line, before any work, when ``path`` cannot hold the cache: a file
    where the folder should be, a file above it, or a folder that is not writable."""
    from bench.core.errors import ConfigError
    p = Path(path)
    above = next((q for q in [p, *p.parents] if q.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{field}: {above} is a file, not a folder; point {field} at a folder "
                          f"(e.g. {field}=results/cache) or move the file")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{field}: {p} is not writable ({e.strerror or e}); give a folder you can write, "
                          f"e.g. {field}=results/cache") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_tmp(root: str | Path) -> int:
    """Delete temp files *and folders* left under ``root`` by writers that died (killed
    mid-write; EK-FAC's factor folders are ``.<key>.<pid>.<random>.tmp`` directories); a
    live writer's entry is kept. Never raises: an entry it cannot remove (gone already,
    no permission) is left, and the job goes on. Returns how many were removed.

    Known limit: the pid is judged on this node only, so a cache shared by several
    hosts or pid namespaces needs the host in the name (issue 24)."""
    import shutil
    removed = 0
    try:
        entries = list(Path(root).rglob(".*.tmp"))
    except OSError:
        return 0
    for p in entries:
        parts = p.name.rsplit(".", 3)          # .<name>.<pid>.<random>.tmp -> [..., pid, random, tmp]
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue                            # not ours
        if _alive(pid):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


class DiskCache:
    """JSON records and tensor blobs under ``root/<kind>/<key[:2]>/<key>``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str, ext: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.{ext}"

    def get_json(self, kind: str, key: str) -> dict | None:
        p = self._path(kind, key, "json")
        try:
            rec = json.loads(p.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        # a record must say which key it answers: guards against a stray or swapped file
        return rec if isinstance(rec, dict) and rec.get("key") == key else None

    def put_json(self, kind: str, key: str, rec: dict) -> None:
        atomic_write_bytes(self._path(kind, key, "json"), json.dumps({**rec, "key": key}).encode())

    def get_tensors(self, kind: str, key: str):
        import torch
        p = self._path(kind, key, "pt")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:   # truncated / corrupt: treat as missing
            return None
        return obj if isinstance(obj, dict) and obj.get("key") == key else None

    def put_tensors(self, kind: str, key: str, obj: dict) -> None:
        import io

        import torch
        buf = io.BytesIO()
        torch.save({**obj, "key": key}, buf)
        atomic_write_bytes(self._path(kind, key, "pt"), buf.getvalue())

    @contextlib.contextmanager
    def lock(self, kind: str, key: str):
        """An exclusive inter-process lock on one entry (``filelock.UnixFileLock``, a
        POSIX ``flock``: released by the OS if the holder dies, even by SIGKILL). Lock
        files stay in ``root/locks`` (empty, reused); they are never read as entries."""
        from filelock import UnixFileLock
        p = self.root / "locks" / kind / f"{key}.lock"
        p.parent.mkdir(parents=True, exist_ok=True)
        with UnixFileLock(p):
            yield

    def count(self, kind: str) -> int:
        return sum(1 for _ in (self.root / kind).glob("*/*.*")) if (self.root / kind).exists() else 0
