"""Which copy-up a change makes first, decided once by the core (``Attributes.copy_up_for_setattr``,
``copy_up_for_xattr``, ``Files.copy_up_for_open``), driven without FUSE. The decision per
case, the change under the namespace lock refusing its copy-up with that copy-up to run
(``CopyUpFirst``), and a change whose copy-up nothing announced: run by ``OverlayOps``
without the namespace lock, then the change again (never under the lock)."""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc.copyup import CopyUpFirst
from overlaypc import faults
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr
from overlaypc.idmap import IdMap

METACOPY_XATTR = "trusted.overlay.metacopy"


def _driver(tmp_path, **options) -> CoreDriver:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "f").write_bytes(b"data")
    os.mkfifo(lower / "fifo")
    return CoreDriver.in_dir(tmp_path, **options)


@pytest.fixture
def drv(tmp_path):
    d = _driver(tmp_path)
    yield d
    d.close()


@pytest.fixture
def meta(tmp_path):
    """A metacopy=on driver (trusted.* xattrs: root)."""
    helpers.require("root")
    d = _driver(tmp_path, metacopy=True)
    yield d
    d.close()


def _upper(tmp_path, rel: str) -> os.stat_result | None:
    try:
        return os.lstat(tmp_path / "upper" / rel)
    except FileNotFoundError:
        return None


def _has_metacopy(tmp_path, rel: str) -> bool:
    return METACOPY_XATTR in os.listxattr(tmp_path / "upper" / rel, follow_symlinks=False)


# -- the decision, per case ------------------------------------------------------------------
def test_chmod_of_a_lower_file_copies_up_its_metadata(meta, tmp_path):
    copy = meta.fs.attrs.copy_up_for_setattr("f")
    assert copy is not None and _upper(tmp_path, "f") is None  # (deciding copies nothing)
    copy()
    assert _upper(tmp_path, "f") is not None and _has_metacopy(tmp_path, "f")
    assert meta.fs.attrs.copy_up_for_setattr("f") is None  # done: none left


def test_truncate_by_path_of_a_metacopy_file_copies_up_its_data(meta, tmp_path):
    meta.fs.attrs.copy_up_for_setattr("f")()
    assert meta.fs.attrs.copy_up_for_setattr("f") is None  # a chmod: nothing more
    copy = meta.fs.attrs.copy_up_for_setattr("f", data=True)
    assert copy is not None and _has_metacopy(tmp_path, "f")
    copy()
    assert not _has_metacopy(tmp_path, "f")
    assert (tmp_path / "upper" / "f").read_bytes() == b"data"
    assert meta.fs.attrs.copy_up_for_setattr("f", data=True) is None


def test_open_for_writing_of_a_metacopy_file_copies_up_its_data(meta, tmp_path):
    meta.fs.attrs.copy_up_for_setattr("f")()
    files = meta.fs.files
    assert files.copy_up_for_open("f", os.O_RDONLY) is None
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert files.copy_up_for_open("f", flags) is not None, flags
    files.copy_up_for_open("f", os.O_WRONLY)()
    assert not _has_metacopy(tmp_path, "f")
    assert files.copy_up_for_open("f", os.O_WRONLY) is None


def test_open(drv, tmp_path):
    files = drv.fs.files
    assert files.copy_up_for_open("f", os.O_RDONLY) is None      # read-only: none
    assert files.copy_up_for_open("d", os.O_WRONLY) is None      # a directory: EISDIR first
    assert files.copy_up_for_open("absent", os.O_WRONLY) is None  # ENOENT first
    copy = files.copy_up_for_open("f", os.O_WRONLY)               # a lower file: with its data
    assert copy is not None
    copy()
    assert (tmp_path / "upper" / "f").read_bytes() == b"data"
    assert files.copy_up_for_open("f", os.O_WRONLY) is None


@pytest.mark.parametrize("index", ["off", "on"])
def test_an_open_with_o_trunc_copies_up_no_data(tmp_path, index):
    """An open that empties a lower file (``O_TRUNC``) copies it up without the data the
    truncate drops (the kernel overlay's copy-up sets the size to 0 for O_TRUNC too), with
    its metadata; the open then truncates it and marks its times. Before: every byte was
    copied, then truncated. A plain open for writing still copies the data."""
    if index == "on":
        helpers.require("root")  # (trusted.* xattrs)
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(b"x" * (1 << 20))
    (lower / "kept").write_bytes(b"kept data")
    os.chmod(lower / "big", 0o640)
    old_mtime = os.stat(lower / "big").st_mtime_ns - 10**9
    os.utime(lower / "big", ns=(old_mtime, old_mtime))
    drv = CoreDriver.in_dir(tmp_path, index=index)
    try:
        root = drv.root()
        fh = drv.open(drv.lookup(root, "big"), os.O_WRONLY | os.O_TRUNC)
        drv.write(fh, b"new", 0)
        drv.release(fh)
        fh = drv.open(drv.lookup(root, "kept"), os.O_WRONLY)
        drv.release(fh)
        ups = drv.fs.stats.copy_ups  # big: no data; kept: its data, by whatever method
        assert (ups["empty"], sum(ups.values())) == (1, 2), ups
        up = tmp_path / "upper"
        assert (up / "big").read_bytes() == b"new"
        st = os.stat(up / "big")
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns > old_mtime) == (0o640, True)
        assert (up / "kept").read_bytes() == b"kept data"
        assert (lower / "big").stat().st_size == 1 << 20
        drv.settle()
    finally:
        drv.close()


def test_an_o_trunc_open_admitted_before_its_copy_up_is_not_refused_after_it(drv, tmp_path):
    """The open-file budget (``room_for_open``: ENFILE once open files hold their share of
    the fd limit, here one file) admits an OPEN once, before anything is done. An open
    with ``O_TRUNC`` of lower ``f`` copies it up empty; while it copies (fault point
    ``copyup.fsync``), another client's open takes the last room. The OPEN must still
    succeed: its empty copy-up hides the lower data, so failing now would lose the data
    for an open that failed. Before: the adapter ran the open again after the copy-up
    (``_at_node``), whose budget check answered ENFILE, and ``f`` read empty."""
    drv.fs.open_file_fds = 1
    root = drv.root()
    other = drv.lookup(root, "d")
    drv.release(drv.create(other, "g", os.O_WRONLY, 0o644)[1])
    g = drv.lookup(other, "g")
    others: list[int] = []

    def another_open(point, *args) -> None:
        if not others:
            others.append(drv.open(g, os.O_RDONLY))
    faults.install("copyup.fsync", another_open)
    try:
        fh = drv.open(drv.lookup(root, "f"), os.O_RDWR | os.O_TRUNC)
    except OSError as e:
        fh = e
    finally:
        faults.configure(None)
    assert others, "the other open never ran during the copy-up"
    drv.release(others[0])
    assert (tmp_path / "upper" / "f").read_bytes() == b""  # the empty copy-up is done
    assert not isinstance(fh, OSError), f"O_TRUNC open failed after its copy-up: {fh}"
    drv.write(fh, b"new", 0)
    drv.release(fh)
    assert (tmp_path / "upper" / "f").read_bytes() == b"new"
    drv.settle()


def test_the_window_left_an_o_trunc_open_failing_at_its_upper_open(drv, tmp_path):
    """What README's copy-up section says is left: an ``O_TRUNC`` open of a lower file whose
    open of the upper copy fails (fault point ``files.opening``, standing for EMFILE left
    after the caches shed their fds, or EIO) answers the error, and its empty copy-up
    stays: the file reads empty (the lower file keeps its data, hidden). A plain open for
    writing copies the data, so its failure there loses nothing."""
    root = drv.root()
    faults.configure("files.opening=eio")
    try:
        with pytest.raises(OSError) as failed:
            drv.open(drv.lookup(root, "f"), os.O_WRONLY | os.O_TRUNC)
    finally:
        faults.configure(None)
    assert failed.value.errno == errno.EIO
    assert (tmp_path / "upper" / "f").read_bytes() == b""
    assert (tmp_path / "lower" / "f").read_bytes() == b"data"
    drv.settle()


def test_kill_flag_without_changes(drv, tmp_path):
    attrs = drv.fs.attrs
    # a lower regular file is copied up before its privileges are looked at; a FIFO and a
    # directory have none to strip
    assert attrs.copy_up_for_setattr("f", changes=False, kill=True) is not None
    assert attrs.copy_up_for_setattr("fifo", changes=False, kill=True) is None
    assert attrs.copy_up_for_setattr("d", changes=False, kill=True) is None
    assert attrs.copy_up_for_setattr("f", changes=False) is None  # nothing at all
    assert _upper(tmp_path, "f") is None


def test_a_chown_outside_the_mapping_fails_before_its_copy_up(tmp_path):
    d = _driver(tmp_path, uidmapping=IdMap.parse("0:0:100"))
    try:
        with pytest.raises(OSError) as e:
            d.fs.attrs.copy_up_for_setattr("f", kill=True, ids=(500, -1))
        assert e.value.errno == errno.EOVERFLOW
        assert _upper(tmp_path, "f") is None
    finally:
        d.close()


def test_changes_of_other_objects(drv, tmp_path):
    attrs = drv.fs.attrs
    assert attrs.copy_up_for_setattr("absent") is None            # ENOENT first
    assert attrs.copy_up_for_setattr("d") is not None             # a directory's chmod
    assert attrs.copy_up_for_setattr("fifo") is not None
    assert attrs.copy_up_for_setattr("") is None                  # the root is in the upper


def test_xattr_changes(drv, tmp_path):
    attrs = drv.fs.attrs
    assert attrs.copy_up_for_xattr("f", "user.x") is not None
    assert attrs.copy_up_for_xattr("f", "trusted.overlay.origin") is None  # EPERM first
    assert attrs.copy_up_for_xattr("absent", "user.x") is None
    # a removed xattr must exist: ENODATA, nothing copied up
    with pytest.raises(OSError) as e:
        attrs.copy_up_for_xattr("f", "user.x", removed=True)
    assert e.value.errno == errno.ENODATA
    assert _upper(tmp_path, "f") is None


def test_read_only_mount_decides_none(tmp_path):
    d = _driver(tmp_path, readonly=True)
    try:
        assert d.fs.attrs.copy_up_for_setattr("f") is None
        assert d.fs.files.copy_up_for_open("f", os.O_WRONLY) is None
        with pytest.raises(OSError) as e:
            d.fs.setattr("f", mode=0o600)
        assert e.value.errno == errno.EROFS
    finally:
        d.close()


# -- the change refuses its copy-up under the namespace lock --------------------------------
@pytest.mark.parametrize("change", ["setattr", "chmod", "truncate", "open", "setxattr",
                                    "removexattr"])
def test_a_change_under_the_namespace_lock_hands_back_its_copy_up(drv, tmp_path, change):
    """Under ``CopyUp.refusing`` (``OverlayOps._at_node``'s hold) a change that needs a
    copy-up changes nothing and raises ``CopyUpFirst`` with the copy-up; run without the
    lock, the change then finds it done."""
    fs = drv.fs
    os.setxattr(tmp_path / "lower" / "f", "user.x", b"1")
    run = {
        "setattr": lambda: fs.setattr("f", mode=0o600),
        "chmod": lambda: fs.chmod("f", 0o600),
        "truncate": lambda: fs.truncate("f", 1),
        "open": lambda: fs.release(fs.open("f", os.O_WRONLY).fh),
        "setxattr": lambda: fs.setxattr("f", "user.y", b"2"),
        "removexattr": lambda: fs.removexattr("f", "user.x"),
    }[change]
    with fs.ns_lock, fs.copyup.refusing(here=False):
        with pytest.raises(CopyUpFirst) as first:
            run()
    assert first.value.copy is not None
    assert _upper(tmp_path, "f") is None  # nothing copied, nothing changed
    first.value.copy()
    assert _upper(tmp_path, "f") is not None
    with fs.ns_lock, fs.copyup.refusing(here=False):
        run()  # nothing left to copy up


def test_refusing_nests_and_runs_here_when_the_stripe_lock_is_free(drv, tmp_path):
    copyup = drv.fs.copyup
    with copyup.refusing(here=False):
        with copyup.refusing():
            pass
        with pytest.raises(CopyUpFirst) as first:
            copyup.ensure_upper("f")
        assert first.value.copy is not None
    stripe = copyup._stripes[hash("d") % len(copyup._stripes)]
    with drv.fs.ns_lock, copyup.refusing():
        with stripe:  # (another copy-up holds it): refused, with the copy-up to run
            with pytest.raises(CopyUpFirst) as first:
                copyup.ensure_data("d")
        assert _upper(tmp_path, "d") is None
        copyup.ensure_upper("d")  # free: runs here
    assert _upper(tmp_path, "d") is not None
    first.value.copy()  # (nothing left)
    copyup.ensure_upper("f")  # refused no more
    assert _upper(tmp_path, "f") is not None


# -- a copy-up nothing announced: never under the namespace lock ----------------------------
@pytest.fixture
def copy_ups(drv, monkeypatch):
    """Whether the namespace lock was held by the copying thread, per object copy-up."""
    held = []
    copyup = drv.fs.copyup
    real = copyup._copy_one

    def recording(rel, *args, **kwargs):
        held.append((rel, drv.fs.ns_lock._is_owned()))
        return real(rel, *args, **kwargs)

    monkeypatch.setattr(copyup, "_copy_one", recording)
    return held


def test_a_copy_up_the_adapter_was_not_told_of_runs_without_the_namespace_lock(
        drv, tmp_path, monkeypatch, copy_ups):
    """A change of the core that copies up more than any decision announced (here: a kill
    flag on a lower FIFO, which nothing copies up today, as if a rule for it came
    later): the request runs that copy-up without the namespace lock (its stripe lock is
    taken before the namespace lock everywhere else), then the change, and succeeds.
    Before, the adapter's own decision ran the change under the lock, copy-up and all."""
    attrs = drv.fs.attrs
    real = attrs.setattr

    def diverged(rel, **kwargs):
        if kwargs.get("writer") is not None:
            drv.fs.copyup.ensure_upper(rel, metadata_only=True)
        return real(rel, **kwargs)

    monkeypatch.setattr(attrs, "setattr", diverged)
    node = drv.lookup(drv.root(), "fifo")
    sa = SetAttr(p.FATTR_KILL_SUIDGID, None, 0, 0, 0, 0, 0, 0)
    drv.ops.setattr(REQ, node.nodeid, sa)
    st = _upper(tmp_path, "fifo")
    assert st is not None and stat.S_ISFIFO(st.st_mode)
    assert copy_ups == [("fifo", False)]


def test_chmod_of_a_lower_file_through_the_adapter_copies_up_unlocked(drv, tmp_path, copy_ups):
    node = drv.lookup(drv.root(), "f")
    assert stat.S_IMODE(drv.setattr(node, mode=0o600).mode) == 0o600
    assert stat.S_IMODE(_upper(tmp_path, "f").st_mode) == 0o600
    assert copy_ups == [("f", False)]
