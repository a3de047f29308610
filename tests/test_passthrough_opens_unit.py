"""Unit tests of ``overlaypc/passthrough_opens.py`` through ``OverlayOps`` (no FUSE): which
opens are offered passthrough, one backing id per node, and what a writing passthrough
era leaves behind (a data version that moved, no name claiming a current FUSE cache)."""
from __future__ import annotations

import os

import pytest

from overlaypc.engine.ops import Request
from overlaypc.nodes import ROOT_ID
from test_nodes_unit import make_ops
from test_passthrough_unit import Registry

REQ = Request(0, 0, os.getpid())


@pytest.fixture
def stack(tmp_path):
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower/low").write_bytes(b"lower")
    (tmp_path / "upper/up").write_bytes(b"upper")
    return tmp_path


@pytest.fixture
def ops_of(stack):
    closers = []

    def make(**kw):
        ops, close = make_ops(stack, **kw)
        closers.append(close)
        reg = Registry()
        ops.passthrough.start(reg)
        return ops, reg

    yield make
    for close in closers:
        close()


def _node(ops, name: str) -> int:
    return ops.lookup(REQ, ROOT_ID, name.encode()).nodeid


def test_upper_file_passes_through_with_one_backing_id(ops_of):
    ops, reg = ops_of()
    node = _node(ops, "up")
    a = ops.open(REQ, node, os.O_RDONLY)
    b = ops.open(REQ, node, os.O_RDWR)
    assert a.backing_id and a.backing_id == b.backing_id and reg.calls == 1
    assert not a.keep_cache and not a.direct_io
    ops.release(REQ, node, a.fh)
    assert reg.live
    ops.release(REQ, node, b.fh)
    assert reg.live == {} and len(ops.passthrough) == 0


def test_lower_file_of_a_writable_mount_is_not_offered(ops_of):
    ops, reg = ops_of()
    node = _node(ops, "low")
    o = ops.open(REQ, node, os.O_RDONLY)
    assert o.backing_id == 0 and reg.calls == 0
    ops.release(REQ, node, o.fh)


def test_read_only_mount_offers_lower_files(ops_of):
    ops, reg = ops_of(writable=False)
    node = _node(ops, "low")
    o = ops.open(REQ, node, os.O_RDONLY)
    assert o.backing_id and reg.calls == 1
    ops.release(REQ, node, o.fh)


@pytest.mark.parametrize("kw", [{"handles": "bind-at-open"}, {"passthrough": False}])
def test_bind_at_open_and_passthrough_off_are_never_offered(ops_of, kw):
    ops, reg = ops_of(**kw)
    node = _node(ops, "up")
    o = ops.open(REQ, node, os.O_RDONLY)
    assert o.backing_id == 0 and reg.calls == 0, kw
    ops.release(REQ, node, o.fh)


def test_cached_open_after_passthrough_writes_gets_no_keep_cache(ops_of):
    """A writing passthrough era ends: the data version moves and no name claims a current
    FUSE cache, so the next cached open (here: passthrough turned off meanwhile, as after
    an EPERM) gets no KEEP_CACHE; the one after it may keep what that open read."""
    ops, reg = ops_of()
    node = _node(ops, "up")
    # a cached open first (passthrough off for the mount), so the name's cache is current
    ops.passthrough.modes.enabled = False
    c = ops.open(REQ, node, os.O_RDONLY)
    ops.release(REQ, node, c.fh)
    c = ops.open(REQ, node, os.O_RDONLY)
    assert c.backing_id == 0 and c.keep_cache
    ops.release(REQ, node, c.fh)
    ops.passthrough.modes.enabled = True
    w = ops.open(REQ, node, os.O_RDWR)
    assert w.backing_id
    ops.release(REQ, node, w.fh)
    ops.passthrough.modes.enabled = False
    c = ops.open(REQ, node, os.O_RDONLY)
    assert c.backing_id == 0 and not c.keep_cache
    ops.release(REQ, node, c.fh)
    c = ops.open(REQ, node, os.O_RDONLY)
    assert c.keep_cache
    ops.release(REQ, node, c.fh)


def test_a_read_only_passthrough_era_keeps_the_cache(ops_of):
    ops, reg = ops_of()
    node = _node(ops, "up")
    ops.passthrough.modes.enabled = False
    for _ in range(2):
        c = ops.open(REQ, node, os.O_RDONLY)
        ops.release(REQ, node, c.fh)
    ops.passthrough.modes.enabled = True
    r = ops.open(REQ, node, os.O_RDONLY)
    assert r.backing_id
    ops.release(REQ, node, r.fh)
    ops.passthrough.modes.enabled = False
    c = ops.open(REQ, node, os.O_RDONLY)
    # the passthrough open claimed nothing about the FUSE cache: conservative, no keep
    assert not c.keep_cache
    ops.release(REQ, node, c.fh)
