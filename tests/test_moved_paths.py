"""A request by nodeid while a directory above the node is renamed (driven without FUSE).

The kernel locks a rename's parent directories only: a LOOKUP in ``d/sub`` runs while
another thread renames ``d``. overlaypc turns the nodeid into a merged path first; when
the rename lands between that and the lookup on disk, the old path names nothing. The
answer must still be the object (here: the file that is at ``dx/sub/f`` now), never a
negative entry the kernel would cache for an existing name (a later ``open(O_CREAT)``
of it then fails EEXIST, a ``stat`` ENOENT). Found by a concurrency stress through a
mount (hunt5): ls -l in one process, directory renames in another.
"""
from __future__ import annotations

import os
import threading

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc import faults
from overlaypc.config import MountConfig, validate


@pytest.fixture
def drv(tmp_path):
    helpers.build_layer(tmp_path / "lower", {"d/sub/f": "lower data\n"})
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    cfg = MountConfig(lowers=[str(tmp_path / "lower")], upper=str(tmp_path / "upper"),
                      work=str(tmp_path / "work"), mountpoint=str(tmp_path / "mnt"))
    validate(cfg)
    d = CoreDriver(cfg)
    yield d
    faults.configure(None)
    d.close()


def _paused_at(point: str, request, meanwhile):
    """``request()`` in a thread, stopped at fault point ``point`` (its first hit there)
    while ``meanwhile()`` runs in this one; then what ``request`` returned or raised."""
    reached, go = threading.Event(), threading.Event()
    results: list[object] = []
    worker: list[threading.Thread] = []

    def hook(point, *args):
        if threading.current_thread() in worker and not reached.is_set():
            reached.set()
            go.wait(10)

    def run():
        try:
            results.append(request())
        except Exception as e:  # noqa: BLE001 (returned to the test)
            results.append(e)

    faults.install(point, hook)
    worker.append(threading.Thread(target=run))
    try:
        worker[0].start()
        assert reached.wait(10)
        meanwhile()
    finally:
        go.set()
        worker[0].join(10)
        faults.configure(None)
    assert results, "the request did not end"
    return results[0]


def test_lookup_during_rename_of_a_directory_above_finds_the_object(drv):
    sub = drv.lookup(drv.lookup(drv.root(), "d"), "sub")
    entry = _paused_at("ops.lookup", lambda: drv.ops.lookup(REQ, sub.nodeid, b"f"),
                       lambda: drv.rename(drv.root(), "d", drv.root(), "dx"))
    assert not isinstance(entry, Exception), entry
    assert entry.nodeid != 0, "a negative entry for dx/sub/f, which exists"
    drv.ops.forget(entry.nodeid, 1)
    assert drv.lookup(sub, "f") is not None
    drv.settle()


def test_unlink_during_rename_of_its_directory_removes_the_file_not_its_successor(drv):
    """UNLINK of ``f`` in ``d/sub`` stops with its path (``d/sub/f``) made; meanwhile ``d``
    is renamed to ``dx`` and a new ``d/sub/f`` is made. The unlink must remove the file
    it was asked for (now ``dx/sub/f``), not the new one. Before: the new file went and
    the old one stayed."""
    sub = drv.lookup(drv.lookup(drv.root(), "d"), "sub")
    drv.lookup(sub, "f")

    def meanwhile():
        drv.rename(drv.root(), "d", drv.root(), "dx")
        node, fh = drv.create(drv.mkdir(drv.mkdir(drv.root(), "d", 0o755), "sub", 0o755), "f",
                              os.O_WRONLY, 0o644)
        drv.write(fh, b"successor\n", 0)
        drv.release(fh)
    done = _paused_at("namespace.changing", lambda: drv.ops.unlink(REQ, sub.nodeid, b"f"),
                      meanwhile)
    assert not isinstance(done, Exception), done
    upper = os.path.join(os.path.dirname(drv.fs.config.mountpoint), "upper")
    assert open(os.path.join(upper, "d/sub/f"), "rb").read() == b"successor\n"
    assert drv.lookup(drv.lookup(drv.lookup(drv.root(), "dx"), "sub"), "f") is None
    drv.settle()


def test_create_during_rename_of_its_directory_makes_the_file_where_it_was_asked(drv):
    """CREATE of ``g`` in ``d/sub`` stops with its path made; meanwhile ``d`` is renamed to
    ``dx`` and a new ``d/sub`` made. The file must appear in the directory it was asked
    for (now ``dx/sub``), not in the new ``d/sub``."""
    sub = drv.lookup(drv.lookup(drv.root(), "d"), "sub")

    def meanwhile():
        drv.rename(drv.root(), "d", drv.root(), "dx")
        drv.mkdir(drv.mkdir(drv.root(), "d", 0o755), "sub", 0o755)
    made = _paused_at("namespace.changing", lambda: drv.create(sub, "g", os.O_WRONLY, 0o644),
                      meanwhile)
    assert not isinstance(made, Exception), made
    drv.release(made[1])
    assert drv.lookup(drv.lookup(drv.lookup(drv.root(), "dx"), "sub"), "g") is not None
    assert drv.lookup(drv.lookup(drv.lookup(drv.root(), "d"), "sub"), "g") is None
    drv.settle()
