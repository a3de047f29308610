"""Requests that run while an UNLINK or RMDIR is between its change on disk and its reply.

The node table must drop a removed name in the namespace lock hold that removed it (as a
rename's table update runs in the hold that moved the object): else a request in between
makes its path from a name that names nothing on disk, or (once a CREATE or a rename put
a new object there) another object, and a removal that then updates the table drops the
name from the new object's node. The kernel locks the removal's directory and victim
until the reply, but not a hard link's other names: a ``stat``, ``open`` or ``chmod`` of
``b`` while ``a`` (the same node, first name ``a``) is unlinked answered ENOENT. Driven
without FUSE (``core_driver``); fault point ``ops.removed`` stops the removal after its
lock hold, before its reply (where the table used to follow).
"""
from __future__ import annotations

import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver, Stat, paused_at
from overlaypc import faults
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr

DATA = b"a's data\n"


@pytest.fixture
def drv(tmp_path):
    helpers.build_layer(tmp_path / "lower", {"d/x": "x's data, longer\n", "d/e/keep": "k\n"})
    d = CoreDriver.in_dir(tmp_path)
    yield d
    faults.configure(None)
    d.close()


def _removal_paused(drv: CoreDriver, removal, meanwhile) -> None:
    """``removal()`` (a request) in a thread, stopped at ``ops.removed`` while
    ``meanwhile()`` runs here; raises what the removal raised."""
    done = paused_at("ops.removed", removal, meanwhile)
    if isinstance(done, Exception):
        raise done


def _linked(drv: CoreDriver):
    """(``d``, the node of upper file ``d/a`` 0640 with DATA, also named ``d/b``)."""
    d = drv.lookup(drv.root(), "d")
    a, fh = drv.create(d, "a", os.O_WRONLY, 0o640)
    drv.write(fh, DATA, 0)
    drv.release(fh)
    drv.link(a, d, "b")
    return d, a


_REQUESTS = {
    "getattr": lambda drv, a: drv.getattr(a),
    "chmod": lambda drv, a: Stat.of(drv.ops.setattr(
        REQ, a.nodeid, SetAttr(p.FATTR_MODE, None, 0, None, None, 0o600, 0, 0)).attr),
    "open": lambda drv, a: drv.read(drv.open(a, os.O_RDONLY), 100, 0),
}


@pytest.mark.parametrize("request_kind", sorted(_REQUESTS))
def test_request_by_a_linked_node_while_its_first_name_is_unlinked(drv, request_kind):
    """``d/a`` and ``d/b`` are one node, its path made from ``a``. UNLINK ``a`` stops after
    its hold; meanwhile a GETATTR, SETATTR or OPEN of the node (the kernel's ``stat b``,
    ``chmod b``, ``open b``: no lock the UNLINK holds) must act on ``b``. Before: ENOENT
    (the path was still ``d/a``)."""
    d, a = _linked(drv)
    got: list[object] = []

    def meanwhile() -> None:
        try:
            got.append(_REQUESTS[request_kind](drv, a))
        except OSError as e:
            got.append(e)
    _removal_paused(drv, lambda: drv.unlink(d, "a"), meanwhile)
    assert not isinstance(got[0], OSError), f"{request_kind} of d/b: {got[0]}"
    if request_kind == "open":
        assert got[0] == DATA
        for fh in [fh for fh, n in drv._open.items() if n == a.nodeid]:
            drv.release(fh)
    else:
        want = 0o600 if request_kind == "chmod" else 0o640
        assert (got[0].ino, stat.S_IMODE(got[0].mode), got[0].nlink, got[0].size) == \
            (a.attr.ino, want, 1, len(DATA))
    assert drv.lookup(d, "b").nodeid == a.nodeid
    drv.settle()


def test_create_at_an_unlinked_name_keeps_its_node_named(drv):
    """UNLINK ``d/a`` stops after its hold; a CREATE of a new ``d/a`` runs meanwhile (the
    kernel would not let it, in-process nothing stops it). The new file's node must keep
    its name. Before: the UNLINK's table update dropped it (the node's GETATTR then
    answered ENOENT, and a LOOKUP gave the file a second nodeid)."""
    d = drv.lookup(drv.root(), "d")
    drv.release(drv.create(d, "a", os.O_WRONLY, 0o640)[1])
    new: list[object] = []

    def meanwhile() -> None:
        node, fh = drv.create(d, "a", os.O_WRONLY, 0o600)
        drv.write(fh, b"new\n", 0)
        drv.release(fh)
        new.append(node)
    _removal_paused(drv, lambda: drv.unlink(d, "a"), meanwhile)
    node = new[0]
    got = drv.getattr(node)
    assert (stat.S_IMODE(got.mode), got.size) == (0o600, 4)
    assert drv.lookup(d, "a").nodeid == node.nodeid
    drv.settle()


def test_rename_over_an_unlinked_name_keeps_the_moved_node_named(drv):
    """UNLINK ``d/a`` stops after its hold; ``d/x`` is renamed to ``d/a`` meanwhile. The
    moved node must keep its new name. Before: the UNLINK's table update dropped it."""
    d = drv.lookup(drv.root(), "d")
    drv.release(drv.create(d, "a", os.O_WRONLY, 0o640)[1])
    x = drv.lookup(d, "x")
    _removal_paused(drv, lambda: drv.unlink(d, "a"), lambda: drv.rename(d, "x", d, "a"))
    got = drv.getattr(x)
    assert (got.ino, got.size) == (x.attr.ino, len("x's data, longer\n"))
    assert drv.lookup(d, "a").nodeid == x.nodeid
    drv.settle()


def test_mkdir_at_a_removed_directory_name_keeps_its_node_named(drv):
    """RMDIR ``d/n`` stops after its hold; a new ``d/n`` is made meanwhile. Its node must
    keep its name. Before: the RMDIR's table update dropped it, and every request in it
    (a LOOKUP, a CREATE) answered ENOENT."""
    d = drv.lookup(drv.root(), "d")
    drv.mkdir(d, "n", 0o755)
    new: list[object] = []
    _removal_paused(drv, lambda: drv.rmdir(d, "n"),
                    lambda: new.append(drv.mkdir(d, "n", 0o700)))
    drv.release(drv.create(new[0], "f", os.O_WRONLY, 0o600)[1])
    assert drv.lookup(d, "n").nodeid == new[0].nodeid
    assert drv.lookup(new[0], "f") is not None
    drv.settle()


def test_getattr_of_a_removed_directory_while_its_rmdir_replies(drv):
    """RMDIR ``d/n`` stops after its hold; a GETATTR of its node meanwhile answers the
    removed directory's own attributes with no links (as ``fstat`` of an open directory
    whose name went: hunt8d, tests/test_nameless_dir.py), never those of anything else."""
    d = drv.lookup(drv.root(), "d")
    n = drv.mkdir(d, "n", 0o755)
    ino = drv.getattr(n).ino
    got: list[object] = []

    def meanwhile() -> None:
        try:
            got.append(drv.getattr(n))
        except OSError as e:
            got.append(e)
    _removal_paused(drv, lambda: drv.rmdir(d, "n"), meanwhile)
    assert not isinstance(got[0], OSError), got[0]
    assert (got[0].ino, stat.S_ISDIR(got[0].mode), got[0].nlink) == (ino, True, 0)
    drv.settle()


_REMOVALS = {
    "unlink": lambda drv, d: drv.unlink(d, "a"),
    "rename-over": lambda drv, d: drv.rename(d, "c", d, "a"),
}


@pytest.mark.parametrize("removal", sorted(_REMOVALS))
def test_a_failed_table_update_does_not_fail_a_done_removal(tmp_path, removal):
    """index=on, ``d/a`` and ``d/b`` one lower hard link (an index entry made by a copy-up
    of ``a``). An UNLINK of ``d/a`` (or a rename of ``d/c`` over it) removes the name on
    disk, then its node-table update, in the same lock hold, reads whether the object has
    other links (the index's count); fault point ``ops.keep_key`` fails that read (EIO,
    standing for the EMFILE/EIO/ENOENT of the index read). The removal is done: its answer
    must be success, and the table must not keep the name. Before: the request answered
    EIO (the kernel then keeps the name it just lost) and the table kept ``d/a``."""
    helpers.build_layer(tmp_path / "lower", {"d/a": "shared\n", "d/b": helpers.HardLink("d/a"),
                                             "d/c": "c\n"})
    drv = CoreDriver.in_dir(tmp_path, index=True)
    try:
        d = drv.lookup(drv.root(), "d")
        a = drv.lookup(d, "a")
        drv.release(drv.open(a, os.O_WRONLY))  # the index entry, a linked up
        held = drv.ops.nodes.child(d.nodeid, "a")
        faults.configure("ops.keep_key=eio")
        try:
            _REMOVALS[removal](drv, d)
            answer = None
        except OSError as e:
            answer = e
        faults.configure(None)
        # the change is done on disk either way
        assert drv.lookup(d, "a" if removal == "unlink" else "c") is None
        assert answer is None, f"{removal} answered {answer} for a removal that happened"
        # the table dropped the removed object's name (what took it is looked up afresh)
        assert drv.ops.nodes.child(d.nodeid, "a") != held
        if removal == "unlink":
            assert drv.lookup(d, "a") is None
        else:
            assert drv.read(fh := drv.open(drv.lookup(d, "a"), os.O_RDONLY), 100, 0) == b"c\n"
            drv.release(fh)
        assert drv.read(fh := drv.open(drv.lookup(d, "b"), os.O_RDONLY), 100, 0) == b"shared\n"
        drv.release(fh)
        drv.settle()
    finally:
        faults.configure(None)
        drv.close()
