"""review43: review of compat41 (metacopy=on renames of lower files copy metadata only;
index=on lower hard links copied up metadata-only; the lookup past a lower layer's
metacopy file).

- A rename of a file whose top lower is a metacopy file of a lower layer (a former upper,
  ``u1/x``: the kernel's rename of ``y``, redirect ``y``, a whiteout at ``u1/y``): the
  redirect must name the file as the merged namespace reaches it at its old place (the
  kernel's ``ovl_get_redirect``: the dentry's name, or its path with the upper
  ancestors' redirects), whose lookup then follows ``u1/x``'s own redirect; not the data's
  path at the bottom layer (``y``), which the lookup meets in ``u1`` first: a whiteout.
"""
from __future__ import annotations

import os

import pytest

import helpers
from features_support import KERNEL_METACOPY, new_stack, ovl_xattr

pytestmark = [pytest.mark.mount]

DATA = bytes(range(256)) * 300


def _former_upper(tmp_path, kernel_mount):
    """(l2, u1): ``l2`` holds ``y``, ``p/z`` and the dir ``d``; ``u1`` is the upper of the
    kernel's renames ``y`` -> ``x`` and ``p`` -> ``q`` over it (metacopy ``x``, redirect
    ``y``; ``q`` redirect ``p``; whiteouts at ``y`` and ``p``)."""
    l2 = helpers.build_layer(tmp_path / "l2", {"y": DATA, "p": {"z": DATA[::-1]},
                                               "d": helpers.Dir()})
    u1, w1 = tmp_path / "u1", tmp_path / "w1"
    u1.mkdir()
    w1.mkdir()
    k = kernel_mount([l2], u1, w1, KERNEL_METACOPY)
    os.rename(k / "y", k / "x")
    os.rename(k / "p", k / "q")
    helpers.force_unmount(k)
    assert ovl_xattr(u1 / "x", "redirect") == b"y" and ovl_xattr(u1 / "q", "redirect") == b"p"
    return l2, u1


#: renames over the former upper: (old, new)
CHAIN_RENAMES = [("x", "x2"), ("q/z", "d/z2")]


def test_rename_over_a_former_upper_metacopy_file_as_the_kernel(tmp_path, overlay_mount,
                                                                kernel_mount):
    l2, u1 = _former_upper(tmp_path, kernel_mount)
    stacks = {side: new_stack([u1, l2], tmp_path, side) for side in ("kernel", "ours")}
    k = kernel_mount([u1, l2], stacks["kernel"].upper, stacks["kernel"].work, KERNEL_METACOPY)
    m = overlay_mount(stacks["ours"].options("metacopy=on"))
    for old, new in CHAIN_RENAMES:
        os.rename(k / old, k / new)
        os.rename(m / old, m / new)
    expect = {"x2": DATA, "d/z2": DATA[::-1]}
    assert {new: (k / new).read_bytes() for new in expect} == expect  # (the oracle)
    # (the kernel's: the old name; the old merged path, not the data's "/p/z")
    assert {new: ovl_xattr(stacks["kernel"].upper / new, "redirect") for new in expect} == \
        {"x2": b"x", "d/z2": b"/q/z"}
    assert {new: (m / new).read_bytes() for new in expect} == expect
    helpers.force_unmount(k)
    m.unmount()
    redirects = {side: {new: ovl_xattr(s.upper / new, "redirect") for new in expect}
                 for side, s in stacks.items()}
    assert redirects["ours"] == redirects["kernel"]
    for side, s in stacks.items():  # each side's upper read by the other
        k = kernel_mount([u1, l2], s.upper, s.work, KERNEL_METACOPY)
        assert {new: (k / new).read_bytes() for new in expect} == expect, side
        helpers.force_unmount(k)
        m = overlay_mount(s.options("metacopy=on"))
        assert {new: (m / new).read_bytes() for new in expect} == expect, side
        m.unmount()
