"""GETATTR by nodeid racing a rename over, or an unlink of, the node's own name.

GETATTR (a ``stat`` whose dentry is cached, and ``fstat``) makes the node's layer path
from the node table, then looks it up. ``pathguard`` redoes it when a directory above
moved meanwhile; a change of the node's own name was not counted at first (the kernel
holds the node's lock for the requests that change it, not for GETATTR; it is now, and
these tests fail without it): a rename of another file
over that name between the two answered with the other file's attributes, which the
kernel then cached for this node and showed at its other names (hunt6 saw it once under
tests/stress_mount.py: ``stat`` of a hard-linked file showed another object's mode, size
and nlink); an unlink of the name of an open file answered its ``fstat`` with ENOENT
(hunt7, stress_mount.py with PAIRS, default options). Driven without FUSE
(``core_driver``), the GETATTR stopped at the ``ops.path`` fault point while the other
request runs.
"""
from __future__ import annotations

import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver, Stat, paused_at
from overlaypc import faults


@pytest.fixture
def drv(tmp_path):
    helpers.build_layer(tmp_path / "lower", {"d/a": "a's data, longer\n", "d/x": "x\n"})
    os.chmod(tmp_path / "lower" / "d" / "a", 0o640)
    os.chmod(tmp_path / "lower" / "d" / "x", 0o755)
    d = CoreDriver.in_dir(tmp_path)
    yield d
    faults.configure(None)
    d.close()


def _getattr_paused(drv: CoreDriver, nodeid: int, meanwhile, fh: int | None = None) -> Stat:
    """GETATTR of ``nodeid`` in a thread, stopped with its path made while ``meanwhile()``
    runs here; what it answered (or raises what it raised)."""
    result = paused_at("ops.path", lambda: Stat.of(drv.ops.getattr(REQ, nodeid, fh).attr),
                       meanwhile)
    if isinstance(result, Exception):
        raise result
    return result


def test_getattr_racing_a_rename_over_the_name_answers_for_its_own_node(drv):
    d = drv.lookup(drv.root(), "d")
    a = drv.lookup(d, "a")
    drv.link(a, d, "b")  # a second name, at which the kernel shows what GETATTR answered
    want = drv.getattr(a)
    assert (stat.S_IMODE(want.mode), want.nlink, want.size) == (0o640, 2, len("a's data, longer\n"))
    got = _getattr_paused(drv, a.nodeid, lambda: drv.rename(d, "x", d, "a"))
    assert (stat.S_IMODE(got.mode), got.nlink, got.size, got.ino) == \
        (0o640, 1, want.size, want.ino)  # the node's object, its name "a" gone: one left


def test_fstat_racing_the_unlink_of_an_open_files_name_answers(drv):
    d = drv.lookup(drv.root(), "d")
    a = drv.lookup(d, "a")
    fh = drv.open(a, os.O_RDONLY)
    try:
        # fstat: a GETATTR by nodeid without a handle (the kernel's fuse_getattr passes none)
        got = _getattr_paused(drv, a.nodeid, lambda: drv.unlink(d, "a"))
        # (a lower file whose name went shows its own link count, as on the kernel overlay:
        # tests/test_nameless_kernel_answers.py)
        assert (stat.S_IMODE(got.mode), got.size, got.nlink) == (0o640, len("a's data, longer\n"), 1)
    finally:
        drv.release(fh)
