"""A request by node (no fh) of a file with no name the node table knows borrows the fd
of one of the node's open handles; that handle's RELEASE may run in another worker at
the same time, and another open may take the fd number it freed. Driven through
``OverlayOps`` without FUSE (``core_driver``): a pause right after the fd number is read
lets the RELEASE and the other open run there; the request must still reach its own file
(see also test_setattr_open's nameless truncate)."""
from __future__ import annotations

import os
import stat
import threading

from core_driver import REQ
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr

from test_setattr_open import CAP, drv  # noqa: F401 (a fixture)


def _race(drv, monkeypatch, lent_fh: int, request, victim) -> dict:
    """Run ``request()`` with a pause right after it reads handle ``lent_fh``'s fd; in the
    pause, ``lent_fh`` is released and ``victim`` opened (taking the freed number)."""
    reached, go = threading.Event(), threading.Event()
    results: dict[str, object] = {}
    real_fd = drv.fs.files._fd

    def paused_fd(handle):
        fd = real_fd(handle)
        if handle.fh == lent_fh and not reached.is_set():
            reached.set()
            go.wait(10)
        return fd

    def run():
        try:
            results["reply"] = request()
        except Exception as e:  # noqa: BLE001 (reported by the caller)
            results["reply"] = e

    def release_and_open():
        drv.release(lent_fh)
        results["fd"] = os.open(victim, os.O_RDWR)

    monkeypatch.setattr(drv.fs.files, "_fd", paused_fd)
    threads = [threading.Thread(target=run), threading.Thread(target=release_and_open)]
    try:
        threads[0].start()
        assert reached.wait(10), "the request never read the handle's fd"
        threads[1].start()
        threads[1].join(0.5)  # released and reopened unless the fd is held against it
        go.set()
        for t in threads:
            t.join(10)
    finally:
        go.set()
        monkeypatch.undo()
        if isinstance(results.get("fd"), int):
            os.close(results["fd"])
    return results


def test_chown_of_a_nameless_file_strips_no_other_files_privileges(drv, tmp_path, monkeypatch):
    """fchown of an open file with no name left: SETATTR by node with the kill flag, whose
    ``kill_privs`` went through ``Files.kill_privs(fh)`` on the fd number of one of the
    node's handles with nothing held; that handle's RELEASE meanwhile let the victim's
    open take the number, and the victim lost its setuid bit and capability."""
    node, fh = drv.create(drv.root(), "f", os.O_RDWR, 0o644)
    drv.setattr(node, mode=0o4755)  # something for the kill to strip
    keep = drv.open(node, os.O_RDONLY)
    drv.unlink(drv.root(), "f")
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim data")
    os.chmod(victim, 0o4755)
    os.setxattr(victim, "security.capability", CAP)
    valid = p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID
    sa = SetAttr(valid, None, 0, 0, 0, 0, 1234, 5678)
    results = _race(drv, monkeypatch, fh, lambda: drv.ops.setattr(REQ, node.nodeid, sa), victim)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o4755
    assert "security.capability" in os.listxattr(victim)
    reply = results["reply"]
    assert not isinstance(reply, Exception), reply
    assert (reply.attr.uid, reply.attr.gid, stat.S_IMODE(reply.attr.mode)) == (1234, 5678, 0o755)
    assert stat.S_IMODE(drv.fstat(keep).mode) == 0o755
    drv.release(keep)


def test_getattr_of_a_file_named_elsewhere_shows_no_other_file(drv, tmp_path, monkeypatch):
    """fstat of an open file whose last name the table knew went while a name it does not
    know remains (a hard link): GETATTR by node through one of the node's handles
    (``Files.getattr(fh)``), which fstat'ed that handle's fd number with nothing held;
    its RELEASE meanwhile let the victim's open take the number: the victim's size came
    back."""
    node, fh = drv.create(drv.root(), "f", os.O_RDWR, 0o644)
    drv.write(fh, b"seventeen bytes!!", 0)
    keep = drv.open(node, os.O_RDONLY)
    os.link(tmp_path / "upper" / "f", tmp_path / "upper" / "g")  # a name the table lacks
    drv.unlink(drv.root(), "f")
    assert drv.ops.nodes.path(node.nodeid) is None and drv.ops.nodes.named_elsewhere(node.nodeid)
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    results = _race(drv, monkeypatch, fh, lambda: drv.ops.getattr(REQ, node.nodeid), victim)
    reply = results["reply"]
    assert not isinstance(reply, Exception), reply
    assert (reply.attr.size, reply.attr.nlink) == (17, 1)
    drv.release(keep)
