"""A content-addressed on-disk store, written atomically, and the project's one file writer.

``atomic_write`` (``atomic_write_bytes``) writes every file the project replaces whole
(cache entries, embeddings, reports, plots, baselines): a temp file in the same folder, fsynced, then
``os.replace``d into place, so a reader sees either the old file or the whole new one.
``atomic_folder`` does the same for folders (model, gradient-log, EK-FAC factor folders).
A truncated or unreadable cache entry (a crash of another tool, a full disk) reads as
missing and is recomputed.

Every temp file and folder, of every writer, is named by ``tmp_path``:
``.<name>.<host>.<boot>.<pidns>.<pid>.<random>.tmp``, so ``sweep_stale_tmp`` can tell a dead
writer's leftover from a live one's on a cache shared by several hosts (see there).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

TMP_MAX_AGE_S = 24 * 3600   # a temp entry untouched this long is a dead writer's, whichever host wrote it
# The longest wait for an entry's lock. Its holder is training that entry: one coalition,
# or one packed batch of them (game.pack), which takes seconds to minutes on the presets
# (CPU) and well under an hour for a 135M model on a GPU; 6 h leaves room for models=hf
# ten times larger, yet turns a hung holder (a stuck NFS client, a stopped process) into
# an error the same working day instead of a job that waits until its time limit.
LOCK_TIMEOUT_S = 6 * 3600
_TMP_RE = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<boot>[0-9a-z]+)\.(?P<ns>[0-9]+)\.(?P<pid>[0-9]+)"
                     r"\.[0-9a-f]{8}\.tmp$")


def content_key(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _writer() -> tuple[str, str, str]:
    """(host, boot id, pid namespace) of this process, sanitised for a file name: the pid
    of a temp name means something only on the same host, boot and pid namespace."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    try:
        boot = re.sub(r"[^0-9a-z]", "", Path("/proc/sys/kernel/random/boot_id").read_text().lower())[:12]
    except OSError:
        boot = ""
    try:
        ns = re.sub(r"[^0-9]", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = ""
    return host, boot or "noboot", ns or "0"


def tmp_path(final: str | os.PathLike) -> Path:
    """The temp sibling under which ``final`` (a file or a folder) is written before it is
    renamed into place: ``.<name>.<host>.<boot>.<pidns>.<pid>.<random>.tmp`` (the random
    part keeps two writers of one process apart and a reused pid from matching a leftover)."""
    final = Path(final)
    return final.with_name(f".{final.name[:80]}.{'.'.join(_writer())}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull")   # libraries' wrapped OSErrors


def full_disk(exc: BaseException, path: str | os.PathLike | None = None, field: str | None = None):
    """The one-line ``StorageError`` when ``exc`` (or what caused it) is a full disk or quota:
    an OSError ENOSPC/EDQUOT, or a library's error that wraps one (safetensors' I/O error);
    None otherwise. It names the file (``path``, else the OSError's) and the fix."""
    from bench.core.errors import StorageError
    seen, e, where = 0, exc, path
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in _FULL:
            where = where or e.filename
            break
        if any(w in str(e) for w in _FULL_WORDS):
            break
        e, seen = e.__cause__ or e.__context__, seen + 1
    else:
        return None
    kept = "and rerun (the cache and the records written so far are kept)"
    if not where:                       # a library's error that does not say which file
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        return StorageError(f"no space left on device ({first}); free space on the disk of cache_dir, results_dir "
                            f"or TMPDIR, or point them at another disk, {kept}")
    fix = f"point {field} at another disk" if field else "point cache_dir / results_dir at another disk"
    return StorageError(f"{field + ': ' if field else ''}no space left on device writing {where} "
                        f"(mount {mount_of(where)[0]}); free space there, or {fix}, {kept}")


@contextlib.contextmanager
def stop_on_full_disk():
    """Turn an error that a full disk caused, anywhere in the block, into ``full_disk``'s line."""
    from bench.core.errors import ConfigError
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        full = full_disk(e)
        if full is None:
            raise
        raise full from None


def reserve(path: str | os.PathLike) -> None:
    """Allocate the blocks of ``path`` (a memmap just sized by numpy, sparse so far), so a
    full disk is an ENOSPC now rather than a SIGBUS when the map is written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` atomically with what ``write(file)`` writes (a ``tmp_path`` temp file,
    fsync, rename; the folder is created; on a full disk no temp is left and the error is
    ``full_disk``'s one line). ``DVBENCH_KILL_AT=cache_write[/<kind>]:<n>``
    (``bench.core.faults``) kills the writer between the fsync and the rename. Returns ``path``."""
    from bench.core.faults import die, should_kill
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies, as open() does
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if should_kill("cache_write", path.parent.parent.name):     # kind: root/<kind>/<key[:2]>/<key>
            die()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = full_disk(e, path)
        if full is not None:
            raise full from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``atomic_write`` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    for dirpath, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def _sizes(folder: Path) -> dict[str, int]:
    """``{relative path: size}`` of the files in ``folder``, temp entries (``.tmp``) left out."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.endswith(".tmp"))
        for name in sorted(f for f in files if not f.endswith(".tmp")):
            p = Path(dirpath, name)
            out[p.relative_to(folder).as_posix()] = p.stat().st_size
    return out


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike):
    """Yield a fresh temp folder (``tmp_path(dest)``) to write ``dest``'s files into; when
    the block ends, a ``COMPLETE`` marker listing every file and its size is added, every
    file and folder fsynced, the folder renamed to ``dest`` and ``dest``'s parent fsynced,
    so after a power loss ``dest`` is either absent or whole. If another process put a finished ``dest`` there first, ours is
    dropped and theirs kept; an unfinished one is discarded and ours put in its place; a
    rename that still fails is a one-line ``StorageError``. On an exception the temp
    folder is removed (a full disk: ``full_disk``'s one line)."""
    from bench.core.errors import StorageError
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(dest)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / "COMPLETE").write_text(json.dumps({"files": _sizes(tmp)}))   # what a reader checks
        _fsync_tree(tmp)
        for attempt in (1, 2):
            try:
                os.rename(tmp, dest)
                _fsync(dest.parent)
                return
            except OSError as e:
                if (dest / "COMPLETE").is_file():       # another process finished it first: keep theirs
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                if attempt == 1 and dest.is_dir() and not dest.is_symlink():
                    discard(dest, "no COMPLETE marker (an unfinished folder)")
                    continue
                raise StorageError(f"{dest}: cannot put the finished folder in place ({e.strerror or e}) and "
                                   f"no finished copy is there; remove {dest} (or free the path) and rerun") from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = full_disk(e, dest)
        if full is not None:
            raise full from None
        raise


def file_problem(path: str | os.PathLike) -> str | None:
    """Why a finished artefact file cannot be read, or None. Checked by format, without
    reading the data: ``.json`` parses, a ``.safetensors`` or ``.npy`` file is as long as
    its header says, a ``.npz`` has its zip directory (written last); other files only
    have to exist."""
    import zipfile

    import numpy as np
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if path.suffix == ".json":
                json.loads(f.read())
            elif path.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                if n > size:
                    return f"{path.name}: a header of {n} bytes in a {size}-byte file (truncated?)"
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if size < 8 + n + end:
                    return f"{path.name}: truncated ({size} of {8 + n + end} bytes)"
            elif path.suffix == ".npy":
                fmt = np.lib.format
                version = fmt.read_magic(f)
                if version in ((1, 0), (2, 0)):
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(f)
                    want = f.tell() + int(np.prod(shape)) * dtype.itemsize
                    if not dtype.hasobject and size < want:
                        return f"{path.name}: truncated ({size} of {want} bytes)"
            elif path.suffix == ".npz":
                zipfile.ZipFile(f).close()
    except Exception as e:           # any parse error: a torn or foreign file
        return f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"[:200]
    return None


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why a finished artefact folder (``atomic_folder``) cannot be loaded, or None: no
    ``COMPLETE`` marker, or a file it lists missing, of another size, or failing
    ``file_problem``. Files added since (e.g. LoGra's query vectors, EK-FAC's scores) are
    not its business; a marker from before the list (``ok``) has every file checked."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / "COMPLETE").read_text())["files"]
    except FileNotFoundError:
        return "no COMPLETE marker (an unfinished folder)"
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, dict):
        listed = None
    for rel, size in (_sizes(folder) if listed is None else listed).items():
        p = folder / rel
        try:
            now = p.stat().st_size
        except OSError:
            return f"{rel}: missing"
        if listed is not None and now != size:
            return f"{rel}: {now} bytes, {size} when it was finished"
        why = file_problem(p)
        if why:
            return why
    return None


def discard(path: str | os.PathLike, why: str) -> None:
    """Move a damaged artefact (file or folder) out of the way, under a temp name the sweep
    would also remove, and delete it, printing one line; the caller then rebuilds it."""
    path = Path(path)
    aside = tmp_path(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return                        # another process discarded it first
    print(f"[dvbench] {path}: {why}; removed, it is rebuilt")
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def reusable(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished artefact (a folder of ``atomic_folder``, or a file)
    to load; a damaged one (``folder_problem`` / ``file_problem``) is discarded with one
    printed line and False returned, so the caller rebuilds it."""
    path = Path(path)
    if not path.exists():
        return False
    why = folder_problem(path) if path.is_dir() else file_problem(path)
    if why is None:
        return True
    discard(path, why)
    return False


def check_folder(path: str | os.PathLike, field: str) -> None:
    """Fail in one line, before any work, when ``path`` cannot hold the cache: a file
    where the folder should be, a file above it, a folder that is not writable, or a
    filesystem whose ``flock`` fails (``probe_folder``)."""
    from bench.core.errors import ConfigError
    p = Path(path)
    above = next((q for q in [p, *p.parents] if q.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{field}: {above} is a file, not a folder; point {field} at a folder "
                          f"(e.g. {field}=results/cache) or move the file")
    try:
        probe_folder(p, field)
    except OSError as e:
        raise ConfigError(f"{field}: {p} is not writable ({e.strerror or e}); give a folder you can write, "
                          f"e.g. {field}=results/cache") from None


def probe_folder(folder: Path, field: str) -> None:
    """Create ``folder``, a probe file in it, and ``flock`` the probe: OSError when the folder
    is not writable; a one-line ``StorageError`` naming the mount and the fix when its
    filesystem has no working ``flock`` (Lustre without ``-o flock``: ENOSYS), which the
    cache's locks and the results store's appends rely on."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = tmp_path(folder / ".probe")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # a fresh file: only a missing flock fails
    except OSError as e:
        raise no_flock(folder, field, e) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def mount_of(path: str | os.PathLike) -> tuple[str, str]:
    """(mount point, filesystem type) that holds ``path`` (from /proc/self/mounts), or ``("?", "?")``."""
    real, best = os.path.realpath(path), ("?", "?")
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:                 # the longest mount point above ``real``; a later one shadows an earlier
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (best[0] == "?" or len(mnt) >= len(best[0])):
            best = (mnt, parts[2])
    return best


def no_flock(folder: str | os.PathLike, field: str, err: OSError):
    """The one-line ``StorageError`` for a folder whose filesystem refuses ``flock``."""
    from bench.core.errors import StorageError
    mnt, fs = mount_of(folder)
    return StorageError(f"{field}: file locks (flock) fail on {folder} ({err.strerror or err}; mount {mnt}, {fs}); "
                        f"mount it with flock support (Lustre: -o flock), or point {field} at a local disk")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(p: Path) -> float:
    """The latest modification time in ``p`` (a folder: of anything inside), so a writer
    still writing keeps its temp folder young."""
    newest = p.lstat().st_mtime
    if p.is_dir() and not p.is_symlink():
        for dirpath, dirs, files in os.walk(p):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _dead_writer(name: str, age_s: float, max_age_s: float) -> bool:
    """Whether the temp entry ``name``, last touched ``age_s`` ago, is a dead writer's."""
    m = _TMP_RE.search(name)
    if m is None:                       # an older naming (no host): only its age tells
        return name.startswith(".") and age_s > max_age_s
    if age_s > max_age_s:
        return True
    host, boot, ns = _writer()
    if m["host"] != host:
        return False                    # another host's: its pids mean nothing here
    if m["boot"] != boot:
        return True                     # this host before a reboot: every writer of then is gone
    return m["ns"] == ns and not _alive(int(m["pid"]))


def sweep_stale_tmp(root: str | Path, max_age_s: float = TMP_MAX_AGE_S) -> int:
    """Delete the temp files and folders (``tmp_path`` names) under ``root`` left by writers
    that died: this host's and this boot's whose pid is gone, this host's from an earlier
    boot, and anyone's untouched for ``max_age_s`` (another host's younger ones are kept:
    they may be live). Folders go with ``rmtree``; ``root/locks`` is not walked
    (``DiskCache.sweep_locks``); build locks (``build_lock``) go when no one holds them. Never raises: an entry it cannot remove (gone already, no
    permission) is left, and the job goes on. Returns how many were removed."""
    root = Path(root)
    removed, now = 0, time.time()
    for dirpath, dirs, files in os.walk(root):       # os.walk skips what it cannot list
        if Path(dirpath) == root and "locks" in dirs:
            dirs.remove("locks")
        for name in files:              # build locks (``build_lock``) no one holds
            if name.startswith(".") and name.endswith(".lock"):
                removed += _unlink_if_free(Path(dirpath, name))
        for name in [n for n in dirs + files if n.endswith(".tmp")]:
            p = Path(dirpath, name)
            try:
                if not _dead_writer(name, now - _newest_mtime(p), max_age_s):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
            except OSError:
                pass
        dirs[:] = [d for d in dirs if not d.endswith(".tmp")]   # never into a temp folder
    return removed


_held = threading.local()    # the lock files this thread holds


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S, field: str = "cache_dir"):
    """Hold an exclusive ``flock`` on ``path`` (created if absent). Waits at most
    ``timeout_s``, then a one-line ``StorageError`` names the lock and what to do; a
    filesystem without ``flock`` is a ``StorageError`` too (``no_flock``), not a soft lock
    that a killed holder would leave behind. The same thread asking twice is a RuntimeError
    (it would wait on itself). A lock file unlinked while we waited (``DiskCache.sweep_locks``)
    is not a lock: we lock the file now at ``path`` instead."""
    key = os.path.abspath(path)
    mine = _held.__dict__.setdefault("paths", set())
    if key in mine:
        raise RuntimeError(f"{path}: this thread holds this lock already; a second wait on it would never end")
    mine.add(key)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                _wait_flock(fd, path, deadline, timeout_s, field)
            except BaseException:
                os.close(fd)
                raise
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)                # swept while we waited: the next holder uses the new file
        try:
            yield
        finally:
            os.close(fd)                # releases the flock
    finally:
        mine.discard(key)


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, timeout_s: float = LOCK_TIMEOUT_S, field: str = "cache_dir"):
    """Hold the lock that guards building the artefact at ``path`` (a folder of
    ``atomic_folder`` or a file), so processes that need the same artefact build it once:
    the others wait, then find it finished. The caller checks again under the lock::

        if not reusable(p):
            with build_lock(p):
                if not reusable(p):      # finished by another process while we waited
                    build(p)

    The lock file is a hidden ``.<name>.lock`` beside ``path`` (``file_lock``), removed by
    ``sweep_stale_tmp`` when no one holds it (safe: see ``DiskCache.sweep_locks``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.lock"), timeout_s, field):
        yield


def _wait_flock(fd: int, path: Path, deadline: float, timeout_s: float, field: str) -> None:
    from bench.core.errors import StorageError
    pause = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise no_flock(path.parent, field, e) from None
        if time.monotonic() >= deadline:
            raise StorageError(f"{path}: waited {timeout_s / 3600:.3g} h for this lock, which another process holds "
                               f"(training the same entry?); if no other job runs, find the holder with "
                               f"`fuser -v {path}` and end it, then rerun")
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def _unlink_if_free(lock: Path) -> int:
    """Unlink ``lock`` if no one holds its flock, holding it meanwhile; 1 if removed."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:      # replaced since we opened it: not ours to judge
            return 0
        os.unlink(lock)
        return 1
    except OSError:                                           # held, no flock, gone: leave it
        return 0
    finally:
        os.close(fd)


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

    def has_tensors(self, kind: str, key: str) -> bool:
        """Whether a tensor blob is on disk (not read or checked: for plans and estimates)."""
        return self._path(kind, key, "pt").is_file()

    def put_tensors(self, kind: str, key: str, obj: dict) -> None:
        import io

        import torch
        buf = io.BytesIO()
        torch.save({**obj, "key": key}, buf)
        atomic_write_bytes(self._path(kind, key, "pt"), buf.getvalue())

    def lock_path(self, kind: str, key: str) -> Path:
        return self.root / "locks" / kind / key[:2] / f"{key}.lock"

    @contextlib.contextmanager
    def lock(self, kind: str, key: str, timeout_s: float = LOCK_TIMEOUT_S):
        """An exclusive inter-process lock on one entry (``file_lock``: a POSIX ``flock``,
        released by the OS if the holder dies, even by SIGKILL; an error, never a soft-lock
        fallback, where the filesystem has none; a ``StorageError`` after ``timeout_s``).
        Lock files live in ``root/locks/<kind>/<key[:2]>/``; they are never read as entries."""
        p = self.lock_path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(p, timeout_s, field="cache_dir"):
            yield

    def sweep_locks(self) -> int:
        """Remove the lock files of entries that exist and that no one holds (for a cache of
        thousands of entries, thousands of files the start-of-job sweep would walk). Never
        raises; returns how many were removed.

        Safe with ``flock``: a file is unlinked only while we hold its flock ourselves (a
        non-blocking one: a held lock is left), so no one holds it then; a process that had
        opened it before and gets its flock after sees it unlinked (``st_nlink == 0``) and
        locks the new file at the path instead (``file_lock``), so two holders never hold
        two files of one key. Only keys whose entry exists are touched: a locker that still
        finds the old file (an older dvbench without that check) then only reads the entry."""
        removed = 0
        locks = self.root / "locks"
        for p in [*locks.glob("*/*/*.lock"), *locks.glob("*/*.lock")]:    # and the older flat layout
            kind = (p.parent.parent if p.parent.parent != locks else p.parent).name
            key = p.stem
            if any(self._path(kind, key, ext).exists() for ext in ("json", "pt")):
                removed += _unlink_if_free(p)
        return removed

    def count(self, kind: str) -> int:
        return sum(1 for _ in (self.root / kind).glob("*/*.*")) if (self.root / kind).exists() else 0
