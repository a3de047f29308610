"""Scenarios of the kernel overlay maintainers' regression tests (fstests' ``tests/overlay``),
re-expressed here against the kernel overlay and overlaypc on the same layers. The code is
ours; each test names the fstests scenario it restates. Scenarios that only exercise kernel
mount mechanics, ``nfs_export`` file handles, ``fsck.overlay`` or features overlaypc does not
have are not here (the fstests46 report lists them).

- overlay/042: upper hard links copied up with ``index=off`` from a lower file that gains
  lower hard links while unmounted, then mounted with ``index=on``: the non-indexed upper
  inode and the indexed one are two files, so they must show two inode numbers
  (``test_non_indexed_upper_keeps_its_own_inode_number``).
- overlay/059 and overlay/049: an upper copied with ``cp -a`` while unmounted holds two
  files naming one copy-up origin, and two directories redirected to one lower directory.
  Two objects must never show one ``st_dev``/``st_ino`` (``diff`` and ``cmp`` then call
  them one file): the kernel fails the lookup of the second (``ESTALE``), overlaypc shows
  it with its own upper number (``test_duplicated_origin_never_shares_an_inode_number``);
  so does a copy of a copied-up directory, at every request (LOOKUP, GETATTR, READDIRPLUS).

Scenarios that pass on overlaypc, kept so that they keep passing:

- overlay/001: lower files of 0 bytes, 4 KiB, and ending at and past 4 GiB (sparse) copy up
  on an open for writing, with their data and without filling their holes
  (``test_copy_up_of_files_past_4_gib``).
- overlay/013: ``truncate`` and an open for writing of a running executable answer
  ``ETXTBSY``, from a lower layer and from the upper (``test_running_executable_is_busy``).
- overlay/028: a ``flock`` and a POSIX lock taken through a read-only fd of a lower file stay
  in force after a write through another fd copies the file up
  (``test_locks_survive_copy_up``).
- overlay/033: the link count of an ``index=on`` lower hard link as names are unlinked,
  linked, covered by renames, with warm and cold dentry caches, and the index entry gone
  with the last name (``test_index_nlink_union_warm_and_cold``).
- overlay/017, overlay/043: ``st_ino`` and ``d_ino`` of every file type stay the same over a
  ``chown -h`` copy-up, a move to another directory, a cache drop and a remount
  (``test_inode_numbers_constant_for_every_type``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
import subprocess
from pathlib import Path

import pytest

import helpers
from features_support import make_lowers, mount_side, new_stack

pytestmark = [pytest.mark.mount]

SIDES = ("kernel", "overlaypc")


def _ino_classes(root: Path, names) -> list[list[str]]:
    """The names grouped by the ``st_ino`` they show (the numbers differ between sides)."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(os.lstat(root / n).st_ino, []).append(n)
    return sorted(sorted(g) for g in groups.values())


def _non_indexed_then_indexed(side, base: Path, layers_factory, overlay_mount, kernel_mount):
    lowers = make_lowers(layers_factory, base, {"l": {"0": b"zero\n"}})
    s = new_stack(lowers, base, side)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=())
    os.link(mnt / "0", mnt / "1")  # copy-up without an index entry; an upper hard link
    unmount()
    os.link(lowers[0] / "0", lowers[0] / "2")  # the origin becomes a lower hard link
    os.link(lowers[0] / "0", lowers[0] / "3")
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=("index=on",))
    os.link(mnt / "2", mnt / "4")  # copy-up of the lower hard link: indexed
    unmount()
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=("index=on",))
    names = ["0", "1", "2", "3", "4"]
    with open(mnt / "0", "a") as f:
        f.write("upper 0\n")
    out = {
        "classes": _ino_classes(mnt, names),
        "nlink": [os.lstat(mnt / n).st_nlink for n in names],
        "data": [(mnt / n).read_bytes() for n in names],
        "d_ino_is_st_ino": sorted((e.name, e.inode() == os.lstat(e.path).st_ino)
                                  for e in os.scandir(mnt)),
    }
    unmount()
    return out


def test_non_indexed_upper_keeps_its_own_inode_number(xfs_dir, layers_factory, overlay_mount,
                                                      kernel_mount):
    """overlay/042. As the kernel's ``ovl_getattr``: the origin's number only for an
    indexed inode or an origin with one link; upper 0 (and its link 1) is neither, so it
    shows its own number, apart from the indexed 2, 3 and 4, whose data it does not share."""
    got = {}
    for side in SIDES:
        (xfs_dir / side).mkdir()
        got[side] = _non_indexed_then_indexed(side, xfs_dir / side, layers_factory,
                                              overlay_mount, kernel_mount)
    ours = got["overlaypc"]
    assert ours["classes"] == [["0", "1"], ["2", "3", "4"]]
    assert ours["data"][0] != ours["data"][2]
    assert ours == got["kernel"]


def _stat_or_stale(path: Path):
    try:
        return os.stat(path)
    except OSError as e:
        assert e.errno == errno.ESTALE, e  # (the kernel's refusal of the second)
        return None


def _duplicated_origins(side, base: Path, layers_factory, overlay_mount, kernel_mount):
    lowers = make_lowers(layers_factory, base, {"l": {"origin": b"", "dir": {"file": b""},
                                                      "copied1": {"file": b""}}})
    s = new_stack(lowers, base, side)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    os.rename(mnt / "origin", mnt / "ref1")  # a copy-up with an origin
    os.utime(mnt / "dir" / "file")
    os.rename(mnt / "dir", mnt / "redirect1")  # a redirected directory, with an origin
    os.chmod(mnt / "copied1", 0o750)  # a copied-up directory, with an origin
    unmount()
    for one, two in (("ref1", "ref2"), ("redirect1", "redirect2"), ("copied1", "copied2")):
        subprocess.run(["cp", "-a", s.upper / one, s.upper / two], check=True)
    (s.upper / "ref1").write_text("right\n")
    (s.upper / "ref2").write_text("wrong\n")
    (s.upper / "redirect1" / "file").write_text("right\n")
    (s.upper / "redirect2" / "file").write_text("wrong\n")
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    out = {}
    for one, two in (("copied1", "copied2"), ("ref1", "ref2"), ("redirect1", "redirect2"),
                     ("redirect1/file", "redirect2/file")):  # (copied1 answered first)
        a, b = _stat_or_stale(mnt / one), _stat_or_stale(mnt / two)
        out[two] = a is not None and b is not None and \
            (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        if side == "overlaypc" and "/" not in two:  # (the kernel's listing fails: ESTALE)
            listed = {e.name: e.inode() for e in os.scandir(mnt)}
            out[two + " d_ino"] = (listed[one], listed[two]) == (a.st_ino, b.st_ino)
        out[two + " diff"] = subprocess.run(["diff", "-q", mnt / one, mnt / two],
                                            capture_output=True).returncode
    # copied2 names copied1's origin without a lower directory at its name (the kernel
    # shows it its own number): the same number at every request, a GETATTR after a change
    # in it (the short one of a cached directory), after a listing, and an open fd's fstat
    listed = {e.name: e.inode() for e in os.scandir(mnt)} if side == "overlaypc" else {}
    numbers = {}
    for name in ("copied1", "copied2"):
        seen = [os.lstat(mnt / name).st_ino]  # (looked up above: a LOOKUP, then cached)
        (mnt / name / "new").write_text("")  # (the kernel drops the directory's attributes)
        seen.append(os.lstat(mnt / name).st_ino)  # GETATTR
        os.unlink(mnt / name / "new")
        fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            seen.append(os.fstat(fd).st_ino)  # GETATTR (no handle for a directory)
        finally:
            os.close(fd)
        if listed:
            seen.append(listed[name])
        numbers[name] = set(seen)
    out["copied2 numbers"] = numbers
    unmount()
    return out


def test_duplicated_origin_never_shares_an_inode_number(xfs_dir, layers_factory, overlay_mount,
                                                        kernel_mount):
    """overlay/059, overlay/049: two upper objects naming one origin never show one inode
    number, and ``diff`` tells them apart (the kernel: it refuses the second, ESTALE, and
    diff fails with status 2)."""
    for side in SIDES:
        (xfs_dir / side).mkdir()
        got = _duplicated_origins(side, xfs_dir / side, layers_factory, overlay_mount,
                                  kernel_mount)
        assert not got["ref2"] and not got["redirect2"] and not got["redirect2/file"], side
        assert got["ref2 diff"] != 0 and got["redirect2 diff"] != 0, side
        numbers = got["copied2 numbers"]
        assert [len(numbers["copied1"]), len(numbers["copied2"])] == [1, 1], (side, numbers)
        assert numbers["copied1"] != numbers["copied2"], side
        assert not got["copied2"] and got["copied2 diff"] != 0, side
        if side == "overlaypc":
            assert got["ref2 d_ino"] and got["redirect2 d_ino"]
            assert got["ref2 diff"] == got["redirect2 diff"] == 1


def _drop_caches(what: str = "3") -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(what)


def test_copy_up_of_files_past_4_gib(xfs_dir, layers_factory, overlay_mount):
    """overlay/001."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"zero_size": b"", "small": b"a" * 4096}})
    ends = {"at_4g": (4 << 30) - 4096, "past_4g": 4 << 30}
    for name, at in ends.items():
        with open(lowers[0] / name, "wb") as f:
            f.seek(at)
            f.write(name.encode() * 512)
    s = new_stack(lowers, xfs_dir, "big")
    m = overlay_mount(s.options())
    for name in ("zero_size", "small", *ends):
        os.close(os.open(m / name, os.O_RDWR))
        assert (s.upper / name).exists(), name
    for name, at in ends.items():
        with open(m / name, "rb") as f:
            f.seek(at)
            assert f.read() == name.encode() * 512
            f.seek(at - 4096)
            assert f.read(4096) == bytes(4096)
        assert os.stat(m / name).st_size == at + 512 * len(name)
        assert os.stat(s.upper / name).st_blocks * 512 < (1 << 20)  # holes kept
    assert (m / "small").read_bytes() == b"a" * 4096 and (m / "zero_size").read_bytes() == b""


@pytest.mark.parametrize("side", SIDES)
def test_running_executable_is_busy(side, xfs_dir, layers_factory, overlay_mount, kernel_mount):
    """overlay/013: both the kernel's and ours answer ETXTBSY (the FUSE inode is the
    executable's: the VFS denies the write access itself)."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {}})
    s = new_stack(lowers, xfs_dir, side)
    shutil.copy("/bin/sleep", lowers[0] / "test_lower")
    shutil.copy("/bin/sleep", s.upper / "test_upper")
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=())
    for name in ("test_lower", "test_upper"):
        proc = subprocess.Popen([mnt / name, "30"])
        try:
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{proc.pid}/exe") != str(mnt / name):
                assert time.monotonic() < deadline, "the executable did not start"
                time.sleep(0.01)
            for change in (lambda: os.truncate(mnt / name, 0),
                           lambda: os.close(os.open(mnt / name, os.O_WRONLY))):
                with pytest.raises(OSError) as e:
                    change()
                assert e.value.errno == errno.ETXTBSY, (side, name)
        finally:
            proc.kill()
            proc.wait()
    assert not (s.upper / "test_lower").exists()  # nothing copied up
    unmount()


def test_locks_survive_copy_up(xfs_dir, layers_factory, overlay_mount):
    """overlay/028: locks belong to the overlay inode, which a copy-up does not change."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"foo": b""}})
    s = new_stack(lowers, xfs_dir, "locks")
    m = overlay_mount(s.options())
    held = os.open(m / "foo", os.O_RDONLY)
    posix = os.open(m / "foo", os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        (m / "foo").write_text("bar\n")  # copies foo up
        assert (s.upper / "foo").read_text() == "bar\n"
        other = os.open(m / "foo", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert e.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
        finally:
            os.close(other)
        fcntl.lockf(posix, fcntl.LOCK_EX)
        pid = os.fork()
        if pid == 0:  # another process: the POSIX lock must stop it
            try:
                fd = os.open(m / "foo", os.O_RDWR)
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os._exit(0)
            except OSError as e:
                os._exit(e.errno)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(posix)
        os.close(held)


def _index_nlink_union(side, base: Path, layers_factory, overlay_mount, kernel_mount) -> list:
    lowers = make_lowers(layers_factory, base, {"l": {"0": b""}})
    for n in "123":
        os.link(lowers[0] / "0", lowers[0] / n)
    out = []
    for temp in ("warm", "cold"):
        s = new_stack(lowers, base, f"{side}-{temp}")
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=("index=on",))

        def report(when, names):
            if temp == "cold":
                _drop_caches("2")
            out.append((temp, when, [(n, os.lstat(mnt / n).st_nlink) for n in names]))

        report("all lower", "0123")
        os.unlink(mnt / "0")
        report("unlink lower", "123")
        os.link(mnt / "3", mnt / "4")
        report("link lower", "1234")
        os.link(mnt / "4", mnt / "5")
        report("link upper", "12345")
        (mnt / "new").write_bytes(b"")
        os.rename(mnt / "new", mnt / "1")
        report("cover lower", "2345")
        os.unlink(mnt / "5")
        report("unlink upper", "234")
        (mnt / "new").write_bytes(b"")
        os.rename(mnt / "new", mnt / "4")
        report("cover upper", "23")
        os.unlink(mnt / "3")
        report("unlink last upper", "2")
        os.unlink(mnt / "2")
        unmount()
        # (the kernel keeps a whiteout of its own there, a character device: not an entry)
        out.append((temp, "index", sorted(e.name for e in os.scandir(s.work / "index")
                                          if not stat.S_ISCHR(e.stat(follow_symlinks=False).st_mode))))
    return out


def test_index_nlink_union_warm_and_cold(xfs_dir, layers_factory, overlay_mount, kernel_mount):
    """overlay/033."""
    got = {}
    for side in SIDES:
        (xfs_dir / side).mkdir()
        got[side] = _index_nlink_union(side, xfs_dir / side, layers_factory, overlay_mount,
                                       kernel_mount)
    assert ("warm", "cover upper", [("2", 2), ("3", 2)]) in got["overlaypc"]
    assert got["overlaypc"] == got["kernel"]


TYPES = ("dir", "file", "symlink", "chrdev", "blkdev", "fifo", "socket")


def _every_type(layer: Path) -> None:
    (layer / "dir").mkdir()
    (layer / "file").write_bytes(b"")
    os.symlink("file", layer / "symlink")
    os.mknod(layer / "chrdev", stat.S_IFCHR | 0o644, os.makedev(1, 1))
    os.mknod(layer / "blkdev", stat.S_IFBLK | 0o644, os.makedev(1, 1))
    os.mkfifo(layer / "fifo")
    helpers.make_socket(layer / "socket")


def _numbers(d: Path) -> tuple[dict, dict]:
    st = {n: os.lstat(d / n).st_ino for n in TYPES}
    listed = {e.name: e.inode() for e in os.scandir(d) if e.name in TYPES}
    return st, listed


@pytest.mark.parametrize("side", SIDES)
def test_inode_numbers_constant_for_every_type(side, xfs_dir, layers_factory, overlay_mount,
                                               kernel_mount):
    """overlay/017, overlay/043 (redirect_dir=on, to move the merged directory)."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {}})
    _every_type(lowers[0])
    s = new_stack(lowers, xfs_dir, side)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    (mnt / "test").mkdir()
    before, listed = _numbers(mnt)
    assert listed == before
    for n in TYPES:
        os.chown(mnt / n, 100, -1, follow_symlinks=False)
        assert (s.upper / n).exists() or (s.upper / n).is_symlink()
    assert _numbers(mnt) == (before, before)
    for n in TYPES:
        os.rename(mnt / n, mnt / "test" / n)
    _drop_caches()
    assert _numbers(mnt / "test") == (before, before)
    unmount()
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    assert _numbers(mnt / "test") == (before, before)
    unmount()
