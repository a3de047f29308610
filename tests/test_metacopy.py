"""Metadata-only copy-up with ``-o metacopy=on`` (issue 9), layers on the session XFS.

A 64 MiB lower file (every 4 KiB block distinct, built once per module): chmod, chown,
utimens and setxattr through the mount make a sparse upper copy (a few blocks at most)
marked ``trusted.overlay.metacopy``, and the merged file keeps returning the lower data;
the stats counter says "metacopy". The first open for write (or a truncate) copies the data
in place: the mark goes, the data is the lower's, and a read handle opened before any of
it sees the writes. A renamed metacopy file (absolute redirect) keeps its data, also in a
renamed directory. The kernel (metacopy=on, redirect_dir=on, index/xino off) shows the
same files for overlaypc's upper and the other way round. metacopy=on refuses options
that make it unsafe or impossible (userxattr, redirect_dir other than on) with exit 2.

Known difference left out of tree comparisons (features_support.snapshot): overlaypc's
own ``trusted.overlaypc.*`` xattrs, which the kernel lists on an upper overlaypc wrote.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

import helpers
from coherence_support import dontneed
from features_support import (KERNEL_METACOPY, assert_same, new_stack, overlay_stats, ovl_xattr,
                              pattern_file, sha256_of, snapshot, upper_redirects)

pytestmark = [pytest.mark.mount]

SIZE = 64 << 20
SPARSE_MAX = 64 << 10  # an upper metacopy file may hold this much at most
DATA_METHODS = {"reflink", "copy_file_range", "chunked"}
T = 1_500_000_000_123_456_789
WHERE = 40 << 20  # an offset deep in the big file


@pytest.fixture(scope="module")
def lower(xfs_fs):
    """One lower layer for the whole module (read-only through every mount):
    big (64 MiB), small, d/inner."""
    base = Path(tempfile.mkdtemp(prefix="metacopy-lower-", dir=xfs_fs))
    root = helpers.build_layer(base / "l", {"small": "small lower data\n", "x": "x",
                                            "d": {"inner": "inner data\n", "other": "o"}})
    digest = pattern_file(root / "big", SIZE)
    os.sync()
    return root, digest


@pytest.fixture
def stack(lower, xfs_dir):
    return new_stack([lower[0]], xfs_dir, "mc")


def upper_blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def assert_metacopy(path: Path, size: int) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == size
    assert st.st_blocks * 512 <= SPARSE_MAX, f"{path} holds {st.st_blocks * 512} bytes of data"
    assert ovl_xattr(path, "metacopy") is not None, f"{path} lacks trusted.overlay.metacopy"


def assert_full_copy(path: Path, digest: str, redirect: bytes | None = None) -> None:
    """``redirect``: the one a rename set, which the data copy-up keeps (as the kernel's:
    tests/test_copyup_redirect.py)."""
    assert ovl_xattr(path, "metacopy") is None, f"{path} still marked metacopy"
    assert ovl_xattr(path, "redirect") == redirect, f"{path}: redirect {ovl_xattr(path, 'redirect')!r}"
    assert sha256_of(path) == digest


OPS = {
    "chmod": (lambda p: os.chmod(p, 0o600), lambda st, p: stat.S_IMODE(st.st_mode) == 0o600),
    "chown": (lambda p: os.chown(p, 1234, 5678), lambda st, p: (st.st_uid, st.st_gid) == (1234, 5678)),
    "utimens": (lambda p: os.utime(p, ns=(T, T)), lambda st, p: st.st_mtime_ns == T),
    "setxattr": (lambda p: os.setxattr(p, "user.k", b"v"),
                 lambda st, p: os.getxattr(p, "user.k") == b"v"),
}


@pytest.mark.parametrize("op", list(OPS))
def test_metadata_change_copies_metadata_only(op, lower, stack, overlay_mount):
    root, digest = lower
    m = overlay_mount(stack.options("metacopy=on"))
    change, check = OPS[op]
    change(m / "big")
    assert check(os.stat(m / "big"), m / "big")
    assert_metacopy(stack.upper / "big", SIZE)
    assert ovl_xattr(stack.upper / "big", "origin") is not None
    assert sha256_of(m / "big") == digest
    with open(m / "big", "rb") as f:
        f.seek(WHERE)
        assert f.read(11) == b"L%010d" % (WHERE // 4096)
    stats = overlay_stats(m.path)["copy_ups"]
    assert stats.get("metacopy") == 1 and not set(stats) & DATA_METHODS, stats
    assert os.listdir(stack.work / "work") == []
    m.unmount()
    again = overlay_mount(stack.options("metacopy=on"))  # persists, still metadata only
    assert check(os.stat(again / "big"), again / "big")
    assert sha256_of(again / "big") == digest
    assert_metacopy(stack.upper / "big", SIZE)


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_first_open_for_write_copies_data(cache, lower, stack, overlay_mount):
    root, digest = lower
    m = overlay_mount(stack.options(f"metacopy=on,cache={cache}"))
    fr = os.open(m / "big", os.O_RDONLY)  # opened before anything: bound to nothing
    try:
        assert os.pread(fr, 11, WHERE) == b"L%010d" % (WHERE // 4096)
        os.chmod(m / "big", 0o640)
        assert_metacopy(stack.upper / "big", SIZE)
        if cache == "kernel":
            dontneed(fr)
        assert os.pread(fr, 11, WHERE) == b"L%010d" % (WHERE // 4096), \
            "a read after the metadata copy-up did not come from the lower data"
        assert stat.S_IMODE(os.fstat(fr).st_mode) == 0o640, "fstat of an open file: old mode"
        fw = os.open(m / "big", os.O_RDWR)  # the first open for write: data copy-up
        try:
            assert_full_copy(stack.upper / "big", digest)
            assert stat.S_IMODE(os.stat(stack.upper / "big").st_mode) == 0o640
            os.pwrite(fw, b"WRITTEN", WHERE)
        finally:
            os.close(fw)
        if cache == "kernel":
            dontneed(fr)
        assert os.pread(fr, 7, WHERE) == b"WRITTEN"
        assert os.fstat(fr).st_size == SIZE
    finally:
        os.close(fr)
    copy_ups = overlay_stats(m.path)["copy_ups"]
    assert copy_ups.get("metacopy") == 1 and set(copy_ups) & DATA_METHODS, copy_ups
    with open(stack.upper / "big", "rb") as f:
        f.seek(WHERE)
        assert f.read(7) == b"WRITTEN"
    assert sha256_of(root / "big") == digest


def test_truncate_of_metacopy_file_copies_data(lower, stack, overlay_mount):
    root, _ = lower
    m = overlay_mount(stack.options("metacopy=on"))
    os.chown(m / "small", 42, 43)
    assert_metacopy(stack.upper / "small", len(b"small lower data\n"))
    os.truncate(m / "small", 5)
    assert (m / "small").read_bytes() == b"small"
    assert ovl_xattr(stack.upper / "small", "metacopy") is None
    assert (stack.upper / "small").read_bytes() == b"small"
    assert (os.stat(m / "small").st_uid, os.stat(m / "small").st_gid) == (42, 43)


def test_renamed_metacopy_file_keeps_its_data(lower, stack, overlay_mount):
    root, digest = lower
    m = overlay_mount(stack.options("metacopy=on"))
    os.chmod(m / "big", 0o600)
    os.rename(m / "big", m / "d/moved")          # absolute redirect to the data
    os.utime(m / "d/inner", ns=(T, T))           # a metacopy file ...
    os.rename(m / "d", m / "d2")                 # ... in a renamed (redirected) dir
    assert_metacopy(stack.upper / "d2/moved", SIZE)
    assert_metacopy(stack.upper / "d2/inner", len(b"inner data\n"))
    assert upper_redirects(stack.upper) == {"d2": b"d", "d2/moved": b"/big"}
    assert sha256_of(m / "d2/moved") == digest
    assert (m / "d2/inner").read_bytes() == b"inner data\n"
    assert not (m / "big").exists() and not (m / "d").exists()
    m.unmount()

    m = overlay_mount(stack.options("metacopy=on"))
    assert sha256_of(m / "d2/moved") == digest
    assert stat.S_IMODE(os.stat(m / "d2/moved").st_mode) == 0o600
    with open(m / "d2/moved", "r+b") as f:       # data copy-up of a redirected metacopy
        f.seek(WHERE)
        f.write(b"W")
    assert_full_copy(stack.upper / "d2/moved", sha256_of(m / "d2/moved"), b"/big")
    with open(m / "d2/moved", "rb") as f:
        assert f.read(11) == b"L0000000000"
        f.seek(WHERE)
        assert f.read(2) == b"W" + (b"L%010d" % (WHERE // 4096))[1:2]


def apply_meta_ops(root: Path) -> None:
    """The same attribute changes and renames on any mount."""
    r = Path(root)
    os.chmod(r / "big", 0o600)
    os.chown(r / "small", 1234, 5678)
    os.utime(r / "d/inner", ns=(T, T))
    os.setxattr(r / "x", "user.k", b"v")
    os.rename(r / "big", r / "d/moved")
    os.rename(r / "x", r / "x2")


def _meta_snapshot(root: Path, kernel: bool = False) -> dict:
    """Snapshot with the mtimes of files (kept by copy-up, or set by utimens); directory
    mtimes are left out: two mounts run the renames at different moments."""
    snap = snapshot(root, kernel=kernel, times=True)
    return {k: e if e.type != "dir" else dataclasses.replace(e, mtime_ns=None)
            for k, e in snap.items()}


def _blocks(root: Path) -> dict:
    return {rel: os.stat(Path(root) / rel).st_blocks for rel in ("d/moved", "small", "d/inner")}


def test_kernel_shows_overlaypc_metacopy_upper(lower, stack, overlay_mount, kernel_mount):
    root, digest = lower
    m = overlay_mount(stack.options("metacopy=on"))
    apply_meta_ops(m.path)
    mine = _meta_snapshot(m.path)
    assert mine["d/moved"].content == "sha256:" + digest
    for rel in ("d/moved", "small", "d/inner", "x2"):
        assert ovl_xattr(stack.upper / rel, "metacopy") is not None, rel
    m.unmount()
    k = kernel_mount([root], stack.upper, stack.work, KERNEL_METACOPY)
    assert_same(mine, _meta_snapshot(k, kernel=True), ("overlaypc", "kernel on overlaypc's upper"))


def test_overlaypc_shows_kernel_metacopy_upper(lower, xfs_dir, overlay_mount, kernel_mount):
    root, digest = lower
    ks, os_ = new_stack([root], xfs_dir, "kmc"), new_stack([root], xfs_dir, "omc")
    k = kernel_mount([root], ks.upper, ks.work, KERNEL_METACOPY)
    apply_meta_ops(k)
    theirs = _meta_snapshot(k, kernel=True)
    k_blocks = _blocks(k)
    # the kernel did metadata-only copy-ups too (else this compares nothing interesting)
    assert upper_blocks(ks.upper / "d/moved") <= SPARSE_MAX
    assert ovl_xattr(ks.upper / "d/moved", "metacopy") is not None
    m = overlay_mount(os_.options("metacopy=on"))
    apply_meta_ops(m.path)
    assert_same(theirs, _meta_snapshot(m.path), ("kernel", "overlaypc"))
    # the same redirects: relative ("x") for a same-dir rename of a metacopy file,
    # absolute across directories, as the kernel 6.x writes them (compat41; overlaypc
    # wrote "/x" before, which names the same lower file)
    assert upper_redirects(os_.upper) == upper_redirects(ks.upper) == \
        {"d/moved": b"/big", "x2": b"x"}
    o_blocks = _blocks(m.path)
    m.unmount()
    helpers.force_unmount(k)

    o2 = overlay_mount(ks.options("metacopy=on"))
    assert_same(theirs, _meta_snapshot(o2.path), ("kernel", "overlaypc on the kernel's upper"))
    with open(o2 / "d/moved", "r+b") as f:    # complete a kernel-made metacopy file
        f.write(b"K")
    assert ovl_xattr(ks.upper / "d/moved", "metacopy") is None
    with open(ks.upper / "d/moved", "rb") as f:
        assert f.read(11) == b"K0000000000"
        f.seek(WHERE)
        assert f.read(11) == b"L%010d" % (WHERE // 4096)
    # st_blocks of a metacopy file: the kernel reports the lower data's blocks (du sees the
    # file's real size); compared last so it cannot hide the checks above
    assert o_blocks == k_blocks


def test_metacopy_data_survives_kernel_round_trip(lower, stack, overlay_mount, kernel_mount):
    """overlaypc metacopy upper -> kernel writes one byte (its data copy-up of our
    metacopy file, following our redirect) -> overlaypc reads it back."""
    root, digest = lower
    m = overlay_mount(stack.options("metacopy=on"))
    apply_meta_ops(m.path)
    m.unmount()
    with helpers.kernel_overlay(stack.upper.parent / f"{stack.upper.name}-k", [root], stack.upper,
                                stack.work, KERNEL_METACOPY) as k:
        with open(k / "d/moved", "r+b") as f:
            f.seek(WHERE)
            f.write(b"K")
    assert ovl_xattr(stack.upper / "d/moved", "metacopy") is None
    m = overlay_mount(stack.options("metacopy=on"))
    with open(m / "d/moved", "rb") as f:
        assert f.read(11) == b"L0000000000"
        f.seek(WHERE)
        assert f.read(1) == b"K"
    assert stat.S_IMODE(os.stat(m / "d/moved").st_mode) == 0o600


@pytest.mark.parametrize("extra, words", [
    ("userxattr", ("metacopy", "userxattr")),
    ("redirect_dir=off", ("metacopy", "redirect_dir")),
    ("redirect_dir=nofollow", ("metacopy", "redirect_dir")),
    ("redirect_dir=follow", ("metacopy", "redirect_dir")),  # the kernel: conflicting options
])
def test_metacopy_option_conflicts(extra, words, lower, stack, mountpoint, tmp_path):
    mnt = mountpoint()
    before = helpers.dir_state(stack.upper), helpers.dir_state(stack.work)
    r = helpers.run_overlaypc(["-o", stack.options(f"metacopy=on,{extra}"), mnt], mnt, tmp_path)
    assert not r.wrongly_mounted and not r.timed_out
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("overlaypc: error:"), r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert (helpers.dir_state(stack.upper), helpers.dir_state(stack.work)) == before


def _after_losing_names(root: Path, probe) -> dict:
    """``probe(fd)`` of open metacopy files (data still below) after their names went:
    one replaced by a rename over it, one unlinked."""
    r = Path(root)
    os.chmod(r / "small", 0o600)      # metadata-only copy-ups
    os.chmod(r / "d/inner", 0o640)
    out = {}
    for rel, lose in (("small", lambda: os.rename(r / "x", r / "small")),
                      ("d/inner", lambda: os.unlink(r / "d/inner"))):
        fd = os.open(r / rel, os.O_RDONLY)
        try:
            lose()
            out[rel] = probe(fd)
        finally:
            os.close(fd)
    return out


def _fstat_after_losing_names(root: Path) -> dict:
    def probe(fd: int) -> tuple:
        st = os.fstat(fd)
        return oct(stat.S_IMODE(st.st_mode)), st.st_nlink, st.st_size, os.read(fd, 5)
    return _after_losing_names(root, probe)


def _change_after_losing_names(root: Path) -> dict:
    """fchmod, fchown and futimens of open metacopy files after their names went (a
    change of the upper file, the data staying below): each call's errno (0: done) and
    the fstat after."""
    def probe(fd: int) -> tuple:
        done = []
        for call in (lambda: os.fchmod(fd, 0o604), lambda: os.fchown(fd, 7, 8),
                     lambda: os.utime(fd, ns=(1_000_000_000, 2_000_000_000))):
            try:
                call()
                done.append(0)
            except OSError as e:
                done.append(errno.errorcode[e.errno])
        st = os.fstat(fd)
        return (done, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, st.st_mtime_ns,
                st.st_nlink, os.read(fd, 5))
    return _after_losing_names(root, probe)


def _ours_and_kernels(run, lower, stack, xfs_dir, overlay_mount, kernel_mount, name: str):
    """``run(mount root)`` on an overlaypc mount with ``metacopy=on`` over ``lower``, then
    on the kernel's over the same lower (a fresh upper ``name``): both results."""
    root, _ = lower
    m = overlay_mount(stack.options("metacopy=on"))
    mine = run(m.path)
    m.unmount()
    ks = new_stack([root], xfs_dir, name)
    return mine, run(kernel_mount([root], ks.upper, ks.work, KERNEL_METACOPY))


def test_open_metacopy_file_keeps_its_attributes_without_a_name(lower, stack, xfs_dir,
                                                                  overlay_mount, kernel_mount):
    """The attributes of an open metacopy file are its upper file's even after its name is
    replaced or removed (they were the lower data file's: mode 0o644), as in the kernel."""
    mine, theirs = _ours_and_kernels(_fstat_after_losing_names, lower, stack, xfs_dir,
                                     overlay_mount, kernel_mount, "kmc")
    assert mine == theirs
    assert mine == {"small": ("0o600", 0, 17, b"small"), "d/inner": ("0o640", 0, 11, b"inner")}


def test_open_metacopy_file_without_a_name_takes_metadata_changes(lower, stack, xfs_dir,
                                                                 overlay_mount, kernel_mount):
    """fchmod, fchown and futimens of an open metacopy file (data still below) whose name
    was replaced or removed change its upper file, as in the kernel. Before: EROFS ("an
    unlinked lower file cannot be copied up")."""
    mine, theirs = _ours_and_kernels(_change_after_losing_names, lower, stack, xfs_dir,
                                     overlay_mount, kernel_mount, "kmc2")
    assert mine == theirs
    assert mine["small"] == ([0, 0, 0], "0o604", 7, 8, 2_000_000_000, 0, b"small")


def _times_after_link(root: Path) -> dict:
    """utimens on the lower file small (a metacopy copy-up), then a hard link to it:
    the mtimes of both names (the link changes only the ctime)."""
    os.utime(root / "small", ns=(T, T))
    os.link(root / "small", root / "small2")
    return {n: os.lstat(root / n).st_mtime_ns for n in ("small", "small2")}


def test_link_to_metacopy_file_keeps_its_times(lower, stack, xfs_dir, overlay_mount, kernel_mount):
    """A hard link to a metacopy file keeps the file's mtime, as in the kernel (found by a
    concurrency stress, hunt5, when overlaypc copied the data in at a link: the copy in
    place wrote the upper file and left the time of the copy; since peer45 the link
    copies metadata only, as the kernel's)."""
    mine, theirs = _ours_and_kernels(_times_after_link, lower, stack, xfs_dir,
                                     overlay_mount, kernel_mount, "kmcl")
    assert mine == theirs == {"small": T, "small2": T}
    assert os.lstat(stack.upper / "small").st_mtime_ns == T  # on disk


def _times_after_open_for_write(root: Path) -> dict:
    """utimens on the lower files small and d/inner (metacopy copy-ups), then an open for
    writing of each (the data copy-up) and a write of zero bytes (small: write, d/inner:
    pwrite; neither changes the file): whether each mtime is still the one utimens set."""
    for name, flags in (("small", os.O_WRONLY), ("d/inner", os.O_RDWR)):
        os.utime(root / name, ns=(T, T))
        fd = os.open(root / name, flags)
        try:
            assert (os.write(fd, b"") if flags == os.O_WRONLY else os.pwrite(fd, b"", 3)) == 0
        finally:
            os.close(fd)
    return {n: os.lstat(root / n).st_mtime_ns == T for n in ("small", "d/inner")}


def test_open_for_write_of_metacopy_file_moves_its_mtime_as_the_kernel(lower, stack, xfs_dir,
                                                                      overlay_mount, kernel_mount):
    """The data copy-up an open for writing makes of a metacopy file writes its upper file,
    in the kernel too (``ovl_copy_up_meta_inode_data`` keeps no times): its mtime is the
    copy's, even when no byte is written after (a zero-byte write, or none). overlaypc
    set the old mtime back (seen in 3 of 1200 random differential sequences); a hard link,
    which copies no data, keeps it (``test_link_to_metacopy_file_keeps_its_times``)."""
    mine, theirs = _ours_and_kernels(_times_after_open_for_write, lower, stack, xfs_dir,
                                     overlay_mount, kernel_mount, "kmcw")
    assert theirs == {"small": False, "d/inner": False}
    assert mine == theirs
    assert os.lstat(stack.upper / "small").st_mtime_ns != T  # on disk


def test_link_of_lower_file_copies_metadata_only(lower, xfs_dir, stack, overlay_mount, kernel_mount):
    """A hard link to a lower file is a metadata-only copy-up, as the kernel's ``ovl_link``:
    the upper file (both names) stays a metacopy file, with an absolute redirect to its data
    (``ovl_set_link_redirect``) so that the new name finds it too; the first write through
    either name copies the data in place, seen through both. Found by unionmount-testsuite
    (``--ov=2 --verify --meta``, hard-link: "Metacopy file blocks non-zero"): overlaypc
    copied the 64 MiB at the link."""
    root, digest = lower
    ks = new_stack([root], xfs_dir, "kmlk")
    k = kernel_mount([root], ks.upper, ks.work, KERNEL_METACOPY)
    m = overlay_mount(stack.options("metacopy=on"))
    for r, upper in ((k, ks.upper), (m.path, stack.upper)):
        os.link(Path(r) / "big", Path(r) / "d/linked")
        assert_metacopy(upper / "big", SIZE)
        assert os.stat(upper / "big").st_ino == os.stat(upper / "d/linked").st_ino
        assert sha256_of(Path(r) / "d/linked") == sha256_of(Path(r) / "big") == digest
        assert os.stat(Path(r) / "d/linked").st_nlink == 2
    assert upper_redirects(stack.upper) == upper_redirects(ks.upper) == \
        {"big": b"/big", "d/linked": b"/big"}
    m.unmount()
    helpers.force_unmount(k)

    k = kernel_mount([root], stack.upper, stack.work, KERNEL_METACOPY)  # reads our upper
    assert sha256_of(k / "d/linked") == sha256_of(k / "big") == digest
    helpers.force_unmount(k)
    m = overlay_mount(stack.options("metacopy=on"))
    assert sha256_of(m / "d/linked") == digest
    with open(m / "big", "rb") as old, open(m / "d/linked", "r+b") as f:
        f.seek(WHERE)
        f.write(b"W")                             # data copy-up in place: both names
        f.flush()
        old.seek(WHERE)
        assert old.read(2) == b"W" + (b"L%010d" % (WHERE // 4096))[1:2]
    assert sha256_of(m / "big") == sha256_of(m / "d/linked") != digest
    assert_full_copy(stack.upper / "big", sha256_of(m / "big"), b"/big")


def test_rename_needing_a_redirect_past_redirect_max_is_exdev(tmp_path, overlay_mount, kernel_mount):
    """A metacopy file moved out of a deep directory needs an absolute redirect to its data;
    one longer than the kernel's ``redirect_max`` (256) the kernel refuses with EXDEV (mv
    then copies), as overlaypc already did for directories. overlaypc wrote it (on ext4, one
    past ~4 KiB failed ENOSPC, which mv does not fall back from). Found in hunt6."""
    helpers.require("kernel_overlay")
    rel = "/".join(f"{i:03d}" + "d" * 60 for i in range(5))  # a 322-byte redirect
    results = []
    for who in ("kernel", "overlaypc"):
        base = tmp_path / who
        for d in (f"lower/{rel}", "upper", "work"):
            (base / d).mkdir(parents=True)
        (base / "lower" / rel / "f").write_bytes(b"deep data\n")
        if who == "kernel":
            mnt = kernel_mount([base / "lower"], base / "upper", base / "work",
                               ["metacopy=on", "redirect_dir=on"])
        else:
            mnt = overlay_mount(f"lowerdir={base / 'lower'},upperdir={base / 'upper'},"
                                f"workdir={base / 'work'},metacopy=on").path
        os.chmod(mnt / rel / "f", 0o600)  # a metadata-only copy-up
        with pytest.raises(OSError) as refused:
            os.rename(mnt / rel / "f", mnt / "top")
        results.append(refused.value.errno)
        assert (mnt / rel / "f").read_bytes() == b"deep data\n"
        assert not (mnt / "top").exists()
    assert results == [errno.EXDEV, errno.EXDEV]


def test_metacopy_over_a_lower_metacopy_file_reads_the_data_further_down(tmp_path, overlay_mount,
                                                                       kernel_mount):
    """A former upper used as a lower holds a metacopy file ``x`` (the kernel's rename of
    ``y``: relative redirect ``y``), its data in the layer below. An attribute change
    through overlaypc makes an upper metacopy file over it: its data is still ``y`` two
    layers down, through ``x``'s redirect, as the kernel's lookup finds it. Before: the
    sparse ``x`` was taken for the data (zeros), and a write made them permanent."""
    data = bytes(range(256)) * 400
    l2, u1, w1 = (helpers.build_layer(tmp_path / "l2", {"y": data}), tmp_path / "u1",
                  tmp_path / "w1")
    u1.mkdir()
    w1.mkdir()
    k = kernel_mount([l2], u1, w1, KERNEL_METACOPY)
    os.rename(k / "y", k / "x")
    helpers.force_unmount(k)
    assert ovl_xattr(u1 / "x", "metacopy") == b"" and ovl_xattr(u1 / "x", "redirect") == b"y"
    s = new_stack([u1, l2], tmp_path, "chain")
    m = overlay_mount(s.options("metacopy=on"))
    os.chmod(m / "x", 0o600)
    assert ovl_xattr(s.upper / "x", "metacopy") == b""
    assert (m / "x").read_bytes() == data
    m.unmount()
    k = kernel_mount([u1, l2], s.upper, s.work, KERNEL_METACOPY)  # the kernel reads the same
    assert (k / "x").read_bytes() == data and stat.S_IMODE(os.stat(k / "x").st_mode) == 0o600
    helpers.force_unmount(k)
    m = overlay_mount(s.options("metacopy=on"))
    with open(m / "x", "r+b") as f:  # the data copy-up: the data from l2
        f.write(b"W")
    assert (s.upper / "x").read_bytes() == b"W" + data[1:]
    assert (l2 / "y").read_bytes() == data
