"""Files and directories with no name left, answered as the kernel overlay answers them
(``kernel_mount``, each side over its own copy of one lower):

- the link count of an open file whose name went: a lower file under its whiteout shows
  the lower file's own count (1, or its hard links' count: its names below are only
  hidden), an indexed lower hard link (index=on) the names the index has left, a
  copied-up file its upper file's 0;
- a removed directory opened again through its fd (``/proc/self/fd/N``, ``fchdir`` then
  ``open(".")``, ``openat(fd, ".")``): it opens, its listing is empty (a removed upper
  directory, a lower-only one, a merged one); also in-process, where OPENDIR reaches the
  daemon (it does wherever the kernel sends it: handle 0, ``listings``).

(A metacopy file whose data is still below, unlinked, then opened again for writing: its
data is copied into the unlinked upper file, as the kernel overlay does:
tests/test_nameless_copyup.py.)
"""
from __future__ import annotations

import errno
import os

import pytest

import helpers
from core_driver import REQ, CoreDriver, Walker
from upper_support import on_both, stack_options

LOWER = {"lo": "lower one\n", "hl": "hard link\n", "hl2": helpers.HardLink("hl"),
         "gone": "both names\n", "gone2": helpers.HardLink("gone"), "cu": "copied\n",
         "low": helpers.Dir(), "mrg/f": "x\n"}

RUNS = {"plain": ("", ()), "index": ("index=on", ("index=on",)),
        "metacopy": ("metacopy=on,redirect_dir=on", ("redirect_dir=on", "metacopy=on"))}


def _answer(call):
    try:
        return call()
    except OSError as e:
        return errno.errorcode[e.errno]


def _links(m: str) -> list:
    """The link count each open file shows (``fstat``, ``stat`` of its magic link) before
    and after its names go."""
    out = []
    for name, flags, names in [("lo", os.O_RDONLY, ["lo"]), ("hl", os.O_RDONLY, ["hl"]),
                               ("gone", os.O_RDONLY, ["gone", "gone2"]),
                               ("cu", os.O_RDWR, ["cu"])]:
        fd = os.open(f"{m}/{name}", flags)
        try:
            before = os.fstat(fd).st_nlink
            for n in names:
                os.unlink(f"{m}/{n}")
            out.append((name, before, os.fstat(fd).st_nlink,
                        os.stat(f"/proc/self/fd/{fd}").st_nlink, os.pread(fd, 100, 0)))
        finally:
            os.close(fd)
    return out


def _removed_dirs(m: str) -> list:
    """Each removed directory (upper-only, lower-only, merged) opened again through its
    fd, and listed."""
    os.mkdir(f"{m}/u")
    os.unlink(f"{m}/mrg/f")
    out = []
    for name in ("u", "low", "mrg"):
        fd = os.open(f"{m}/{name}", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rmdir(f"{m}/{name}")

            def reopened(open_it):
                new = open_it()
                try:
                    return "ok", os.listdir(new)
                finally:
                    os.close(new)

            def via_cwd():
                cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fchdir(fd)
                    return reopened(lambda: os.open(".", os.O_RDONLY | os.O_DIRECTORY))
                finally:
                    os.fchdir(cwd)
                    os.close(cwd)
            out.append((name, _answer(lambda: os.listdir(fd)),
                        _answer(lambda: reopened(lambda: os.open(
                            f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY))),
                        _answer(via_cwd),
                        _answer(lambda: reopened(lambda: os.open(
                            ".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)))))
        finally:
            os.close(fd)
    return out


def _both(tmp_path, overlay_mount, kernel_mount, run: str, scenario) -> list:
    ours_opts, kernel_opts = RUNS[run]
    return on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ours_opts, kernel_opts,
                   scenario)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_link_count_of_an_open_file_with_no_name_left(run, tmp_path, overlay_mount,
                                                      kernel_mount):
    """Before: overlaypc showed 0 for every lower file whose names went."""
    kernel, ours = _both(tmp_path, overlay_mount, kernel_mount, run, _links)
    assert kernel[0][2] == 1 and kernel[-1][2] == 0  # (the oracle: a lower file's own count)
    for k, o in zip(kernel, ours):
        assert o == k
    assert ours == kernel


def test_an_unlinked_lower_file_shown_linked_is_still_forgotten(tmp_path, overlay_mount):
    """An unlinked lower file's node (``fstat`` shows the lower file's count, not 0) goes
    at its last close all the same: the kernel's FUSE drops an inode at its last use
    whatever its link count, and FORGETs it (the daemon's node count falls back)."""
    import time

    from upper_support import overlay_stats
    lower = helpers.build_layer(tmp_path / "lower", {"lo": "x\n"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work)).path
    base = overlay_stats(m)["nodes"]
    fd = os.open(m / "lo", os.O_RDONLY)
    try:
        os.unlink(m / "lo")
        assert os.fstat(fd).st_nlink == 1
        # (what tells a tool it has no name left: its magic link, tests/stress_crash.py)
        assert os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")
    finally:
        os.close(fd)
    nodes = None
    for _ in range(100):  # (FORGETs are queued by the kernel)
        nodes = overlay_stats(m)["nodes"]
        if nodes == base:
            break
        time.sleep(0.05)
    assert nodes == base


@pytest.mark.parametrize("run", ["plain", "metacopy"])
def test_a_removed_directory_opened_again(run, tmp_path, overlay_mount, kernel_mount):
    kernel, ours = _both(tmp_path, overlay_mount, kernel_mount, run, _removed_dirs)
    assert kernel[0][2] == ("ok", [])  # (the oracle)
    assert ours == kernel


# -- in-process: OPENDIR of a removed directory ------------------------------------------------
@pytest.mark.parametrize("which", ["upper", "lower", "merged"])
def test_opendir_of_a_removed_directory(tmp_path, which):
    """OPENDIR of a removed directory's node (the kernel sends it for ``open`` of its magic
    link where OPENDIR reaches the daemon): it opens (handle 0), as the kernel overlay
    opens it; READDIR answers ENOENT, as getdents of a removed directory does (the kernel
    answers so itself before sending one; glibc ends the listing there: empty); RELEASEDIR
    leaves no open directory counted (``listings.OpenDirs``)."""
    helpers.build_layer(tmp_path / "lower", {"low": helpers.Dir(), "mrg/f": "x\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        w = Walker(drv)
        root = drv.root()
        if which == "upper":
            drv.mkdir(root, "d", 0o755)
            name = "d"
        elif which == "merged":
            w.unlink("mrg/f")
            name = "mrg"
        else:
            name = "low"
        nodeid = drv.lookup(root, name).nodeid
        drv.rmdir(root, name)
        fh = drv.ops.opendir(REQ, nodeid).fh
        assert fh == 0
        with pytest.raises(OSError) as e:
            list(drv.ops.readdir(REQ, nodeid, fh, 0))
        assert e.value.errno == errno.ENOENT
        drv.ops.releasedir(REQ, nodeid, fh)
        assert len(drv.ops._open_dirs) == 0
        drv.settle()
    finally:
        drv.close()
