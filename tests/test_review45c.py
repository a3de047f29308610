"""review45c: review of parity45 (a malformed redirect fails the lookup, EINVAL/EACCES;
redirect_dir=nofollow refuses a redirected directory, EPERM; a metacopy file's data
copy-up moves its mtime), with the kernel overlay as the oracle.

- Defect found: a listing (READDIRPLUS) gave the attributes of a directory whose
  lookup fails, so the kernel made its dentry with no LOOKUP, and ``stat`` of it then
  succeeded where the kernel's fails: an empty ``redirect`` value (read as none:
  ``if getxattr(...)``), and any redirect under ``redirect_dir=nofollow`` (not read at
  all there) (``test_listed_then_looked_up_as_the_kernel``).
- Defect found: the data copy-up's invalidation of the kernel's cached attributes is
  queued, and an ``fstat``/``stat`` right after the open for writing showed the old mtime
  (68 of 300 with the other CPU busy; the kernel: none): metacopy files now get attribute
  timeout 0 (``test_metacopy_open_for_writing_then_stat_as_the_kernel``). Since notify49
  that invalidation is written before the open's reply, and fix50 gave them the mount's
  timeout back (``test_metacopy_data_copy_up_through_another_handle_then_stat_as_the_kernel``).
- Defect found: a metacopy file of holes only got a new mtime at its data copy-up (a
  truncate of the copy to the size it had), the kernel's keeps it
  (``test_metacopy_data_copy_up_of_holes_moves_mtime_as_the_kernel``).
- Checked, no defect (scratch probes against the kernel): a malformed redirect does not
  fail the listing of its parent, nor other names; rmdir/rename/unlink of the bad entry fail
  as the kernel's (EINVAL/EACCES); under nofollow an opaque directory's, a file's, the
  root's redirect are not read, an upper directory over a lower file's is (EPERM); mtime
  after chown + open for writing, mmap, truncate(2), O_TRUNC, link (old times kept), an
  empty file; renames of a former upper's (kernel-made) renamed metacopy files, hard links
  and directories, with and without index=on (the one difference: overlaypc's link copies
  the data up, documented).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import helpers
from features_support import KERNEL_METACOPY, mount_side, new_stack

pytestmark = [pytest.mark.mount]

#: (redirect_dir, where the directory ``n`` with the redirect is, the redirect's value)
LISTED = {"on-empty-upper": ("on", "upper", b""), "on-empty-lower": ("on", "mid", b""),
          "on-malformed-upper": ("on", "upper", b"a//b"),
          "nofollow-upper": ("nofollow", "upper", b"/x"),
          "nofollow-upper-new": ("nofollow", "upper-new", b"/x"),
          "nofollow-lower": ("nofollow", "mid", b"/x"),
          "nofollow-relative": ("nofollow", "upper", b"x")}


def _attempt(f):
    try:
        return f()
    except OSError as e:
        return errno.errorcode[e.errno]


@pytest.mark.parametrize("case", sorted(LISTED))
def test_listed_then_looked_up_as_the_kernel(case, tmp_path, overlay_mount, kernel_mount):
    """The parent listed first (``os.scandir``: READDIRPLUS), then ``n`` looked up."""
    mode, where, value = LISTED[case]
    bottom = helpers.build_layer(tmp_path / "bottom", {"x": {"f": "xf"}, "n": {"own": "o"},
                                                        "k": "k"})
    got = {}
    for side in ("kernel", "ours"):
        mid = helpers.build_layer(tmp_path / f"mid-{side}", {"m": helpers.Dir()})
        s = new_stack([mid, bottom], tmp_path, side)
        path = (mid if where == "mid" else s.upper) / "n"
        path.mkdir()
        os.setxattr(path, "trusted.overlay.redirect", value)
        if where == "upper-new":  # (a name no lower holds)
            os.rename(path, s.upper / "z")
        name = "z" if where == "upper-new" else "n"
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, (f"redirect_dir={mode}",))
        try:
            listed = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(mnt))
            got[side] = (listed, _attempt(lambda: os.lstat(mnt / name).st_mode & 0o170000),
                         _attempt(lambda: sorted(os.listdir(mnt / name))))
        finally:
            unmount()
    assert got["kernel"][1] in ("EINVAL", "EPERM")
    assert got["ours"] == got["kernel"]


T_OLD = 1_000_000_000
#: metacopy files opened for writing, one after the other
OPENED = 300


def _old_mtimes_at_open(mnt) -> list[int]:
    """Each file made a metacopy file (chown), its attributes cached (stat), then opened
    for writing (its data copy-up): the ones whose ``fstat`` or ``stat`` right after still
    showed the old mtime."""
    old = []
    for i in range(OPENED):
        path = mnt / "d" / f"f{i}"
        os.chown(path, 1, 1)
        os.stat(path)
        fd = os.open(path, os.O_WRONLY)
        try:
            if T_OLD in (os.fstat(fd).st_mtime, os.stat(path).st_mtime):
                old.append(i)
        finally:
            os.close(fd)
    return old


def test_metacopy_open_for_writing_then_stat_as_the_kernel(tmp_path, overlay_mount, kernel_mount):
    """The data copy-up at an open for writing moves a metacopy file's mtime (parity45, the
    kernel's); the kernel's cached attributes went through a queued invalidation, which
    could come after the next ``stat``: that one showed the old mtime (some 1 in 12 with
    the other CPU busy). The kernel's shows the new one every time."""
    bottom = helpers.build_layer(tmp_path / "bottom", {"d": {f"f{i}": "data" for i in range(OPENED)}})
    for i in range(OPENED):
        os.utime(bottom / "d" / f"f{i}", (T_OLD, T_OLD))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    got = {}
    try:
        for side in ("kernel", "ours"):
            s = new_stack([bottom], tmp_path, side)
            mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_METACOPY)
            try:
                got[side] = _old_mtimes_at_open(mnt)
            finally:
                unmount()
    finally:
        busy.kill()
        busy.wait()
    assert got["kernel"] == []
    assert got["ours"] == got["kernel"]


#: metacopy files whose data a second open copies up while a first one is open
THROUGH = 20


def _seen_through_the_first_handle(mnt, upper=None) -> list[tuple]:
    """Each file made a metacopy file (chown), opened read-only and its attributes cached
    (``fstat``, ``stat``: the mount's attribute timeout since fix50), then opened for
    writing (its data copy-up) and closed: what the first handle's ``fstat`` and a
    ``stat`` show then (whether the mtime moved, blocks, the two alike), and, given the
    upper, whether that is the copy's mtime."""
    seen = []
    for i in range(THROUGH):
        path = mnt / "d" / f"f{i}"
        os.chown(path, 1, 1)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fstat(fd)
            os.stat(path)
            os.close(os.open(path, os.O_WRONLY))
            by_fd, by_name = os.fstat(fd), os.stat(path)
        finally:
            os.close(fd)
        same = [(s.st_mtime_ns, s.st_ctime_ns, s.st_blocks, s.st_size) for s in (by_fd, by_name)]
        copied = upper is None or os.stat(upper / "d" / f"f{i}").st_mtime_ns == by_fd.st_mtime_ns
        seen.append((by_fd.st_mtime != T_OLD, same[0] == same[1], by_fd.st_size, copied))
    return seen


def test_metacopy_data_copy_up_through_another_handle_then_stat_as_the_kernel(
        tmp_path, overlay_mount, kernel_mount):
    """A metacopy file's attributes are cached for the mount's timeout again (fix50; 0
    from review45c until then): its data copy-up invalidates them before its reply
    (notify49), so a handle opened before, and the name, show the copy's mtime right after
    the open for writing that copied it, as the kernel's."""
    bottom = helpers.build_layer(tmp_path / "bottom",
                                 {"d": {f"f{i}": "data" * 1000 for i in range(THROUGH)}})
    for i in range(THROUGH):
        os.utime(bottom / "d" / f"f{i}", (T_OLD, T_OLD))
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([bottom], tmp_path, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_METACOPY)
        try:
            got[side] = _seen_through_the_first_handle(mnt, s.upper)
        finally:
            unmount()
    assert got["kernel"] == [(True, True, 4000, True)] * THROUGH
    assert got["ours"] == got["kernel"]


#: lower files of a metacopy file opened for writing, no byte written: (size, where data is)
SPARSE = {"holes-only": (1 << 20, None), "data-then-hole": (4 << 20, 1 << 20),
          "empty": (0, None), "small": (5, 0)}


@pytest.mark.parametrize("case", sorted(SPARSE))
def test_metacopy_data_copy_up_of_holes_moves_mtime_as_the_kernel(case, tmp_path, overlay_mount,
                                                                  kernel_mount):
    """The data copy-up of a metacopy file whose data are all holes writes nothing (the
    kernel's skips holes): its mtime stays, as the kernel's on a filesystem without
    reflinks (with one, both clone the file, which moves it). overlaypc truncated the copy to
    its size at the end, which it had already, and that moved the mtime."""
    size, data_at = SPARSE[case]
    bottom = tmp_path / "bottom"
    bottom.mkdir()
    with open(bottom / "f", "wb") as f:
        if data_at is not None:
            f.seek(data_at)
            f.write(b"data")
        f.truncate(size)
    os.utime(bottom / "f", (T_OLD, T_OLD))
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([bottom], tmp_path, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_METACOPY)
        try:
            os.chown(mnt / "f", 1, 1)
            os.close(os.open(mnt / "f", os.O_WRONLY))
            st = os.stat(mnt / "f")
            got[side] = (st.st_mtime == T_OLD, st.st_size, (mnt / "f").read_bytes().strip(b"\0"))
        finally:
            unmount()
    assert got["ours"] == got["kernel"]
