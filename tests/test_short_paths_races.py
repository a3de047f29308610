"""The short LOOKUP and UNLINK (``OverlayOps._lookup_name`` / ``_unlink_name``, each falling
back to ``lookup`` / ``unlink`` as the engine does) while the directories above are
swapped by renames (review47a). Two upper-only directories ``d0/sub`` and ``d1/sub`` hold
the same names; a thread per directory makes, looks up and removes its names through the
directory's node while another swaps ``d0`` and ``d1``. A stale path would act on the
other directory's file of the same name: a made name looked up absent, an unlink of a
made name ENOENT, a removed name still there (seen through an fd of the upper directory,
which follows it). Driven without FUSE.
"""
from __future__ import annotations

import os
import threading

from core_driver import REQ, CoreDriver


def _lookup(ops, parent: int, name: bytes) -> int:
    got = ops._lookup_name(parent, name)
    if got is None:
        e = ops.lookup(REQ, parent, name)
        return e.nodeid
    if isinstance(got, bytes):
        assert got == ops._negative_entry
        return 0
    return got.nodeid


def _unlink(ops, parent: int, name: bytes) -> None:
    if not ops._unlink_name(parent, name):
        ops.unlink(REQ, parent, name)


def test_short_lookup_and_unlink_act_on_their_directory_while_renames_swap_it(tmp_path):
    drv = CoreDriver.in_dir(tmp_path)
    ops, stop, failures = drv.ops, threading.Event(), []
    counts = {"short": 0}
    subs, fds = [], []
    for i in range(2):
        d = ops.mkdir(REQ, 1, f"d{i}".encode(), 0o755).nodeid
        subs.append(ops.mkdir(REQ, d, b"sub", 0o755).nodeid)
        fds.append(os.open(tmp_path / "upper" / f"d{i}" / "sub", os.O_RDONLY | os.O_DIRECTORY))

    def work(i: int) -> None:
        sub, n = subs[i], 0
        while not stop.is_set():
            n += 1
            name = f"f{n % 5}".encode()
            try:
                if ops._lookup_name(sub, name) is not None:
                    counts["short"] += 1
                entry, opened = ops.create(REQ, sub, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                           0o100644)
                ops.release(REQ, entry.nodeid, opened.fh)
                ops.forget(entry.nodeid, 1)
                found = _lookup(ops, sub, name)
                if not found:
                    failures.append(("made, looked up absent", i, name))
                    continue
                ops.forget(found, 1)
                _unlink(ops, sub, name)
                if name.decode() in os.listdir(fds[i]):
                    failures.append(("unlinked, still there", i, name))
                if _lookup(ops, sub, name):
                    failures.append(("unlinked, looked up", i, name))
            except OSError as e:
                failures.append((repr(e), i, name))

    def swaps() -> None:
        while not stop.is_set():
            for old, new in (("d0", "t"), ("d1", "d0"), ("t", "d1")):
                try:
                    ops.rename(REQ, 1, old.encode(), 1, new.encode(), 0)
                except OSError as e:
                    failures.append(("rename", repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=swaps))
    try:
        for t in threads:
            t.start()
        stop.wait(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for fd in fds:
            os.close(fd)
        stuck = [t for t in threads if t.is_alive()]
        if not stuck:
            drv.close()
    assert not stuck, "deadlocked"
    assert not failures, (len(failures), failures[:8])
    assert counts["short"], "no short LOOKUP answered"
