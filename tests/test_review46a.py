"""review46a: defects found in the parity46 merge (10cdcc4), each against the kernel."""
from __future__ import annotations

import errno
import os

import pytest

import helpers
from features_support import KERNEL_INDEX, KERNEL_METACOPY, link_through_fd, mount_side, new_stack
from test_index_roots import kernel_refusal, overlaypc_refusal

pytestmark = [pytest.mark.mount]


def _attempt(f):
    try:
        return f()
    except OSError as e:
        return errno.errorcode[e.errno]


def _metacopy_top(base):
    """A top lower layer with ``f`` a metacopy file (a former upper's) over the bottom
    layer's data, and a directory ``d``."""
    top = helpers.build_layer(base / "top", {"d": {}})
    bottom = helpers.build_layer(base / "bottom", {"f": "lower data\n" * 100})
    (top / "f").write_bytes(b"")
    os.truncate(top / "f", 1100)
    os.setxattr(top / "f", "trusted.overlay.metacopy", b"")
    return top, bottom


@pytest.mark.parametrize("redirect", [b"/f", None])
def test_link_of_an_open_nameless_lower_metacopy_file(redirect, tmp_path, overlay_mount,
                                                      kernel_mount):
    """``f`` a metacopy file in the top lower layer (a former upper: its data in the layer
    below), hard-linked there as ``g``; opened, its name unlinked, then linked through its
    fd as ``h``. Its held file (``MetaFile``) is the lower layer's: the link must never
    name (nor write) that lower inode in the upper."""
    got = {}
    for side in ("kernel", "ours"):
        base = tmp_path / side
        top, bottom = _metacopy_top(base)
        if redirect is not None:
            os.setxattr(top / "f", "trusted.overlay.redirect", redirect)
        os.link(top / "f", top / "g")
        top_before = helpers.dir_state(top), (top / "f").stat(), sorted(os.listxattr(top / "f"))
        s = new_stack([top, bottom], base, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_METACOPY)
        try:
            fd = os.open(mnt / "f", os.O_RDONLY)
            try:
                os.unlink(mnt / "f")
                linked = link_through_fd(fd, mnt / "d", "h")
                if linked is None:
                    _attempt(lambda: os.chmod(mnt / "d/h", 0o600))
                data = _attempt(lambda: (mnt / "d/h").read_bytes()[:11])
            finally:
                os.close(fd)
        finally:
            unmount()
        top_after = helpers.dir_state(top), (top / "f").stat(), sorted(os.listxattr(top / "f"))
        assert top_after[0] == top_before[0], f"{side}: a lower layer changed"
        assert (top_after[1].st_mode, top_after[1].st_nlink, top_after[1].st_size) == \
            (top_before[1].st_mode, top_before[1].st_nlink, top_before[1].st_size), \
            f"{side}: the lower file changed"
        assert top_after[2] == top_before[2], f"{side}: the lower file's xattrs changed"
        upper_h = s.upper / "d/h"
        same = upper_h.exists() and os.stat(upper_h).st_ino == (top / "f").stat().st_ino
        assert not same, f"{side}: the upper names the lower inode"
        got[side] = (linked, data)
    assert got["ours"] == got["kernel"]


def test_write_of_an_open_nameless_lower_metacopy_file(tmp_path, overlay_mount, kernel_mount):
    """The same file (no redirect) reopened for writing, truncated, chmod-ed and given an
    xattr through ``/proc/self/fd`` once its name is gone: the kernel's copy-up of it fails
    (EEXIST: its name is a whiteout now), as for any lower file; overlaypc wrote the data
    into the lower file and took its metacopy mark (``copy_data_nameless`` on the held
    lower fd)."""
    got = {}
    for side in ("kernel", "ours"):
        base = tmp_path / side
        top, bottom = _metacopy_top(base)
        os.link(top / "f", top / "g")
        top_before = helpers.dir_state(top), sorted(os.listxattr(top / "f"))
        s = new_stack([top, bottom], base, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_METACOPY)
        try:
            fd = os.open(mnt / "f", os.O_RDONLY)
            try:
                os.unlink(mnt / "f")
                opened = _attempt(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)))
                truncated = _attempt(lambda: os.truncate(f"/proc/self/fd/{fd}", 5))
                changed = (_attempt(lambda: os.chmod(f"/proc/self/fd/{fd}", 0o600)),
                           _attempt(lambda: os.setxattr(f"/proc/self/fd/{fd}", "user.x", b"1")))
                data = os.pread(fd, 11, 0)
            finally:
                os.close(fd)
            g = _attempt(lambda: (mnt / "g").read_bytes()[:11])
        finally:
            unmount()
        assert (helpers.dir_state(top), sorted(os.listxattr(top / "f"))) == top_before, \
            f"{side}: a lower layer changed"
        got[side] = (opened, truncated, changed, data, g)
    assert got["ours"] == got["kernel"]


#: a layer of a new index=on stack, relative to a live kernel overlay's (index=on) dirs:
#: (which layer, where), and whether the kernel refuses the mount (EBUSY)
NEAR_A_LIVE_MOUNT = {"lowerdir-below-its-upperdir": ("lower", "upper/sub", True),
                     "upperdir-below-its-upperdir": ("upper", "upper/sub/up", True),
                     "lowerdir-below-its-workdir": ("lower", "work/sub", True),
                     "lowerdir-above-its-upperdir": ("lower", ".", False),
                     "lowerdir-its-lowerdir": ("lower", "lower", False)}


@pytest.mark.parametrize("case", sorted(NEAR_A_LIVE_MOUNT))
def test_near_a_live_kernel_mount(case, tmp_path, kernel_mount):
    """The kernel's ``ovl_check_layer`` walks each layer's ancestors (``dget_parent``, up to
    its filesystem's root) and reports one that a live overlay holds as its upperdir or
    workdir as in use (EBUSY under index=on), as it does the layer itself; a layer above
    one, or a lowerdir shared (podman's layers), mounts. overlaypc compared the layers
    themselves only."""
    which, where, refused = NEAR_A_LIVE_MOUNT[case]
    live = tmp_path / "live"
    lower = helpers.build_layer(live / "lower", {"f": "lower\n"})
    (live / "upper").mkdir()
    (live / "work").mkdir()
    k = kernel_mount([lower], live / "upper", live / "work", KERNEL_INDEX)
    (k / "sub").mkdir()
    (k / "sub/up").mkdir()
    (live / "work/sub").mkdir()
    layer = live / where
    s = new_stack([layer if which == "lower" else lower], tmp_path, "o")
    if which == "upper":
        s.upper = layer
    got = kernel_refusal(tmp_path / "k2", s.lowers, s.upper, s.work)
    assert (got is not None and "already mounted" in got) == refused, got  # (the oracle)
    line = overlaypc_refusal(tmp_path, tmp_path / "mnt", s.options("index=on"))
    assert (line is not None) == refused, line
    if refused:
        assert "in use" in line and str(layer) in line, line
