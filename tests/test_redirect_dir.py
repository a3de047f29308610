"""Directory rename with ``-o redirect_dir=on`` (issue 9), layers on the session XFS.

One fixed sequence of renames (``apply_renames``) covers: a rename within one directory
(relative redirect), renaming twice, a rename into another directory (absolute redirect),
a merged directory with upper content, renaming the parent of a redirected directory,
moving a directory out of a redirected one, rmdir and re-create after a redirect, and a
copy-up of a file inside a redirected directory. The bottom lower layer holds parts of
the renamed directories too, so each redirect must be followed in every layer.

Checked: the merged view (every file at its new path with its data, old names gone);
the upper dir (the exact set of redirect xattrs, relative or absolute as the kernel
writes them, whiteouts at the old names, no copies of file data); the kernel oracle
(``mount -t overlay`` with redirect_dir=on, index/metacopy/xino off) running the same
sequence gives the same tree and the same redirects; each upper mounted by the other
implementation shows the same tree. Plus: ``mv`` of a populated lower tree is one rename,
coherence of an open file across a redirect, and EXDEV without redirect_dir=on.

Known difference left out of tree comparisons (features_support.snapshot): overlaypc's
own ``trusted.overlaypc.*`` xattrs, which the kernel lists on an upper overlaypc wrote.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

import helpers
from coherence_support import NEW, NEW_HEAD, OLD, dontneed, pread_all
from features_support import (KERNEL_REDIRECT, assert_same, is_whiteout, make_lowers, new_stack,
                              overlay_stats, regular_files, sha256_of, snapshot,
                              upper_redirects)
from helpers import File

pytestmark = [pytest.mark.mount]

BIG = bytes(range(256)) * 800  # 200 KiB: a copy of it in the upper could not go unnoticed

LOWERS = {
    "top": {
        "D": {"f": "f in D", "sub": {"g": "g in D/sub"}, "big": File(BIG)},
        "T": {"x": "x in T", "y": {"z": "z in T/y"}},
        "M": {"m1": "m1 in M"},
        "P": {"C": {"c": "c in P/C"}, "pf": "pf in P"},
        "A": {"B": {"b": "b in A/B"}},
        "R": {"r": "r in R"},
        "dst": {},
    },
    "bot": {
        "D": {"lowonly": "from bot D", "f": "shadowed by top"},
        "P": {"C": {"deep": "deep from bot"}},
    },
}


def apply_renames(root: Path) -> None:
    """The same sequence on any mount (overlaypc or the kernel)."""
    r = Path(root)
    os.rename(r / "D", r / "E")                                   # same dir: relative "D"
    os.rename(r / "T", r / "T2")                                  # twice: still "T"
    os.rename(r / "T2", r / "T3")
    (r / "M/new").write_bytes(b"new in M")                        # merged: upper content
    (r / "M/nd").mkdir()
    os.rename(r / "M", r / "dst/M2")                              # other dir: "/M"
    os.rename(r / "P/C", r / "P/C2")                              # relative "C" ...
    os.rename(r / "P", r / "Q")                                   # ... then its parent: "P"
    os.rename(r / "A/B", r / "B2")                                # absolute "/A/B" ...
    os.rename(r / "B2", r / "B3")                                 # ... kept on a same-dir rename
    os.rename(r / "E/sub", r / "dst/sub2")                        # out of a redirected dir
    os.rename(r / "R", r / "R2")                                  # rmdir / re-create
    os.unlink(r / "R2/r")
    os.rmdir(r / "R2")
    os.mkdir(r / "R2")
    (r / "R2/new").write_bytes(b"new R2")
    os.mkdir(r / "R")
    (r / "E/f").write_bytes(b"rewritten")                         # copy-up in a redirected dir


EXPECTED_FILES = {
    "E/f": b"rewritten", "E/big": BIG, "E/lowonly": b"from bot D",
    "T3/x": b"x in T", "T3/y/z": b"z in T/y",
    "dst/M2/m1": b"m1 in M", "dst/M2/new": b"new in M",
    "Q/pf": b"pf in P", "Q/C2/c": b"c in P/C", "Q/C2/deep": b"deep from bot",
    "B3/b": b"b in A/B",
    "dst/sub2/g": b"g in D/sub",
    "R2/new": b"new R2",
}
EXPECTED_DIRS = {".", "E", "T3", "T3/y", "dst", "dst/M2", "dst/M2/nd", "Q", "Q/C2", "A", "B3",
                 "dst/sub2", "R2", "R"}
#: exactly the redirects the kernel writes for apply_renames (checked against it below)
EXPECTED_REDIRECTS = {
    "E": b"D", "T3": b"T", "dst/M2": b"/M", "Q": b"P", "Q/C2": b"C", "B3": b"/A/B",
    "dst/sub2": b"/D/sub",
}
#: old names that must be whiteouts in the upper (a lower still has them)
EXPECTED_WHITEOUTS = ["D", "T", "M", "P", "Q/C", "A/B", "E/sub"]
#: intermediate names no lower has: no whiteout, nothing at all
ABSENT_IN_UPPER = ["T2", "B2"]


def check_expected_view(root: Path) -> None:
    snap = snapshot(root)
    files = {k: e for k, e in snap.items() if e.type == "file"}
    dirs = {k for k, e in snap.items() if e.type == "dir"}
    assert set(files) == set(EXPECTED_FILES), (sorted(files), sorted(EXPECTED_FILES))
    assert dirs == EXPECTED_DIRS
    assert set(snap) == set(files) | dirs, "unexpected objects: " + str(
        sorted(set(snap) - set(files) - dirs))
    for rel, data in EXPECTED_FILES.items():
        assert (root / rel).read_bytes() == data, rel
    for gone in ("D", "T", "T2", "M", "P", "A/B", "B2", "E/sub", "Q/C", "R2/r"):
        assert not os.path.lexists(root / gone), gone
    assert sorted(os.listdir(root / "A")) == [] and sorted(os.listdir(root / "R")) == []


def check_upper(upper: Path) -> None:
    assert upper_redirects(upper) == EXPECTED_REDIRECTS
    for rel in EXPECTED_WHITEOUTS:
        assert is_whiteout(upper / rel), f"no whiteout at {rel} in the upper"
    for rel in ABSENT_IN_UPPER:
        assert not os.path.lexists(upper / rel), f"{rel} left in the upper"
    # nothing but directories, whiteouts and the files written through the mount: no
    # renamed lower file was copied
    assert regular_files(upper) == ["E/f", "R2/new", "dst/M2/new"]


# --------------------------------------------------------------------------------------

def test_lower_dir_rename_is_exdev_with_redirect_dir_off(xfs_dir, layers_factory, overlay_mount):
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"D": {"f": "f"}, "file": "x"}})
    s = new_stack(lowers, xfs_dir, "exdev")
    m = overlay_mount(s.options("redirect_dir=off"))
    with pytest.raises(OSError) as e:
        os.rename(m / "D", m / "E")
    assert e.value.errno == errno.EXDEV
    os.rename(m / "file", m / "file2")  # files and upper-only dirs still rename
    os.mkdir(m / "new")
    os.rename(m / "new", m / "new2")
    assert (m / "D/f").read_bytes() == b"f" and not (m / "E").exists()
    assert upper_redirects(s.upper) == {}


def test_lower_dir_rename_works_by_default(xfs_dir, layers_factory, overlay_mount):
    """redirect_dir=on is overlaypc's default (its differential tests pass)."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"D": {"f": "f"}}})
    s = new_stack(lowers, xfs_dir, "default")
    m = overlay_mount(s.options())
    os.rename(m / "D", m / "E")
    assert (m / "E/f").read_bytes() == b"f" and not (m / "D").exists()
    assert upper_redirects(s.upper) == {"E": b"D"}


def test_redirect_renames_overlaypc(xfs_dir, layers_factory, overlay_mount, kernel_mount):
    """overlaypc runs the sequence: merged view, upper format, remount, and the kernel
    mounting overlaypc's upper."""
    lowers = make_lowers(layers_factory, xfs_dir, LOWERS)
    s = new_stack(lowers, xfs_dir, "opc")
    m = overlay_mount(s.options("redirect_dir=on"))
    apply_renames(m.path)
    check_expected_view(m.path)
    check_upper(s.upper)
    mine = snapshot(m.path)
    m.unmount()

    again = overlay_mount(s.options("redirect_dir=on"))
    assert_same(mine, snapshot(again.path), ("before remount", "after remount"))
    again.unmount()

    k = kernel_mount(lowers, s.upper, s.work, KERNEL_REDIRECT)
    assert_same(mine, snapshot(k, kernel=True), ("overlaypc", "kernel on overlaypc's upper"))


def test_redirect_renames_kernel_differential(xfs_dir, layers_factory, overlay_mount,
                                              kernel_mount):
    """The kernel runs the same sequence: it writes the redirects EXPECTED_REDIRECTS says,
    its tree equals overlaypc's, and overlaypc (redirect_dir=follow) shows its upper."""
    lowers = make_lowers(layers_factory, xfs_dir, LOWERS)
    ks = new_stack(lowers, xfs_dir, "kern")
    k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_REDIRECT)
    apply_renames(k)
    theirs = snapshot(k, kernel=True)
    check_expected_view(k)
    assert upper_redirects(ks.upper) == EXPECTED_REDIRECTS  # the oracle for check_upper
    for rel in EXPECTED_WHITEOUTS:
        assert is_whiteout(ks.upper / rel), rel

    os_ = new_stack(lowers, xfs_dir, "opc")
    m = overlay_mount(os_.options("redirect_dir=on"))
    apply_renames(m.path)
    assert_same(theirs, snapshot(m.path), ("kernel", "overlaypc"))
    m.unmount()
    subprocess.run(["umount", str(k)], check=True)

    o2 = overlay_mount(ks.options("redirect_dir=follow"))
    assert_same(theirs, snapshot(o2.path), ("kernel", "overlaypc on the kernel's upper"))


def test_overlaypc_continues_kernel_redirects(xfs_dir, layers_factory, overlay_mount,
                                             kernel_mount):
    """Mixed chains: the kernel renames first, overlaypc renames the redirected dirs
    again (relative + absolute over the kernel's redirects), the kernel reads the result."""
    lowers = make_lowers(layers_factory, xfs_dir, LOWERS)
    s = new_stack(lowers, xfs_dir, "mix")
    with helpers.kernel_overlay(xfs_dir / "kmix", lowers, s.upper, s.work, KERNEL_REDIRECT) as k:
        os.rename(k / "D", k / "E")
        os.rename(k / "P/C", k / "P/C2")
    m = overlay_mount(s.options("redirect_dir=on"))
    os.rename(m / "E", m / "dst/E2")        # relative "D" becomes absolute "/D"
    os.rename(m / "P", m / "Q")             # parent of the kernel's relative "C"
    os.rename(m / "Q/C2", m / "Q/C3")       # keeps the kernel's "C"
    assert (m / "dst/E2/lowonly").read_bytes() == b"from bot D"
    assert (m / "Q/C3/deep").read_bytes() == b"deep from bot"
    mine = snapshot(m.path)
    m.unmount()
    redirects = upper_redirects(s.upper)
    assert redirects == {"dst/E2": b"/D", "Q": b"P", "Q/C3": b"C"}
    k2 = kernel_mount(lowers, s.upper, s.work, KERNEL_REDIRECT)
    assert_same(mine, snapshot(k2, kernel=True), ("overlaypc", "kernel"))


def test_relative_redirect_in_a_former_upper_reached_by_an_absolute_one(
        xfs_dir, layers_factory, overlay_mount, kernel_mount):
    """Issue 13.2: a former upper, now a lower, holds ``a/dir102x`` with the relative
    redirect ``dir102``; the top upper holds ``a/empty102/dir102`` with the absolute
    redirect ``/a/dir102x``. The relative redirect is taken from the path followed so far
    (``a/`` + ``dir102``), not from the merged parent: the original contents show."""
    lowers = make_lowers(layers_factory, xfs_dir, {"orig": {
        "a": {"dir102": {"f": "f in dir102", "sub": {"g": "g"}}, "empty102": {}}}})
    first = new_stack(lowers, xfs_dir, "first")
    with helpers.kernel_overlay(xfs_dir / "k102a", lowers, first.upper, first.work,
                                KERNEL_REDIRECT) as k:
        os.rename(k / "a/dir102", k / "a/dir102x")
    second = new_stack([first.upper, *lowers], xfs_dir, "second")
    with helpers.kernel_overlay(xfs_dir / "k102b", second.lowers, second.upper, second.work,
                                KERNEL_REDIRECT) as k:
        os.rename(k / "a/dir102x", k / "a/empty102/dir102")
        expected = snapshot(k, kernel=True)
    assert upper_redirects(first.upper) == {"a/dir102x": b"dir102"}
    assert upper_redirects(second.upper) == {"a/empty102/dir102": b"/a/dir102x"}
    m = overlay_mount(second.options())
    assert (m / "a/empty102/dir102/f").read_bytes() == b"f in dir102"
    assert (m / "a/empty102/dir102/sub/g").read_bytes() == b"g"
    assert_same(snapshot(m.path), expected, ("overlaypc", "kernel"))


def test_mv_of_populated_lower_tree_is_one_rename(xfs_dir, layers_factory, overlay_mount):
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {
        "tree": {"a": "a", "d1": {"d2": {"deep": "deep"}, "x": "x"}}}})
    with open(lowers[0] / "tree/big", "wb") as f:
        for i in range(16):
            f.write(bytes([i]) * (1 << 20))
    want = {rel: sha256_of(lowers[0] / "tree" / rel)
            for rel in ("a", "d1/d2/deep", "d1/x", "big")}
    s = new_stack(lowers, xfs_dir, "mv")
    m = overlay_mount(s.options("redirect_dir=on"))
    r = subprocess.run(["mv", str(m / "tree"), str(m / "moved")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    found = subprocess.run(["find", str(m / "moved"), "-type", "f"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert sorted(os.path.relpath(p, m / "moved") for p in found) == sorted(want)
    for rel, digest in want.items():
        assert sha256_of(m / "moved" / rel) == digest, rel
    assert not (m / "tree").exists()
    assert regular_files(s.upper) == [], "mv copied file data into the upper"
    assert upper_redirects(s.upper) == {"moved": b"tree"}
    assert is_whiteout(s.upper / "tree")
    methods = set(overlay_stats(m.path)["copy_ups"])
    assert not methods & {"reflink", "copy_file_range", "chunked"}, methods


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_open_file_coherent_across_redirect(cache, xfs_dir, layers_factory, overlay_mount):
    """fr open on lower D/f; rename D -> E; write E/f through another fd; fr sees it."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"D": {"f": File(OLD), "g": "g"}}})
    s = new_stack(lowers, xfs_dir, f"coh-{cache}")
    m = overlay_mount(s.options(f"redirect_dir=on,cache={cache}"))
    fr = os.open(m / "D/f", os.O_RDONLY)
    try:
        assert pread_all(fr) == OLD
        os.rename(m / "D", m / "E")
        fw = os.open(m / "E/f", os.O_RDWR)
        try:
            os.pwrite(fw, NEW_HEAD, 0)
            os.fsync(fw)
        finally:
            os.close(fw)
        if cache == "kernel":
            dontneed(fr)  # the next read goes through fr's own handle to the daemon
        assert pread_all(fr) == NEW
        assert os.fstat(fr).st_size == len(NEW)
        assert (m / "E/f").read_bytes() == NEW
    finally:
        os.close(fr)
    assert not (m / "D").exists()
    assert (s.upper / "E/f").read_bytes() == NEW
    assert (lowers[0] / "D/f").read_bytes() == OLD
    assert upper_redirects(s.upper) == {"E": b"D"}
    m.unmount()
    again = overlay_mount(s.options("redirect_dir=on"))
    assert (again / "E/f").read_bytes() == NEW and (again / "E/g").read_bytes() == b"g"



EDGE_LOWERS = {
    "top": {"D": {"f": "f in D", "s": {"g": "g in D/s"}}, "X": {}, "W": {"w": "w"},
            "T": {"t": "t in T"}, "E": {"e": "e"}, "U": {"u": "u in U"}},
    "bot": {"D": {"b": "b from bot"}, "X": {"xb": "under X in bot"}},
}


def apply_edge_renames(root: Path) -> list:
    """Renames onto existing lower names, over whiteouts, back to the original name, and
    pure-upper dirs moved into redirected ones; returns each step's outcome."""
    r = Path(root)
    outcomes = []

    def step(fn, *args):
        try:
            fn(*args)
            outcomes.append("ok")
        except OSError as e:
            outcomes.append(errno.errorcode[e.errno])

    step(os.rename, r / "X", r / "Xempty")       # X is empty only in top: bot has xb
    step(os.rename, r / "D", r / "X")            # over the (whited-out) name X
    step(os.unlink, r / "W/w")
    step(os.rmdir, r / "W")
    step(os.rename, r / "T", r / "W")            # over a whiteout
    step(os.rename, r / "X", r / "D")            # back to the original name
    step(os.rmdir, r / "E")                      # not empty: ENOTEMPTY
    step(os.rename, r / "E", r / "U")            # onto a non-empty lower dir: ENOTEMPTY
    step(os.mkdir, r / "N")
    (r / "N/n").write_bytes(b"n in N")
    step(os.rename, r / "N", r / "U/N")          # pure upper dir into a lower dir
    step(os.rename, r / "U", r / "U2")           # ... whose parent is then renamed
    step(os.rename, r / "D/s", r / "U2/N/s2")    # lower dir into the moved pure-upper dir
    step(os.rename, r / "U2/N/s2", r / "U2/N/s3")
    return outcomes


def test_edge_renames_kernel_differential(xfs_dir, layers_factory, overlay_mount, kernel_mount):
    lowers = make_lowers(layers_factory, xfs_dir, EDGE_LOWERS)
    ks, os_ = new_stack(lowers, xfs_dir, "kedge"), new_stack(lowers, xfs_dir, "oedge")
    k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_REDIRECT)
    k_out = apply_edge_renames(k)
    theirs = snapshot(k, kernel=True)
    m = overlay_mount(os_.options("redirect_dir=on"))
    o_out = apply_edge_renames(m.path)
    mine = snapshot(m.path)
    assert o_out == k_out
    assert_same(theirs, mine, ("kernel", "overlaypc"))
    assert upper_redirects(os_.upper) == upper_redirects(ks.upper)
    assert k_out.count("ENOTEMPTY") == 2 and k_out.count("ok") == len(k_out) - 2
    assert (m / "D/b").read_bytes() == b"b from bot" and (m / "U2/N/s3/g").read_bytes() == b"g in D/s"
    m.unmount()
    subprocess.run(["umount", str(k)], check=True)
    k2 = kernel_mount(lowers, os_.upper, os_.work, KERNEL_REDIRECT)
    assert_same(mine, snapshot(k2, kernel=True), ("overlaypc", "kernel on overlaypc's upper"))
    o2 = overlay_mount(ks.options("redirect_dir=on"))
    assert_same(theirs, snapshot(o2.path), ("kernel", "overlaypc on the kernel's upper"))
