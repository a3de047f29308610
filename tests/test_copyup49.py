"""copyup49: a copy-up with fewer system calls and less Python, the same result.

A copy-up reads the debug level once for its changes (``layer.debugging``), and each change
is still logged at DEBUG. Driven without FUSE (``CoreDriver``)."""
from __future__ import annotations

import logging
import os

import pytest

import helpers
from core_driver import CoreDriver


@pytest.fixture
def drv(tmp_path):
    helpers.require("root")  # (trusted.overlay.origin, as every copy-up of the mount)
    lower = tmp_path / "lower"
    (lower / "d" / "e").mkdir(parents=True)
    for name in ("f", "g", "h"):
        (lower / "d" / name).write_bytes(b"lower " + name.encode())
    (lower / "d" / "e" / "k").write_bytes(b"below")
    (lower / "top").write_bytes(b"at the root")
    d = CoreDriver.in_dir(tmp_path)
    yield d
    d.close()


def test_a_copy_up_logs_each_of_its_changes_at_debug(drv, caplog):
    """The debug level read once per copy-up (``CopyUpContext.debug``) still has every
    change of the copy-up logged when it is on, and none built when it is off."""
    with caplog.at_level(logging.DEBUG, logger="overlaypc.layer"):
        drv.fs.copyup.ensure_upper("d/f")
    lines = [r.getMessage() for r in caplog.records if r.name == "overlaypc.layer"]
    for what in ("create", "chown", "chmod", "utime", "rename"):
        assert any(f": {what} " in line for line in lines), (what, lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="overlaypc.layer"):
        drv.fs.copyup.ensure_upper("d/g")
    assert not [r for r in caplog.records if r.name == "overlaypc.layer"]
    assert os.path.isfile(drv.fs.stack.upper.path + "/d/g")


def _upper(drv, rel: str) -> str:
    return os.path.join(drv.fs.stack.upper.path, rel)


def _counted_exactly(lookup) -> None:
    """The lookup cache's count of its fds is what its nodes hold (a readable fd of an
    upper directory counted with the node holding it: ``DirFd.readable``)."""
    from overlaypc.lookup import _fds_of
    with lookup._lock:
        assert lookup.cached_fds == sum(_fds_of(node) for node, _ in lookup._dirs.values())
        assert all(fds == _fds_of(node) for node, fds in lookup._dirs.values())


def _fsyncs(monkeypatch) -> list[int]:
    """The inode numbers of what ``copyup`` fsyncs from now on."""
    from overlaypc import copyup
    synced: list[int] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        return real(fd)
    monkeypatch.setattr(copyup.os, "fsync", fsync)
    return synced


def test_the_parents_readable_fd_is_kept_counted_and_used_for_its_fsync_and_times(drv, monkeypatch):
    """The first copy-up into a directory opens a readable fd of it beside the lookup
    cache's ``O_PATH`` one; the next ones use it (no open): the parent fsynced is the
    directory, its times stay, the cache counts the fd."""
    fs = drv.fs
    fs.copyup.ensure_upper("d/f")
    held = fs.stack.upper.held_dir("d")
    assert held is not None and held.readable >= 0
    readable = held.readable
    _counted_exactly(fs.lookup)
    d_ino = os.stat(_upper(drv, "d")).st_ino
    os.utime(_upper(drv, "d"), ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    before = os.stat(_upper(drv, "d"))
    synced = _fsyncs(monkeypatch)
    fs.copyup.ensure_upper("d/g")
    assert fs.stack.upper.held_dir("d") is held and held.readable == readable
    after = os.stat(_upper(drv, "d"))
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
    assert synced == [os.stat(_upper(drv, "d/g")).st_ino, d_ino]
    _counted_exactly(fs.lookup)
    # a copy-up at the root: the layer's own readable fd of its root (``mount_fd``)
    synced.clear()
    fs.copyup.ensure_upper("top")
    assert synced[-1] == os.stat(fs.stack.upper.path).st_ino
    assert fs.stack.upper.root.readable == fs.stack.upper.mount_fd


def test_the_parents_readable_fd_after_the_directory_is_renamed(drv, monkeypatch):
    """A rename of the directory drops its cached fds; the next copy-up into it (at its
    new name) fsyncs and keeps the times of that directory, through a new readable fd."""
    fs = drv.fs
    fs.copyup.ensure_upper("d/f")
    old = fs.stack.upper.held_dir("d")
    assert old is not None and old.readable >= 0
    fs.rename("d", "d2")
    _counted_exactly(fs.lookup)
    os.utime(_upper(drv, "d2"), ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    before = os.stat(_upper(drv, "d2"))
    synced = _fsyncs(monkeypatch)
    fs.copyup.ensure_upper("d2/g")
    after = os.stat(_upper(drv, "d2"))
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
    assert synced[-1] == before.st_ino
    new = fs.stack.upper.held_dir("d2")
    assert new is not None and new is not old and new.readable >= 0
    with open(_upper(drv, "d2/g"), "rb") as f:
        assert f.read() == b"lower g"
    _counted_exactly(fs.lookup)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_parents_readable_fd_goes_with_the_directory(drv):
    """Removed (or shed, or evicted), the directory's cached fds go, its readable one with
    them: no fd is left behind."""
    import gc
    fs = drv.fs
    fs.copyup.ensure_upper("d/e")
    gc.collect()
    before, cached = _open_fds(), fs.lookup.cached_fds
    fs.copyup.ensure_upper("d/e/k")  # opens d/e's readable fd, kept
    held = fs.stack.upper.held_dir("d/e")
    assert held is not None and held.readable >= 0
    del held
    gc.collect()
    # every fd left open is one the cache counts (d/e's, upper and lower, and the readable)
    assert _open_fds() - before == fs.lookup.cached_fds - cached == 3
    fs.unlink("d/e/k")
    fs.rmdir("d/e")
    gc.collect()
    assert fs.stack.upper.held_dir("d/e") is None
    assert _open_fds() - before == fs.lookup.cached_fds - cached  # (all three gone with it)
    _counted_exactly(fs.lookup)
    fs.copyup.ensure_upper("d/h")
    fs.lookup.shed_fds()
    gc.collect()
    assert fs.lookup.cached_fds == 0
    assert fs.stack.upper.held_dir("d") is None


@pytest.mark.parametrize("slack", [1, 2, 4])
def test_copy_ups_at_the_fd_limit(tmp_path, slack):
    """Copy-ups into many directories with ``slack`` fds free under the process's limit: the
    readable fds kept of their parents go with the cache when it is shed (``retrying``),
    so no copy-up fails with EMFILE where one did not before."""
    import resource
    helpers.require("root")
    lower = tmp_path / "lower"
    for i in range(8):
        (lower / f"d{i}").mkdir(parents=True)
        for j in range(3):
            (lower / f"d{i}" / f"f{j}").write_bytes(b"%d/%d" % (i, j))
    drv = CoreDriver.in_dir(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        drv.fs.lookup.lookup("d0")  # (the root's node, cached)
        resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + slack, hard))
        for i in range(8):
            for j in range(3):
                drv.fs.copyup.ensure_upper(f"d{i}/f{j}")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        drv.close()
    for i in range(8):
        for j in range(3):
            with open(tmp_path / "upper" / f"d{i}" / f"f{j}", "rb") as f:
                assert f.read() == b"%d/%d" % (i, j)


def _state(path: str, lower: str) -> dict:
    """What a copy-up leaves of a file: content, mode, owner, times (the lower's), xattrs
    (origin compared by presence: it names the source)."""
    st, lst = os.lstat(path), os.lstat(lower)
    names = sorted(os.listxattr(path, follow_symlinks=False))
    with open(path, "rb") as f:
        data = f.read()
    return {"data": data, "mode": st.st_mode, "owner": (st.st_uid, st.st_gid),
            "times": (st.st_atime_ns, st.st_mtime_ns) == (lst.st_atime_ns, lst.st_mtime_ns),
            "xattrs": names}


def test_a_copy_up_whose_parent_is_not_cached_leaves_the_same_copy(drv, monkeypatch):
    """The steps through held fds (the upper parent's, ``workdir/work``'s) and the steps by
    path where no cache holds the parent (evicted) make the same copy, keep the parent's
    times and fsync the same objects."""
    fs = drv.fs
    fs.copyup.ensure_upper("d/f")  # (d copied up; d/f through the held fds)
    upper = fs.stack.upper
    os.utime(_upper(drv, "d"), ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    before = os.stat(_upper(drv, "d"))
    synced = _fsyncs(monkeypatch)
    fs.copyup.ensure_upper("d/g")
    held_syncs = list(synced)
    synced.clear()
    real = upper.dirs
    monkeypatch.setattr(upper, "dirs", lambda rel: None if rel == "d" else real(rel))
    fs.copyup.ensure_upper("d/h")
    assert synced == [os.stat(_upper(drv, "d/h")).st_ino, before.st_ino]
    assert held_syncs == [os.stat(_upper(drv, "d/g")).st_ino, before.st_ino]
    after = os.stat(_upper(drv, "d"))
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
    lower = os.path.join(str(drv.fs.stack.lowers[0].path), "d")
    got = {n: _state(_upper(drv, "d/" + n), os.path.join(lower, n)) for n in "fgh"}
    for n in "fgh":
        got[n]["data"] = got[n]["data"].replace(n.encode(), b"?")
    assert got["f"] == got["g"] == got["h"]
    assert fs.lookup.lookup("d/h").upper is not None
