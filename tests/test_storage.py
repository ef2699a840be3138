"""Storage as a storage engineer would check it (issue 24): one temp-naming scheme for
every writer and a sweep that removes only dead writers' leftovers."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from bench.core import cache as C
from bench.core.cache import DiskCache, atomic_folder, sweep_stale_tmp


def _killed_mid_write(write) -> int:
    """Run ``write()`` in a forked child that SIGKILLs itself where ``write`` says (a kill -9
    mid-write: no cleanup runs); returns the child's pid, dead and reaped by now."""
    pid = os.fork()
    if pid == 0:                                   # the child: never return into pytest
        try:
            write()
        finally:
            os._exit(3)                            # write() did not kill itself: the test fails below
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return pid


def _die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp"))


# ------------------------------------------------------------------ one temp name, every writer

def test_tmp_path_names_host_boot_namespace_and_pid(tmp_path):
    p = C.tmp_path(tmp_path / "entry.json")
    m = C._TMP_RE.search(p.name)
    assert p.parent == tmp_path and p.name.startswith(".entry.json.") and m
    assert (m["host"], m["boot"], m["ns"]) == C._writer() and int(m["pid"]) == os.getpid()
    assert C.tmp_path(tmp_path / "entry.json") != p                  # two writers of one process differ
    assert len(C.tmp_path(tmp_path / ("x" * 250)).name) < 255        # a long name still makes a legal one


def _writers(monkeypatch, root: Path) -> dict:
    """Each writer of the project, made to kill itself mid-write (see the test below)."""
    import valuers.influence.logs as L
    import valuers.influence.solve as S
    from bench.core import models

    def cache_entry():                 # DiskCache.put_json / put_tensors, embeddings, reports: atomic_write
        os.environ["DVBENCH_KILL_AT"] = "cache_write:1"
        DiskCache(root / "cache").put_json("utility", "ab" * 32, {"v": 1})

    def model_folder():                # models.load_base: a base model's folder (atomic_folder)
        def build(spec, task, out):
            (out / "config.json").write_text("{}")
            _die()
        monkeypatch.setattr(models, "_build_tiny", build)

        class Task:
            def fingerprint(self):
                return "t"
        models.load_base(models.ModelSpec(), Task(), root / "cache")

    def gradient_logs():               # influence.logs.write_logs: LoGra's gradient-log folder
        class Logger:
            names = ["layer"]
            proj = {"layer": (None, None)}

            def k(self, name):
                return 2, 2

        def iter_projected(*a):        # the memmaps exist; killed at the first batch
            _die()
            yield
        monkeypatch.setattr(L, "iter_projected", iter_projected)
        L.write_logs(root / "cache" / "logra" / "k", {}, None, Logger(), [0, 1], None, "dpo", 2, np.float32)

    def solve_memmap():                # influence.solve.pair_and_mean_scores: the [N, E] memmap
        monkeypatch.setattr(S, "PAIR_SCORES_RAM_BYTES", 0)
        S.pair_and_mean_scores([np.ones((3, 2))], [np.ones((2, 2))], [np.ones(2)], 0.1,
                               path=root / "cache" / "pair_scores" / "x.npy", check=_die)

    def ekfac_factors():               # ekfac: the factor folder (atomic_folder, Kronfluence writes into it)
        with atomic_folder(root / "cache" / "ekfac" / "f") as tmp:
            (tmp / "kronfluence").mkdir()
            _die()

    def ekfac_scores():                # ekfac: Kronfluence's scores folder, named after tmp_path(spath)
        spath = root / "cache" / "ekfac" / "g" / "scores" / "s.npy"
        (spath.parent.parent / "kronfluence" / f"scores_{C.tmp_path(spath).name}").mkdir(parents=True)
        _die()

    def ekfac_score_file():            # ekfac._save_scores: the pair scores (atomic_write)
        from valuers.ekfac import EKFAC
        os.environ["DVBENCH_KILL_AT"] = "cache_write:2"
        EKFAC._save_scores(root / "cache" / "ekfac" / "h" / "scores" / "s.npy", np.ones((2, 2)), 1.0)

    def probe():                       # check_folder's writability probe
        monkeypatch.setattr(C.os, "unlink", _die)
        C.check_folder(root / "cache", "cache_dir")

    return {f.__name__: f for f in (cache_entry, model_folder, gradient_logs, solve_memmap, ekfac_factors,
                                    ekfac_scores, ekfac_score_file, probe)}


@pytest.mark.parametrize("writer", ["cache_entry", "model_folder", "gradient_logs", "solve_memmap", "ekfac_factors",
                                    "ekfac_scores", "ekfac_score_file", "probe"])
def test_each_writers_leftover_after_a_kill_is_swept(writer, tmp_path, monkeypatch):
    """Every writer names its temp file or folder with ``tmp_path``; killed with -9 mid-write,
    it leaves that temp behind, and the next sweep removes it (before: the model, gradient-log,
    solve and EK-FAC score temps were named otherwise and stayed forever)."""
    pytest.importorskip("kronfluence") if writer.startswith("ekfac") else None
    run = _writers(monkeypatch, tmp_path)[writer]
    pid = _killed_mid_write(run)
    left = _leftovers(tmp_path)
    assert len(left) == 1 and f".{pid}." in left[0].name, left
    locks = list(tmp_path.rglob(".*.lock"))          # a killed build's lock (build_lock), free now: swept too
    assert sweep_stale_tmp(tmp_path) == 1 + len(locks)
    assert _leftovers(tmp_path) == [] and not any(p.exists() for p in locks)


# ------------------------------------------------------------------ the sweep's rules

def _named(root: Path, final: str, host=None, boot=None, ns=None, pid=None, folder=False, age_s=0.0) -> Path:
    """A temp entry for ``root/final`` as another writer would have named it."""
    h, b, n = C._writer()
    name = C.tmp_path(root / final).name
    m = C._TMP_RE.search(name)
    name = (name[:m.start()] + f".{host or h}.{boot or b}.{ns or n}.{pid or os.getpid()}."
            + name[m.end() - len("0123abcd.tmp"):])
    p = root / name
    if folder:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "w.safetensors").write_bytes(b"x")
    else:
        p.write_bytes(b"half")
    if age_s:
        t = time.time() - age_s
        for q in [p, *p.rglob("*")]:
            os.utime(q, (t, t))
    return p


def test_sweep_keeps_live_and_other_hosts_young_temps_and_removes_the_dead(tmp_path):
    dead = _killed_mid_write(_die)
    old = C.TMP_MAX_AGE_S + 60
    kept = [
        _named(tmp_path, "live.json"),                                        # this process: alive
        _named(tmp_path, "other-host.json", host="node17", pid=dead),        # another host's: may be live
        _named(tmp_path, "other-host-dir", host="node17", pid=dead, folder=True),
        _named(tmp_path, "other-ns.json", ns="1234", pid=dead),              # another pid namespace: ditto
    ]
    gone = [
        _named(tmp_path, "dead.json", pid=dead),                              # this host, this boot, dead pid
        _named(tmp_path, "dead-dir", pid=dead, folder=True),
        _named(tmp_path, "reboot.json", boot="0123456789ab"),                 # this host, an earlier boot
        _named(tmp_path, "old.json", host="node17", age_s=old),               # anyone's, past the age limit
        _named(tmp_path, "old-dir", host="node17", folder=True, age_s=old),
    ]
    legacy_young = tmp_path / f".entry.json.{dead}.k3j4.tmp"                  # the older naming (no host):
    legacy_young.write_bytes(b"x")                                            # only its age tells
    legacy_old = tmp_path / f".entry.json.{dead}.zz99.tmp"
    legacy_old.write_bytes(b"x")
    os.utime(legacy_old, (time.time() - old,) * 2)
    foreign = tmp_path / "notes.tmp"                                          # not ours at all
    foreign.write_bytes(b"x")
    os.utime(foreign, (time.time() - old,) * 2)
    assert sweep_stale_tmp(tmp_path) == len(gone) + 1
    assert all(p.exists() for p in [*kept, legacy_young, foreign]) and not legacy_old.exists()
    assert not any(p.exists() for p in gone)


def test_a_folder_still_being_written_is_young_by_its_newest_file(tmp_path):
    """The age is the newest modification inside a temp folder: a writer on another host that
    keeps writing into a folder made long ago is not swept."""
    p = _named(tmp_path, "factors", host="node17", folder=True, age_s=C.TMP_MAX_AGE_S + 60)
    (p / "sub" / "w.safetensors").write_bytes(b"more")                        # written just now
    assert sweep_stale_tmp(tmp_path) == 0 and p.exists()


def test_sweep_never_raises(tmp_path, monkeypatch):
    dead = _killed_mid_write(_die)
    p = _named(tmp_path, "dead-dir", pid=dead, folder=True)
    assert sweep_stale_tmp(tmp_path / "missing") == 0
    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(C.shutil, "rmtree", refused)
    assert sweep_stale_tmp(tmp_path) == 0 and p.exists()                       # left, and the job goes on


# ------------------------------------------------------------------ crash consistency of folders

def test_atomic_folder_fsyncs_files_and_folder_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    """Without these fsyncs a power loss could leave ``COMPLETE`` beside a truncated file."""
    events = []
    fsync, rename = os.fsync, os.rename

    def fsync_(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def rename_(a, b):
        events.append(("rename", str(a)))
        return rename(a, b)
    monkeypatch.setattr(C.os, "fsync", fsync_)
    monkeypatch.setattr(C.os, "rename", rename_)
    dest = tmp_path / "models" / "m"
    with atomic_folder(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.bin").write_bytes(b"w" * 10)
        (tmp / "config.json").write_text("{}")
    at = events.index(("rename", str(tmp)))
    before = {p for e, p in events[:at]}
    assert {str(tmp / "sub" / "model.bin"), str(tmp / "config.json"), str(tmp / "COMPLETE"),
            str(tmp / "sub"), str(tmp)} <= before
    assert ("fsync", str(dest.parent)) in events[at:]
    assert json.loads((dest / "COMPLETE").read_text())["files"] == {"config.json": 2, "sub/model.bin": 10}
    assert C.folder_problem(dest) is None


def test_a_failed_rename_keeps_a_finished_copy_replaces_an_unfinished_one_or_says_so(tmp_path, monkeypatch, capsys):
    from bench.core.errors import StorageError
    dest = tmp_path / "f"
    with atomic_folder(dest) as tmp:                        # another process's, finished
        (tmp / "a.json").write_text('"theirs"')
    with atomic_folder(dest) as tmp:                        # ours: dropped, theirs kept
        (tmp / "a.json").write_text('"ours"')
    assert (dest / "a.json").read_text() == '"theirs"' and _leftovers(tmp_path) == []
    (dest / "COMPLETE").unlink()                             # an unfinished folder in the way (old code)
    with atomic_folder(dest) as tmp:
        (tmp / "a.json").write_text('"ours"')
    assert (dest / "a.json").read_text() == '"ours"' and "no COMPLETE marker" in capsys.readouterr().out
    other = tmp_path / "g"

    def exdev(a, b):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(C.os, "rename", exdev)
    with pytest.raises(StorageError) as e:                  # no finished copy there: a clear error, not a load
        with atomic_folder(other) as tmp:
            (tmp / "a.json").write_text("1")
    assert "\n" not in str(e.value) and str(other) in str(e.value) and "Invalid cross-device" in str(e.value)
    assert not other.exists() and _leftovers(tmp_path) == []


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _safetensors_folder(dest: Path, legacy: bool) -> Path:
    import torch
    from safetensors.torch import save_file
    with atomic_folder(dest) as tmp:
        (tmp / "factors_fit").mkdir()
        save_file({"a": torch.ones(64, 8), "b": torch.zeros(16)}, str(tmp / "factors_fit" / "lambda.safetensors"))
        (tmp / "meta.json").write_text('{"strategy": "ekfac"}')
    if legacy:                                               # the old code's marker, with no file list
        (dest / "COMPLETE").write_text("ok")
    return dest / "factors_fit" / "lambda.safetensors"


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_folder_file_is_found_removed_with_a_line_and_read_as_missing(tmp_path, capsys, legacy):
    """An EK-FAC-like factor folder whose safetensors file lost its tail (a power loss before
    the fsyncs existed): ``reusable`` says no, removes the folder and prints one line; a
    folder from before the file list (``COMPLETE`` = ``ok``) is checked by the files' formats."""
    f = _safetensors_folder(tmp_path / "ekfac" / "k", legacy)
    assert C.reusable(f.parent.parent) and not C.reusable(tmp_path / "absent")
    _truncate(f)
    assert not C.reusable(f.parent.parent) and not f.parent.parent.exists()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "lambda.safetensors" in out[0] and "removed" in out[0], out
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name, make", [
    ("x.json", lambda p: p.write_text('{"a": [1, 2, 3]}')),
    ("x.npy", lambda p: np.save(p, np.arange(100.0))),
    ("x.npz", lambda p: np.savez(p, a=np.arange(100.0))),
    ("x.safetensors", lambda p: _safetensors_folder(p.parent / "s", False).rename(p)),
])
def test_file_problem_finds_each_format_truncated(tmp_path, name, make):
    p = tmp_path / name
    make(p)
    assert C.file_problem(p) is None
    _truncate(p)
    assert C.file_problem(p) and "\n" not in C.file_problem(p)


def test_truncated_cache_entries_read_as_missing(tmp_path):
    c = DiskCache(tmp_path)
    key = "cd" * 32
    c.put_json("utility", key, {"v": list(range(50))})
    c.put_tensors("stage", key, {"w": np.arange(1000.0)})
    for kind, ext in (("utility", "json"), ("stage", "pt")):
        _truncate(tmp_path / kind / key[:2] / f"{key}.{ext}")
    assert c.get_json("utility", key) is None and c.get_tensors("stage", key) is None


def _gradient_logs(path: Path) -> dict:
    from valuers.influence.logs import META_CHECKED
    meta = {f: f"v-{f}" for f in META_CHECKED}
    with atomic_folder(path) as tmp:
        np.save(tmp / "layer_0000.npy", np.arange(400, dtype=np.float32).reshape(100, 4))
        np.savez(tmp / "projections.npz", **{"0_out": np.eye(2), "0_in": np.eye(2)})
        (tmp / "meta.json").write_text(json.dumps({**meta, "layers": ["l"], "n": 100}))
    return meta


@pytest.mark.parametrize("damage", ["layer_0000.npy", "projections.npz", "meta.json", "COMPLETE"])
def test_damaged_gradient_logs_read_as_absent_and_are_removed(tmp_path, capsys, damage):
    from valuers.influence.logs import GradientLogs
    path = tmp_path / "logra" / "k"
    meta = _gradient_logs(path)
    assert GradientLogs.open(path, meta).arrays[0].shape == (100, 4)
    (path / damage).unlink() if damage == "COMPLETE" else _truncate(path / damage)
    assert GradientLogs.open(path, meta) is None and not path.exists()      # so LoGra writes them again
    assert "removed" in capsys.readouterr().out


def test_a_truncated_base_model_is_rebuilt(tmp_path, capsys, tiny_task):
    from conftest import SPEC

    from bench.core.models import load_base
    load_base(SPEC, tiny_task, tmp_path)
    (folder,) = [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    _truncate(folder / "model.safetensors")       # what a power loss did to the old writer's folders
    model, tok = load_base(SPEC, tiny_task, tmp_path)
    assert "model.safetensors" in capsys.readouterr().out and C.folder_problem(folder) is None
    assert model(**tok("Q: x\nA:", return_tensors="pt")).logits.isfinite().all()


# ------------------------------------------------------------------ filesystems without flock, lock waits

def _no_flock(monkeypatch):
    import errno
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_folder_without_flock_is_refused_at_the_check_with_the_mount_and_the_fix(tmp_path, monkeypatch):
    """Lustre without ``-o flock``: the job used to die at its first record (after the whole
    exact reference) and the cache locks fell back to soft locks; now the folder checks say so."""
    from bench.core.errors import StorageError
    from bench.tracking import ResultsStore
    _no_flock(monkeypatch)
    mount, fs = C.mount_of(tmp_path)
    for check, field in ((lambda: C.check_folder(tmp_path / "cache", "cache_dir"), "cache_dir"),
                         (lambda: ResultsStore(tmp_path / "r").check_writable(), "results_dir")):
        with pytest.raises(StorageError) as e:
            check()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{field}: ") and f"mount {mount}, {fs}" in msg, msg
        assert "-o flock" in msg and f"point {field} at a local disk" in msg, msg
    assert _leftovers(tmp_path) == [] and not list(tmp_path.rglob(".probe*"))


def test_cache_locks_and_appends_fail_in_one_line_without_flock_never_silently(tmp_path, monkeypatch):
    from bench.core.errors import StorageError
    from bench.tracking import ResultsStore
    _no_flock(monkeypatch)
    with pytest.raises(StorageError, match=r"^cache_dir: file locks \(flock\) fail .*Function not implemented"):
        with DiskCache(tmp_path).lock("utility", "ab" * 32):
            pass
    import bench.tracking.store as S

    def lock_descriptor(fd):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(S, "lock_descriptor", lock_descriptor)
    with pytest.raises(StorageError, match=r"^results_dir: file locks \(flock\) fail"):
        ResultsStore(tmp_path / "r").append({"experiment": "x"})


def test_a_lock_wait_ends_with_a_clear_error_and_a_second_hold_in_one_thread_fails_at_once(tmp_path):
    import threading

    from bench.core.errors import StorageError
    c = DiskCache(tmp_path)
    key = "ef" * 32
    held, release = threading.Event(), threading.Event()

    def holder():                      # another holder (flock: another open file description)
        with c.lock("utility", key):
            held.set()
            release.wait(30)
    t = threading.Thread(target=holder)
    t.start()
    try:
        held.wait(30)
        with pytest.raises(StorageError) as e:
            with c.lock("utility", key, timeout_s=0.2):
                pass
        msg = str(e.value)
        assert "\n" not in msg and str(c.lock_path("utility", key)) in msg and "fuser" in msg, msg
    finally:
        release.set()
        t.join()
    with c.lock("utility", key):
        with pytest.raises(RuntimeError, match="holds this lock already"):
            with c.lock("utility", key):
                pass
    with c.lock("utility", key, timeout_s=0.2):            # released: free again
        pass


# ------------------------------------------------------------------ a full disk, for real (a tmpfs)

@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` mounted for this test (root only), unmounted after."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str = "64k") -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _one_line_about_space(msg: str, path) -> bool:
    return "\n" not in msg and "no space left on device" in msg and str(path) in msg and "free space" in msg


def test_a_full_disk_mid_append_cuts_the_torn_line_back_and_says_so_in_one_line(small_disk, monkeypatch):
    import subprocess

    from bench.core.errors import StorageError
    from bench.tracking import ResultsStore, read_jsonl
    disk = small_disk("64k")
    store = ResultsStore(disk)
    cuts, ftruncate = [], os.ftruncate

    def ftruncate_(fd, size):
        cuts.append((os.fstat(fd).st_size, size))
        return ftruncate(fd, size)
    monkeypatch.setattr(os, "ftruncate", ftruncate_)
    n = 0
    with pytest.raises(StorageError) as e:
        for n in range(1000):
            store.append({"experiment": "x", "i": n, "pad": "p" * 3000})
    path = store.path("x")
    assert _one_line_about_space(str(e.value), path) and "results_dir" in str(e.value), str(e.value)
    assert len(cuts) == 1 and cuts[0][0] > cuts[0][1], cuts            # half a line was on disk, and is cut
    data = path.read_bytes()
    assert data.endswith(b"\n") and [r["i"] for r in read_jsonl(path)] == list(range(n))   # every record kept
    subprocess.run(["mount", "-o", "remount,size=1m", "tmpfs", str(disk)], check=True)      # space freed
    store.append({"experiment": "x", "i": n, "pad": "p"})               # the rerun goes on where it stopped
    assert [r["i"] for r in read_jsonl(path)] == list(range(n + 1))


def test_a_full_disk_in_a_cache_write_leaves_no_temp_and_one_line(small_disk):
    from bench.core.errors import StorageError
    disk = small_disk("64k")
    c, key = DiskCache(disk), "12" * 32
    with pytest.raises(StorageError) as e:
        c.put_json("utility", key, {"pad": "p" * 200_000})
    assert _one_line_about_space(str(e.value), c._path("utility", key, "json")), str(e.value)
    with pytest.raises(StorageError):
        c.put_tensors("stage", key, {"w": np.zeros(100_000)})
    with pytest.raises(StorageError) as e:
        with atomic_folder(disk / "models" / "m") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * 200_000)
    assert "\n" not in str(e.value) and str(disk / "models" / "m") in str(e.value)
    assert _leftovers(disk) == [] and c.get_json("utility", key) is None
    c.put_json("utility", key, {"v": 1})                               # what fits still works
    assert c.get_json("utility", key)["v"] == 1


def test_a_library_error_from_a_full_disk_is_the_same_line(small_disk):
    """safetensors wraps ENOSPC in its own error (the issue's traceback); it is recognised."""
    import torch
    from safetensors.torch import save_file
    disk = small_disk("64k")
    with pytest.raises(Exception) as e:
        save_file({"w": torch.zeros(100_000)}, str(disk / "model.safetensors"))
    full = C.full_disk(e.value, disk / "model.safetensors")
    assert full is not None and _one_line_about_space(str(full), disk / "model.safetensors"), (e.value, full)
    assert C.full_disk(ValueError("x")) is None


@pytest.mark.parametrize("writer", ["solve_memmap", "gradient_logs"])
def test_a_memmap_on_a_full_disk_is_an_error_not_a_sigbus(small_disk, writer):
    """numpy's memmaps are sparse files: a full disk used to be a SIGBUS when the map was
    written, killing the job with no message. The blocks are now reserved first."""
    import valuers.influence.logs as L
    import valuers.influence.solve as S

    from bench.core.errors import StorageError
    disk = small_disk("64k")

    def run():
        try:
            if writer == "solve_memmap":
                S.PAIR_SCORES_RAM_BYTES = 0
                S.pair_and_mean_scores([np.ones((20_000, 2))], [np.ones((2, 2))], [np.ones(2)], 0.1,
                                       path=disk / "pair_scores" / "x.npy")
            else:
                class Logger:
                    names = ["layer"]

                    def k(self, name):
                        return 4, 4
                L.write_logs(disk / "logra" / "k", {}, None, Logger(), list(range(20_000)), None, "dpo", 2,
                             np.float32)
        except StorageError as e:
            os._exit(0 if "no space left on device" in str(e) else 4)
        os._exit(5)
    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(6)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert _leftovers(disk) == []


@pytest.mark.slow
def test_a_full_disk_mid_job_stops_it_in_one_line_keeps_the_records_and_a_rerun_resumes(small_disk, tmp_path,
                                                                                         monkeypatch):
    """End to end: the results folder on a tmpfs that holds the first records and not the
    next. The job used to record the failure as the valuer's, or end in a traceback with a
    torn line; now it stops with one line, the records before are whole, and once space is
    freed the rerun finishes from the cache (nothing trained again). A valuer that hits a
    full disk stops the job the same way, instead of a 'failed' record and the next valuer."""
    import subprocess

    from conftest import run_cli

    import valuers.retraining as R
    from bench.tracking import read_jsonl
    args = ["experiment=smoke", "task.n_train_per_source=10", "task.n_eval_per_source=8", "partition.sizes=[8,5,5]",
            "progress=false", "logger=none", "lds.n_subsets=0", "valuer=[random,loo]", f"cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/hydra"]
    roomy = tmp_path / "disk9"                   # the same path length as the tmpfs's: the same record sizes
    code, _, err = run_cli([*args, f"results_dir={roomy}"])
    assert code == 0, err[-2000:]
    lines = (roomy / "runs" / "smoke.jsonl").read_bytes().splitlines()
    sizes = [len(line) + 1 for line in lines]
    shared = [list((json.loads(line).get("shared") or {}).values()) for line in lines]   # the job's shared fields
    order = [r["valuer"] for r in read_jsonl(roomy / "runs" / "smoke.jsonl")]

    def full(self, game, budget):                # the last valuer's own artefact write finds the disk full
        raise OSError(28, "No space left on device", str(tmp_path / "cache" / "x.npy"))
    with monkeypatch.context() as m:
        m.setattr(R.LeaveOneOut, "value", full)
        code, _, err = run_cli([*args, f"results_dir={roomy}"])
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and _one_line_about_space(errors[0], tmp_path / "cache" / "x.npy"), err
    recs = read_jsonl(roomy / "runs" / "smoke.jsonl")[len(sizes):]
    assert [r["valuer"] for r in recs] == order[:order.index("loo")] and all(r["status"] == "ok" for r in recs)

    page, margin = 4096, 512                     # the results folder filling up: whole records kept

    def used(k: int) -> int:                     # pages k records take: their lines, and each shared file once
        names = {n for refs in shared[:k] for n in refs}
        files = sum(-(-(roomy / "shared" / n).stat().st_size // page) for n in names)
        return -(-(sum(sizes[:k]) + margin) // page) + files
    fits = next(k for k in range(2, len(sizes)) if used(k + 1) > used(k))
    pages = used(fits)
    entries = sorted((tmp_path / "cache" / "utility").rglob("*.json"))

    disk = small_disk(f"{pages * page // 1024}k")
    assert disk.name == roomy.name.replace("9", "0")
    code, out, err = run_cli([*args, f"results_dir={disk}"])
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    records = disk / "runs" / "smoke.jsonl"
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert (_one_line_about_space(errors[0], records) or _one_line_about_space(errors[0], disk / "shared")) \
        and "results_dir" in errors[0], errors          # the record's line, or a shared field it needs first
    assert records.read_bytes().endswith(b"\n") and len(read_jsonl(records)) == fits
    assert _leftovers(disk) == []

    subprocess.run(["mount", "-o", "remount,size=1m", "tmpfs", str(disk)], check=True)      # space freed
    code, out, err = run_cli([*args, f"results_dir={disk}"])
    assert code == 0, err[-2000:]
    assert len(read_jsonl(records)) == fits + len(sizes)
    assert sorted((tmp_path / "cache" / "utility").rglob("*.json")) == entries           # nothing retrained
    print(f"records kept when the disk filled: {fits} of {len(sizes)}; the error: {errors[0]}")


# ------------------------------------------------------------------ lock files, swept

def test_lock_files_of_finished_entries_no_one_holds_are_swept(tmp_path):
    c = DiskCache(tmp_path)
    done, held, pending = "a1" * 32, "b2" * 32, "c3" * 32
    for key in (done, held):
        with c.lock("utility", key):
            c.put_json("utility", key, {"v": 1})
    with c.lock("utility", pending):                          # its entry never written (a killed run)
        pass
    flat = tmp_path / "locks" / "utility" / f"{done[::-1]}.lock"   # the older flat layout
    c.put_json("utility", done[::-1], {"v": 2})
    flat.touch()
    with c.lock("utility", held):                             # held right now: kept
        assert c.sweep_locks() == 2
    assert not c.lock_path("utility", done).exists() and not flat.exists()
    assert c.lock_path("utility", held).exists() and c.lock_path("utility", pending).exists()
    with c.lock("utility", done):                             # and locking works as before
        assert c.get_json("utility", done)["v"] == 1


def test_a_waiter_on_a_swept_lock_file_locks_the_new_one(tmp_path):
    """The classic race of removing a lock file: a process opened it, the sweep unlinked it,
    then the process gets the flock of the unlinked file while a newcomer locks a new file
    at the path; both would 'hold the lock'. ``file_lock`` sees the unlinked file and locks
    the new one, so the newcomer waits."""
    import fcntl
    import threading

    from bench.core.errors import StorageError
    path = tmp_path / "k.lock"
    sweeper = os.open(path, os.O_RDWR | os.O_CREAT)           # the sweep holds the old file's flock
    fcntl.flock(sweeper, fcntl.LOCK_EX)
    inside, leave, started = threading.Event(), threading.Event(), threading.Event()

    def waiter():
        started.set()
        with C.file_lock(path):                               # opens the old file, waits for its flock
            inside.set()
            leave.wait(30)
    t = threading.Thread(target=waiter)
    t.start()
    started.wait(30)
    time.sleep(0.3)                                           # the waiter has opened the old file by now
    os.unlink(path)                                           # the sweep removes it, then lets go
    os.close(sweeper)
    try:
        assert inside.wait(30) and path.exists()              # it holds the file now at the path ...
        with pytest.raises(StorageError):                     # ... so a newcomer waits, as it must
            with C.file_lock(path, timeout_s=0.3):
                pass
    finally:
        leave.set()
        t.join()


# ------------------------------------------------------------------ one build per shared artefact

_BUILDER = r"""
import os, sys, time
from pathlib import Path
from bench.core.cache import atomic_write_bytes, build_lock, reusable
p = Path(sys.argv[1])
if not reusable(p):
    with build_lock(p):
        if not reusable(p):
            with open(sys.argv[2], "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(1.0)                       # a long build: the other process arrives meanwhile
            atomic_write_bytes(p, b"built")
print(p.read_bytes().decode())
"""


def test_two_processes_build_one_artefact_once(tmp_path):
    """Two processes that need the same artefact: one builds it, the other waits on the
    build lock and reads it (before: both built it, e.g. EK-FAC factors fitted twice)."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env
    art, log = tmp_path / "a" / "artefact.bin", tmp_path / "builds"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(art), str(log)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and [o.strip() for o in outs] == ["built", "built"]
    assert len(log.read_text().split()) == 1
    assert sweep_stale_tmp(tmp_path) == 1 and not (art.parent / ".artefact.bin.lock").exists()   # the free lock swept


def test_threads_embed_and_build_the_base_once(tmp_path, monkeypatch, tiny_task):
    """The embeddings (SHED, K-means owners) and the base model: two threads (flock is per
    open file, so threads contend like processes) build each once, then share it."""
    import threading

    from conftest import SPEC

    from bench.core import embed, models
    calls = {"embed": 0, "base": 0}

    def slow_embed(texts, batch_size=64, device="cpu"):
        calls["embed"] += 1
        time.sleep(0.5)
        return np.ones((len(texts), 3), dtype=np.float32)
    monkeypatch.setattr(embed, "embed_texts", slow_embed)
    real_build = models._build_tiny

    def slow_build(*a):
        calls["base"] += 1
        time.sleep(0.5)
        real_build(*a)
    monkeypatch.setattr(models, "_build_tiny", slow_build)
    out = []

    def work():
        out.append((embed.embed_cached(["a", "b"], tmp_path / "emb")[1]["cached"],
                    models.load_base(SPEC, tiny_task, tmp_path)[0].config.vocab_size))
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert calls == {"embed": 1, "base": 1}
    assert sorted(c for c, _ in out) == [False, True] and len({v for _, v in out}) == 1


# ------------------------------------------------------------------ the fault switch the kill tests place kills with

def test_kill_point_counts_one_kind_and_holds_only_where_its_conditions_do(monkeypatch):
    from bench.core import faults
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("DVBENCH_KILL_AT", "cache_write/utility:2@SLURM_ARRAY_TASK_ID=0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert not any(faults.should_kill("cache_write", "utility") for _ in range(3))     # task 1: never
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    seen = [faults.should_kill("cache_write", k) for k in ("stage", "utility", "base_eval", "utility", "utility")]
    assert seen == [False, False, False, True, False]          # the 2nd utility write, whatever came between
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")              # the requeued attempt runs through
    assert not any(faults.should_kill("cache_write", "utility") for _ in range(3))
    monkeypatch.setenv("DVBENCH_KILL_AT", "cache_write:1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert faults.should_kill("cache_write", "stage")           # no kind: every cache write counts
