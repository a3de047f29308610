"""Differential: the same lowers (kernel-format whiteouts and opaque dirs only), mounted by the
kernel's overlayfs (options pinned, lowers only) and by overlaypc, must look the same."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from helpers import WHITEOUT, Dir, File, Symlink

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


# --- generated stacks -------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
CONTENT = st.sampled_from([b"", b"x", b"hello", b"other", b"\0" * 10])
MODES = st.sampled_from([0o644, 0o600, 0o755])


def entry_strategy(depth: int):
    leaf = st.one_of(
        st.builds(File, CONTENT, MODES),
        st.builds(Symlink, st.sampled_from(["a", "../b", "/etc/passwd", "c/d", "nowhere"])),
        st.just(WHITEOUT),
    )
    if depth == 0:
        return leaf
    return st.one_of(
        leaf,
        st.builds(Dir, st.dictionaries(NAMES, entry_strategy(depth - 1), max_size=3),
                  st.sampled_from([0o755, 0o700]), st.sampled_from([False, "trusted"])),
    )


LAYER = st.dictionaries(NAMES, entry_strategy(2), max_size=4)
STACK = st.lists(LAYER, min_size=2, max_size=3)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow])
@given(stack=STACK)
def test_generated_stacks_match_kernel(tmp_path, stack):
    helpers.require_fuse_mount()
    helpers.require("kernel_overlay")
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    layers = [helpers.build_layer(base / f"l{i}", spec) for i, spec in enumerate(stack)]
    with helpers.kernel_overlay(base / "kmnt", layers) as kmnt, \
            helpers.Mount(base / "mnt", "lowerdir=" + ":".join(map(str, layers)),
                          log_dir=base) as m:
        assert_same_view(kmnt, m.path)
