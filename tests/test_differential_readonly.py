"""Differential: the same lowers, mounted by the kernel's overlayfs (options pinned, lowers
only) and by overlaypc, must look the same: the tree (``helpers.tree_snapshot``) and which
names are one inode (``links_support.identity``: st_ino classes and each name's st_nlink).

The fixed stacks use kernel-format whiteouts and opaque dirs only, or (``LINKED_LAYERS``)
hard links in the lowers (regular files, fifos, character and block devices; 2-4 names,
in several directories), OCI whiteouts and opaque markers, devices and a directory chain
whose paths end near PATH_MAX. The kernel does not read OCI markers, so wherever they
occur the kernel gets a copy of the layers in kernel format (``links_support.kernel_form``)
and overlaypc the OCI form; the copies' inode numbers differ, so only classes are compared.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from helpers import OCI_WHITEOUT, WHITEOUT, Dir, Fifo, File, HardLink, OciWhiteout, Symlink
from links_support import (DEV_NULL, NO_BLK, NO_CHR, PATH_MAX, SAFE_DEVICES, build_pair, deep_dir,
                           identity)

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]

KERNEL_LAYERS = {
    "top": {
        "a.txt": File("top a", mode=0o600, xattrs={"user.color": b"red"}),
        "dir1/t.txt": "top t",
        "dir1/gone_sub": WHITEOUT,
        "gone": WHITEOUT,
        "gone_dir": WHITEOUT,
        "nothing_below": WHITEOUT,
        "opq": Dir({"new.txt": "new"}, opaque="trusted"),
        "link": Symlink("a.txt"),
        "abs_link": Symlink("/etc/passwd"),
        "exe": File("#!/bin/sh\n", mode=0o755),
        "ddir": Dir({"x": "x"}, mode=0o700),
    },
    "mid": {
        "a.txt": "mid a",
        "b.txt": File("mid b", xattrs={"user.note": b"from mid"}),
        "gone": "mid gone",
        "dir1/m.txt": "mid m",
        "dir1/gone_sub": "mid gone_sub",
        "opq/old.txt": "old",
        "mo": Dir({"m": "m"}, opaque="trusted"),
        "replaced": "file over dir",
        "big.bin": File(bytes(range(256)) * 64),
        "ddir/y": "y",
    },
    "bot": {
        "a.txt": "bot a",
        "c.txt": "bot c",
        "gone": "bot gone",
        "gone_dir": {"inner": "i"},
        "dir1/b.txt": "bot b",
        "dir1/gone_sub": "bot gone_sub",
        "mo/b": "hidden by mid's opaque mo",
        "replaced": {"child": "hidden"},
        "deep/x/y/z": "deep",
        "up": Symlink("../../.."),
    },
}


def assert_same_view(kernel_root: Path, ours_root: Path) -> None:
    k = helpers.tree_snapshot(kernel_root, times=True, ignore_vanished=True)
    o = helpers.tree_snapshot(ours_root, times=True)
    assert o == k, "overlaypc differs from kernel overlayfs:\n" + \
        helpers.diff_snapshots(k, o, ("kernel", "overlaypc"))
    ki, oi = identity(kernel_root), identity(ours_root)
    assert oi == ki, "names share inodes differently:\n" + ki.differences(oi, ("kernel", "overlaypc"))


def test_same_view_as_kernel(layers_factory, kernel_mount, overlay_mount):
    layers = layers_factory(KERNEL_LAYERS)
    kmnt = kernel_mount(layers.paths)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    assert_same_view(kmnt, m.path)


def test_same_view_ignoring_times(layers_factory, kernel_mount, overlay_mount):
    """Names, types, modes, contents, link targets, xattrs (without mtimes), so a time-only
    difference is told apart from a structural one."""
    layers = layers_factory(KERNEL_LAYERS)
    kmnt = kernel_mount(layers.paths)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    k = helpers.tree_snapshot(kmnt, ignore_vanished=True)
    o = helpers.tree_snapshot(m.path)
    assert o == k, helpers.diff_snapshots(k, o, ("kernel", "overlaypc"))


def test_same_view_as_kernel_with_upper_read_only(layers_factory, mountpoint, tmp_path,
                                                  overlay_mount):
    """The top layer as an *upper* dir (kernel whiteouts/opaque there too), mounted ``ro`` by
    each in turn (never both at once on one upper)."""
    helpers.require("kernel_overlay")
    layers = layers_factory(KERNEL_LAYERS)
    upper, lowers = layers["top"], [layers["mid"], layers["bot"]]
    work = tmp_path / "work"
    work.mkdir()
    with helpers.kernel_overlay(mountpoint("kmnt"), lowers, upper, work, ["ro"]) as kmnt:
        k = helpers.tree_snapshot(kmnt, times=True, ignore_vanished=True)
    m = overlay_mount(f"lowerdir={layers['mid']}:{layers['bot']},upperdir={upper},"
                      f"workdir={work},ro")
    o = helpers.tree_snapshot(m.path, times=True)
    assert o == k, helpers.diff_snapshots(k, o, ("kernel", "overlaypc"))


def test_statfs_matches_kernel(layers_factory, kernel_mount, overlay_mount):
    layers = layers_factory(KERNEL_LAYERS)
    kmnt = kernel_mount(layers.paths)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    k, o = os.statvfs(kmnt), os.statvfs(m.path)
    assert (o.f_bsize, o.f_blocks, o.f_namemax) == (k.f_bsize, k.f_blocks, k.f_namemax)


T_LAYERS = 1_300_000_000_123_456_789  # both copies of the layers get this mtime


def linked_layers(deep: str) -> dict:
    """Hard links (regular and special, 2-5 names, some in other directories, some names
    whited out or shadowed), OCI whiteouts and opaque dirs, devices, and the chain ``deep``
    (merged in all three layers, with files, a whiteout and links at its end)."""
    return {
        "top": {
            "t1": File("top linked", mode=0o640), "tdir/t2": HardLink("t1"), "t3": HardLink("t1"),
            "tfifo": Fifo(0o640), "tdir/tfifo2": HardLink("tfifo"),
            "tnull": DEV_NULL, "tnull2": HardLink("tnull"),
            "tblk": NO_BLK, "tdir/tblk2": HardLink("tblk"),
            "gone": OCI_WHITEOUT,                 # a file in mid and bot
            "gone_dir": OCI_WHITEOUT,             # a directory in bot
            "m2": OCI_WHITEOUT,                   # one name of mid's link group
            "odir": Dir({"n": "new"}, opaque="oci"),
            "shadow": "top file over a name of mid's link group",
            "mixed": {"c": "c", "sub": Dir({"x": "x"}, opaque="oci")},
            f"{deep}/top.txt": "top deep",
            f"{deep}/gone.txt": OCI_WHITEOUT,
            f"{deep}/tl": HardLink("t1"),         # a fourth name of t1, at the end of the chain
        },
        "mid": {
            "m1": File("mid linked", mode=0o600), "m2": HardLink("m1"), "sub/m3": HardLink("m1"),
            "shadow": HardLink("m1"),
            "gone": "mid gone",
            "odir/old": "hidden by the OCI opaque dir above",
            "mfifo": Fifo(0o600), "sub/mfifo2": HardLink("mfifo"),
            "mchr": NO_CHR, "mchr2": HardLink("mchr"),
            "mixed": {"a": "a", "b": HardLink("mixed/a"), "sub": {"y": "hidden"}},
            f"{deep}/mid.txt": "mid deep",
            f"{deep}/ml": HardLink("m1"),
        },
        "bot": {
            "gone": "bot gone", "gone_dir": {"inner": "i"},
            "b1": "bot linked", "b2": HardLink("b1"), "odir/older": "hidden",
            "bnull": DEV_NULL, "bblk": NO_BLK, "bfifo": Fifo(),
            f"{deep}/gone.txt": "whited out by top",
            f"{deep}/bot.txt": "bot deep",
            f"{deep}/bl": HardLink("b1"),
        },
    }


def build_linked(base: Path, mnts) -> tuple[list[Path], list[Path]]:
    """linked_layers() built as (overlaypc's OCI-form lowers, the kernel's kernel-form
    lowers), top first, with a deep chain that fits below every root used."""
    names = ("top", "mid", "bot")
    deep = deep_dir([base / f"{side}-{n}" for side in "ok" for n in names] + list(mnts))
    spec = linked_layers(deep)
    pairs = [build_pair(base, n, spec[n], T_LAYERS) for n in names]
    return [o for o, _ in pairs], [k for _, k in pairs]


def test_links_devices_oci_deep_match_kernel(tmp_path, kernel_mount, overlay_mount):
    kmnt_path, omnt_path = tmp_path / "kmnt-linked", tmp_path / "omnt-linked"
    ours, theirs = build_linked(tmp_path, [kmnt_path, omnt_path])
    kmnt = kernel_mount(theirs)
    m = overlay_mount("lowerdir=" + ":".join(map(str, ours)), mnt=omnt_path)
    k_id = identity(kmnt)
    # the oracle shows what the layers were built for (else the comparison proves little)
    assert len(k_id.classes) >= 7, k_id
    deepest = max(len(os.fsencode(f"{kmnt}/{rel}")) for rel, _ in k_id.nlinks)
    assert PATH_MAX - 100 < deepest < PATH_MAX, deepest
    assert_same_view(kmnt, m.path)


# --- generated stacks -------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
CONTENT = st.sampled_from([b"", b"x", b"hello", b"other", b"\0" * 10])
MODES = st.sampled_from([0o644, 0o600, 0o755])


def entry_strategy(depth: int):
    leaf = st.one_of(
        st.builds(File, CONTENT, MODES),
        st.builds(Symlink, st.sampled_from(["a", "../b", "/etc/passwd", "c/d", "nowhere"])),
        st.just(WHITEOUT),
        st.just(OCI_WHITEOUT),
        st.builds(Fifo, MODES),
        st.sampled_from(SAFE_DEVICES),
    )
    if depth == 0:
        return leaf
    return st.one_of(
        leaf,
        st.builds(Dir, st.dictionaries(NAMES, entry_strategy(depth - 1), max_size=3),
                  st.sampled_from([0o755, 0o700]), st.sampled_from([False, "trusted", "oci"])),
    )


#: extra names of files built elsewhere in the layer: (which file, which dir, name)
LINKS = st.lists(st.tuples(st.integers(0, 63), st.integers(0, 63), st.sampled_from(["h", "i"])),
                 max_size=3)
LAYER = st.builds(lambda spec, links: with_links(spec, links),
                  st.dictionaries(NAMES, entry_strategy(2), max_size=4), LINKS)
STACK = st.lists(LAYER, min_size=2, max_size=3)


def with_links(spec: dict, links) -> dict:
    """``spec`` plus hard links: each ``(i, j, name)`` gives the i-th linkable object (file,
    fifo, device; in spec order) another name ``name`` in the j-th directory (root first)."""
    linkable, dirs = [], [""]

    def visit(children, prefix: str) -> None:
        for name, item in children.items():
            rel = f"{prefix}{name}"
            if isinstance(item, Dir):
                dirs.append(rel)
                visit(item.children, rel + "/")
            elif not isinstance(item, (Symlink, type(WHITEOUT), OciWhiteout)):
                linkable.append(rel)

    visit(spec, "")
    out = dict(spec)
    for i, j, name in links:
        if linkable:
            where = f"{dirs[j % len(dirs)]}/{name}".lstrip("/")
            out.setdefault(where, HardLink(linkable[i % len(linkable)]))
    return out


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow])
@given(stack=STACK)
def test_generated_stacks_match_kernel(tmp_path, stack):
    """Random stacks with both whiteout and opaque formats, hard links, fifos and devices:
    OCI markers for overlaypc, their kernel form in the kernel's copy of the layers."""
    helpers.require_fuse_mount()
    helpers.require("kernel_overlay")
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    pairs = [build_pair(base, f"l{i}", spec, T_LAYERS) for i, spec in enumerate(stack)]
    ours, theirs = [o for o, _ in pairs], [k for _, k in pairs]
    with helpers.kernel_overlay(base / "kmnt", theirs) as kmnt, \
            helpers.Mount(base / "mnt", "lowerdir=" + ":".join(map(str, ours)),
                          log_dir=base) as m:
        assert_same_view(kmnt, m.path)
