"""Opening again a file whose name went, through ``/proc/self/fd/N`` (or ``/dev/fd/N``).

An open file with no name left (unlinked, renamed over, an ``O_TMPFILE`` file never linked)
is opened again by its magic link: the kernel sends OPEN for its nodeid, which overlaypc
answered ENOENT (the node has no path). A plain filesystem and the kernel overlay open it:
``O_TMPFILE`` then a read-only reopen, ``open("/dev/stdin")`` of an unlinked file, test
harnesses. Checked here:

- differentially against the kernel overlay (``kernel_mount``), each side over its own copy
  of one lower: reopens of an unlinked upper file (read, write, ``O_TRUNC``, ``/dev/fd``), a
  lower file opened for writing (copied up) then unlinked, an unlinked lower file and one
  renamed over (read-only reopens read the lower data; a reopen for writing answers as the
  kernel does: ``EEXIST``, its copy-up finds the name taken), an upper file renamed over,
  an ``O_TMPFILE`` file (reopened, then linked through the new fd), a metacopy file and
  lower hard links under ``index=on``: every answer, what each fd reads and ``fstat``
  shows, the merged tree after, and the lower left as it was;
- in-process (``core_driver``): the new handle is one of the same inode (a copy-up or a
  write through any handle is seen through it), ``O_TRUNC`` empties the upper file, the
  open-file budget counts the reopen, a handle left on an older backing
  (``handles=bind-at-open``) is never reopened (the lower file is never written).
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

import pytest

import helpers
from core_driver import REQ, CoreDriver, Walker
from test_nameless_file_xattrs import _open_unlinked
from upper_support import is_whiteout, on_both, overlay_stats, stack_options

_libc = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH = 0x1000

LOWER = {"lo": "lower lo\n", "lorw": "lower rw\n", "over": "lower over\n",
         "mc": "lower metacopy\n", "hl": "hard link\n", "hl2": helpers.HardLink("hl"),
         "d/keep": "keep\n"}


def _err(e: OSError) -> str:
    return errno.errorcode[e.errno]


class _Run:
    """One side's scenario: answers in ``out``, every fd it opened closed at the end."""

    def __init__(self, m: str) -> None:
        self.m = m
        self.out: list = []
        self.fds: list[int] = []

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags, mode)
        self.fds.append(fd)
        return fd

    def reopen(self, label: str, fd: int, flags: int, via: str = "/proc/self/fd") -> int | None:
        """``open(via/fd, flags)``: the new fd, or None (the errno is recorded)."""
        try:
            new = self.open(f"{via}/{fd}", flags)
        except OSError as e:
            self.out.append((label, _err(e)))
            return None
        self.out.append((label, "ok"))
        return new

    def fstat(self, label: str, *fds: int) -> None:
        self.out.append((label, [_fstat(fd) for fd in fds]))

    def read(self, label: str, *fds: int) -> None:
        self.out.append((label, [os.pread(fd, 100, 0) for fd in fds]))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _fstat(fd: int) -> tuple:
    st = os.fstat(fd)
    return oct(st.st_mode), st.st_nlink, st.st_size


def scenario(m: str) -> list:
    """Every reopen case on mount ``m``."""
    r = _Run(m)
    try:
        # an upper file, unlinked: read, write, O_TRUNC, /dev/fd
        f = r.open(f"{m}/new", os.O_CREAT | os.O_RDWR)
        os.write(f, b"upper data")
        os.unlink(f"{m}/new")
        ro = r.reopen("upper ro", f, os.O_RDONLY)
        rw = r.reopen("upper rw", f, os.O_RDWR)
        if ro is not None and rw is not None:
            os.pwrite(rw, b"UP", 0)
            r.read("upper after write", f, ro, rw)
            r.fstat("upper fstat", f, ro, rw)
        tr = r.reopen("upper trunc", f, os.O_WRONLY | os.O_TRUNC)
        if tr is not None:
            r.fstat("upper truncated", f, tr)
            os.write(tr, b"t")
            r.read("upper after trunc", f)
        dev = r.reopen("upper /dev/fd", f, os.O_RDONLY, via="/dev/fd")
        if dev is not None:
            r.read("upper via /dev/fd", dev)
        # a lower file opened for writing (copied up by the open), then unlinked
        w = r.open(f"{m}/lorw", os.O_RDWR)
        os.unlink(f"{m}/lorw")
        ro = r.reopen("copied ro", w, os.O_RDONLY)
        if ro is not None:
            os.pwrite(w, b"RW", 0)
            r.read("copied seen", ro)
            rw = r.reopen("copied rw", w, os.O_RDWR | os.O_TRUNC)
            if rw is not None:
                os.write(rw, b"again")
                r.read("copied trunc seen", w, ro)
                r.fstat("copied fstat", w, rw)
        # a lower file opened read-only, unlinked (a whiteout now)
        lo = r.open(f"{m}/lo", os.O_RDONLY)
        os.unlink(f"{m}/lo")
        ro = r.reopen("lower ro", lo, os.O_RDONLY)
        if ro is not None:
            r.read("lower read", ro)
            r.fstat("lower fstat", lo, ro)  # (the lower file's link count, 1)
        r.reopen("lower rw", lo, os.O_RDWR)
        r.reopen("lower trunc", lo, os.O_WRONLY | os.O_TRUNC)
        r.read("lower unchanged", lo)
        # a lower file renamed over
        ov = r.open(f"{m}/over", os.O_RDONLY)
        with open(f"{m}/newover", "w") as g:
            g.write("replacement\n")
        os.rename(f"{m}/newover", f"{m}/over")
        ro = r.reopen("over ro", ov, os.O_RDONLY)
        if ro is not None:
            r.read("over read", ro)
        r.reopen("over rw", ov, os.O_RDWR)
        # an upper file renamed over
        u = r.open(f"{m}/uo", os.O_CREAT | os.O_RDWR)
        os.write(u, b"upper over")
        with open(f"{m}/newuo", "w") as g:
            g.write("replacement\n")
        os.rename(f"{m}/newuo", f"{m}/uo")
        rw = r.reopen("upper over rw", u, os.O_RDWR)
        if rw is not None:
            os.pwrite(rw, b"XX", 0)
            r.read("upper over seen", u, rw)
        # an O_TMPFILE file: reopened read-only and for writing, then linked through the
        # new fd
        t = r.open(m, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.write(t, b"tmp data")
        ro = r.reopen("tmp ro", t, os.O_RDONLY)
        rw = r.reopen("tmp rw", t, os.O_RDWR)
        if ro is not None and rw is not None:
            os.pwrite(rw, b"TM", 0)
            r.read("tmp seen", t, ro)
            r.fstat("tmp fstat", t, ro, rw)
            if _libc.linkat(rw, b"", -100, os.fsencode(f"{m}/linked"), _AT_EMPTY_PATH) < 0:
                r.out.append(("tmp link", errno.errorcode[ctypes.get_errno()]))
            else:
                r.out.append(("tmp link", "ok", _fstat(t), Path(f"{m}/linked").read_bytes()))
        # a chmodded lower file (a metacopy upper under metacopy=on), unlinked
        os.chmod(f"{m}/mc", 0o640)
        mc = r.open(f"{m}/mc", os.O_RDONLY)
        os.unlink(f"{m}/mc")
        ro = r.reopen("meta ro", mc, os.O_RDONLY)
        if ro is not None:
            r.read("meta read", ro)
            r.fstat("meta fstat", mc, ro)
        # (metacopy=on: its data still below, copied into the unlinked upper file first)
        rw = r.reopen("meta rw", mc, os.O_RDWR)
        if rw is not None:
            os.pwrite(rw, b"MC", 0)
            r.read("meta seen", mc, rw, *(() if ro is None else (ro,)))
        # a lower hard link, unlinked while open (index=on: one inode with hl2)
        h = r.open(f"{m}/hl", os.O_RDONLY)
        os.unlink(f"{m}/hl")
        ro = r.reopen("link ro", h, os.O_RDONLY)
        if ro is not None:
            r.read("link read", ro)
        rw = r.reopen("link rw", h, os.O_RDWR)
        if rw is not None:
            os.pwrite(rw, b"HL", 0)
            r.read("link seen", h, rw)
            r.out.append(("link other name", Path(f"{m}/hl2").read_bytes()))
        r.out.append(("tree", sorted(os.listdir(m))))
        return r.out
    finally:
        r.close()


RUNS = {"plain": ("", ()), "index": ("index=on", ("index=on",)),
        "metacopy": ("metacopy=on,redirect_dir=on", ("redirect_dir=on", "metacopy=on"))}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_reopen_against_the_kernel_overlay(run, tmp_path, overlay_mount, kernel_mount):
    """Every reopen of ``scenario`` answers, reads and shows as on the kernel overlay; the
    merged trees match and the lowers are unchanged. Before: every reopen answered ENOENT."""
    ours_opts, kernel_opts = RUNS[run]
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ours_opts,
                           kernel_opts, scenario)
    assert ("upper ro", "ok") in kernel and ("lower rw", "EEXIST") in kernel  # (the oracle)
    for k, o in zip(kernel, ours):
        assert o == k
    assert ours == kernel


def test_metacopy_data_below_is_copied_in_for_writing(tmp_path, overlay_mount):
    """A metacopy file whose data is still below, unlinked while open: a read-only reopen
    reads the lower data; one for writing copies the data into the unlinked upper file
    first, as the kernel overlay does (``CopyUp.copy_data_nameless``): the write is read
    through every fd, the lower never changes, and nothing is left in the layers once the
    fds are closed. Before: EROFS (nameless21)."""
    lower = helpers.build_layer(tmp_path / "lower", {"mc": "lower metacopy\n"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work, "metacopy=on,redirect_dir=on")).path
    os.chmod(m / "mc", 0o640)
    fd = os.open(m / "mc", os.O_RDONLY)
    try:
        os.unlink(m / "mc")
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            assert os.pread(ro, 100, 0) == b"lower metacopy\n"
            assert stat.S_IMODE(os.fstat(ro).st_mode) == 0o640 and os.fstat(ro).st_nlink == 0
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                os.pwrite(rw, b"MC", 0)
                for each in (fd, ro, rw):
                    assert os.pread(each, 100, 0) == b"MCwer metacopy\n"
                    assert stat.S_IMODE(os.fstat(each).st_mode) == 0o640
            finally:
                os.close(rw)
        finally:
            os.close(ro)
    finally:
        os.close(fd)
    assert (lower / "mc").read_bytes() == b"lower metacopy\n"
    assert os.listdir(upper) == ["mc"] and is_whiteout(upper / "mc")
    assert os.listdir(work / "work") == []


def test_an_upper_reopen_passes_through(tmp_path, overlay_mount):
    """An unlinked upper file reopened passes through as its first open does (the same
    backing file: the kernel refuses a second backing for one inode with EIO), and a write
    through the reopened fd is read through the first."""
    lower = helpers.build_layer(tmp_path / "lower", {"keep": "k\n"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work)).path
    fd = os.open(m / "new", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"upper data")
        os.unlink(m / "new")
        before = overlay_stats(m)["passthrough_opens"]
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            os.pwrite(again, b"UP", 0)
            assert os.pread(fd, 100, 0) == b"UPper data"
        finally:
            os.close(again)
        assert before >= 1 and overlay_stats(m)["passthrough_opens"] == before + 1
    finally:
        os.close(fd)


# -- in-process (core_driver) ---------------------------------------------------------------
def _reopen(drv: CoreDriver, nodeid: int, flags: int) -> int:
    """OPEN of ``nodeid`` as the kernel sends it for a magic link."""
    fh = drv.ops.open(REQ, nodeid, flags).fh
    drv._open[fh] = nodeid
    return fh


def test_a_reopen_is_a_handle_of_the_same_inode(tmp_path):
    """Open read-only (on the lower), open for writing (copied up), unlink: a reopen
    through OPEN of the node is a new handle of that inode on the upper file; a write
    through any handle is read through every other one; O_TRUNC empties the upper file
    and moves the data version (no kept cache)."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        w = Walker(drv)
        fro = w.open("f", os.O_RDONLY)
        nodeid, frw = _open_unlinked(drv, "f", os.O_RDWR)
        again = _reopen(drv, nodeid, os.O_RDONLY)
        assert drv.fs.handles.get(again).inode is drv.fs.handles.get(frw).inode
        assert drv.write(frw, b"NEW", 0) == 3
        assert drv.read(again, 100, 0) == drv.read(fro, 100, 0) == b"NEWer data\n"
        inode = drv.fs.handles.get(frw).inode
        version = inode.data_version
        cut = _reopen(drv, nodeid, os.O_WRONLY | os.O_TRUNC)
        assert inode.data_version != version
        assert drv.fstat(again).size == 0 and drv.getattr(drv.root()).nlink >= 1
        assert drv.ops.getattr(REQ, nodeid).attr.nlink == 0
        assert drv.write(cut, b"cut", 0) == 3
        assert drv.read(fro, 100, 0) == b"cut"
        assert (tmp_path / "lower" / "f").read_bytes() == b"lower data\n"
        for fh in (fro, frw, again, cut):
            drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_a_nameless_lower_file_reopens_read_only_only(tmp_path):
    """An unlinked lower file: a read-only reopen reads the lower data; one for writing
    answers EEXIST (the kernel overlay's copy-up finds its name taken by the whiteout) and
    leaves no handle, no upper file, the lower as it was."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        nodeid, fh = _open_unlinked(drv, "f", os.O_RDONLY)
        again = _reopen(drv, nodeid, os.O_RDONLY)
        assert drv.read(again, 100, 0) == b"lower data\n"
        handles = len(drv.fs.handles)
        for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                _reopen(drv, nodeid, flags)
            assert e.value.errno == errno.EEXIST
        assert len(drv.fs.handles) == handles
        assert is_whiteout(tmp_path / "upper" / "f")
        assert (tmp_path / "lower" / "f").read_bytes() == b"lower data\n"
        drv.release(again)
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_a_reopen_counts_in_the_open_file_budget(tmp_path):
    """With open files holding their whole share of fds, the reopen answers ENFILE."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        nodeid, fh = _open_unlinked(drv, "f", os.O_RDWR)
        again = _reopen(drv, nodeid, os.O_RDONLY)
        assert drv.fs.open_fds() == 2
        drv.fs.open_file_fds = 2
        with pytest.raises(OSError) as e:
            _reopen(drv, nodeid, os.O_RDONLY)
        assert e.value.errno == errno.ENFILE
        drv.release(again)
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_a_handle_left_on_the_lower_is_never_reopened(tmp_path):
    """``handles=bind-at-open``: a read-only handle stays on the lower file after the copy-up
    a writer made. With only that handle left open on the unlinked file, a reopen for
    writing never goes through it (it would write the lower file): ENOENT, no handle."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path, handles="bind-at-open")
    try:
        w = Walker(drv)
        fro = w.open("f", os.O_RDONLY)
        nodeid, frw = _open_unlinked(drv, "f", os.O_RDWR)
        drv.release(frw)
        handles = len(drv.fs.handles)
        with pytest.raises(OSError) as e:
            _reopen(drv, nodeid, os.O_RDWR)
        assert e.value.errno == errno.ENOENT
        assert len(drv.fs.handles) == handles
        assert (tmp_path / "lower" / "f").read_bytes() == b"lower data\n"
        drv.release(fro)
        drv.settle()
    finally:
        drv.close()
