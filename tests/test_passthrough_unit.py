"""Unit tests of ``overlaypc/passthrough.py``: the kernel's open-mode rules, kept per inode,
and the per-mount / per-filesystem fallback. The backing registry here records ids the way
the kernel's ioctl hands them out and can be told to fail as the kernel does."""
from __future__ import annotations

import errno
import itertools

import pytest

from overlaypc.passthrough import Passthrough


class Registry:
    def __init__(self, fail: int | None = None) -> None:
        self.ids = itertools.count(1)
        self.live: dict[int, int] = {}
        self.fail = fail
        self.calls = 0

    def open(self, fd: int) -> int:
        self.calls += 1
        if self.fail is not None:
            raise OSError(self.fail, "refused")
        bid = next(self.ids)
        self.live[bid] = fd
        return bid

    def close(self, bid: int) -> None:
        del self.live[bid]


def opener(pt, key="k", offer=True, dev=1, writable=False):
    return pt.open(key, offer=offer, dev=dev, fd=lambda: 42, writable=writable)


def test_one_backing_id_per_inode_closed_at_last_release():
    reg = Registry()
    pt = Passthrough(reg)
    a, b = opener(pt), opener(pt)
    assert a == b != 0 and reg.calls == 1
    assert not pt.release("k", a)
    assert reg.live  # still open through b
    assert not pt.release("k", b)
    assert reg.live == {} and len(pt) == 0


def test_no_passthrough_while_a_cached_open_exists_and_the_reverse():
    reg = Registry()
    pt = Passthrough(reg)
    cached = opener(pt, offer=False)          # e.g. a lower file opened before copy-up
    assert cached == 0
    assert opener(pt) == 0                    # offered, but the inode is cached: ordinary open
    pt.release("k", 0)
    pt.release("k", 0)
    first = opener(pt)
    assert first
    # while passthrough is in use, every open must be passthrough with the same id,
    # even one that would not have been offered
    assert opener(pt, offer=False) == first
    pt.release("k", first)
    pt.release("k", first)
    assert len(pt) == 0


def test_inodes_are_independent():
    pt = Passthrough(Registry())
    assert opener(pt, key="a") and opener(pt, key="b", offer=False) == 0
    assert opener(pt, key="b") == 0 and opener(pt, key="a")


def test_writable_passthrough_reports_a_possible_change_at_its_end():
    pt = Passthrough(Registry())
    r = opener(pt)
    w = opener(pt, writable=True)
    assert not pt.release("k", w)  # another passthrough open is still live
    assert pt.release("k", r)      # the last one ended: data may have changed unseen
    r2 = opener(pt)
    assert not pt.release("k", r2)  # read-only since: nothing to report


def test_eperm_turns_passthrough_off_for_the_mount():
    reg = Registry(fail=errno.EPERM)
    pt = Passthrough(reg)
    assert opener(pt) == 0 and not pt.enabled
    assert opener(pt, key="other") == 0 and reg.calls == 1  # not tried again
    pt.release("k", 0)


def test_eloop_turns_passthrough_off_for_that_filesystem_only():
    reg = Registry(fail=errno.ELOOP)
    pt = Passthrough(reg)
    assert opener(pt, key="a", dev=7) == 0
    assert opener(pt, key="b", dev=7) == 0 and reg.calls == 1
    reg.fail = None
    assert opener(pt, key="c", dev=8) != 0 and pt.enabled


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOMEM])
def test_other_failures_fall_back_for_that_open(err):
    reg = Registry(fail=err)
    pt = Passthrough(reg)
    assert opener(pt) == 0 and pt.enabled
    pt.release("k", 0)
    reg.fail = None
    assert opener(pt) != 0


def test_not_negotiated():
    pt = Passthrough(None)
    assert opener(pt) == 0 and not pt.enabled
    pt.release("k", 0)
    assert len(pt) == 0


def test_the_unoffered_count_is_an_open_offered_nothing():
    """``open_unoffered``/``release_unoffered`` (the short OPEN of a lower file and its
    RELEASE) count as ``open(offer=False)``/``release(key, 0)``: a cached open that keeps
    passthrough away, and, while the inode passes through, one more open of its id."""
    reg = Registry()
    pt, twin = Passthrough(reg), Passthrough(Registry())
    assert pt.open_unoffered("k") == 0 == opener(twin, offer=False)
    assert opener(pt) == 0 == opener(twin)  # (offered, but a cached open is live)
    assert pt._modes["k"] == twin._modes["k"]
    pt.release_unoffered("k")
    twin.release("k", 0)
    assert pt._modes["k"] == twin._modes["k"]
    pt.release("k", 0)
    twin.release("k", 0)
    assert len(pt) == 0 == len(twin)
    pt.release_unoffered("k")  # (nothing counted: nothing to do, as ``release``)
    first = opener(pt)
    assert first and pt.open_unoffered("k") == first  # (the kernel takes only that id now)
    assert pt._modes["k"].passthrough == 2 and not pt._modes["k"].wrote
    pt.release("k", first)
    assert not pt.release("k", first) and reg.live == {} and len(pt) == 0
