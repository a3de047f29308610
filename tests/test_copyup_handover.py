"""A SETATTR of a lower object copies it up without the namespace lock (refused in the lock
hold: ``CopyUpFirst``), then makes its change in a new hold. The copy-up's install hands its
own hold over to that change (``CopyUp.handing_over``): no other request's change lands in
between, and the change takes the copy as its lookup (``CopyUp.handed``). Driven without
FUSE (``OverlayOps``), counting the lookups a request makes, and checking each reply against
a GETATTR afterwards and the upper file itself."""
from __future__ import annotations

import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc.copyup import Seen
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr

TIMES = (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)


def _driver(tmp_path, **options) -> CoreDriver:
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_bytes(b"lower data")
    os.chmod(lower / "d" / "f", 0o4755)  # setuid: a chown's kill flag strips it
    (lower / "d" / "g").write_bytes(b"more")
    (lower / "top").write_bytes(b"at the root")
    os.symlink("f", lower / "d" / "link")
    return CoreDriver.in_dir(tmp_path, **options)


@pytest.fixture
def drv(tmp_path):
    helpers.require("root")  # (trusted.overlay.origin: what the copy's number comes from)
    d = _driver(tmp_path)
    yield d
    d.close()


def _counting(monkeypatch, drv: CoreDriver) -> list[str]:
    """The merged paths ``Lookup.lookup`` is asked for from now on."""
    asked: list[str] = []
    real = drv.fs.lookup.lookup

    def lookup(rel, **kw):
        asked.append(rel)
        return real(rel, **kw)
    monkeypatch.setattr(drv.fs.lookup, "lookup", lookup)
    return asked


def _node(drv: CoreDriver, path: str) -> int:
    parent = p.ROOT_ID
    for name in path.split("/"):
        parent = drv.ops.lookup(REQ, parent, os.fsencode(name)).nodeid
    return parent


SETATTRS = {
    "chmod": SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o100640, 0, 0),
    "chown": SetAttr(p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID, None, 0, 0, 0, 0, 1234, 5678),
    "utime": SetAttr(p.FATTR_ATIME | p.FATTR_MTIME, None, 0, TIMES[0], TIMES[1], 0, 0, 0),
    "truncate": SetAttr(p.FATTR_SIZE, None, 4, 0, 0, 0, 0, 0),
}


def _changed(kind: str, st: os.stat_result) -> bool:
    """Whether the upper file ``st`` shows the change ``kind`` made."""
    return {"chmod": stat.S_IMODE(st.st_mode) == 0o640,
            "chown": (st.st_uid, st.st_gid, st.st_mode & stat.S_ISUID) == (1234, 5678, 0),
            "utime": (st.st_atime_ns, st.st_mtime_ns) == TIMES,
            "truncate": st.st_size == 4}[kind]


@pytest.mark.parametrize("kind", sorted(SETATTRS))
def test_a_setattr_of_a_lower_file_looks_its_name_up_once(drv, tmp_path, monkeypatch, kind):
    """Before: chmod, chown and utime looked ``d/f`` up twice (the refused try, the try after
    the copy-up), a truncate eleven times (its steps and the reply each looked again). Its
    directory is in the upper already, as ``chmod -R`` leaves it (a copy-up of an ancestor
    first looks the name up again: the copy moved the epoch)."""
    drv.fs.copyup.ensure_upper("d")
    nodeid = _node(drv, "d/f")
    before = drv.ops.getattr(REQ, nodeid).attr
    asked = _counting(monkeypatch, drv)
    reply = drv.ops.setattr(REQ, nodeid, SETATTRS[kind]).attr
    assert asked.count("d/f") == 1, asked
    monkeypatch.undo()
    st = os.lstat(tmp_path / "upper" / "d" / "f")
    assert _changed(kind, st)
    # the reply is what a GETATTR shows now: the copy's number is the lower file's (its
    # origin), its other attributes the upper file's after the change
    after = drv.ops.getattr(REQ, nodeid).attr
    assert reply == after
    assert reply.ino == before.ino
    assert (reply.mode, reply.uid, reply.gid, reply.size, reply.mtime_ns, reply.ctime_ns) == \
        (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert drv.fs.copyup._handover.offered is None  # (offered for that one hold only)


def test_a_chmod_of_a_lower_file_at_the_root_looks_it_up_once(drv, tmp_path, monkeypatch):
    """The root's own fd is the parent a lookup of a name there holds."""
    nodeid = _node(drv, "top")
    asked = _counting(monkeypatch, drv)
    reply = drv.ops.setattr(REQ, nodeid, SETATTRS["chmod"]).attr
    assert asked == ["top"]
    assert stat.S_IMODE(reply.mode) == 0o640 == stat.S_IMODE(os.lstat(tmp_path / "upper" / "top").st_mode)


def test_a_chmod_of_a_lower_symlink_still_answers_as_before(drv, tmp_path):
    """A symlink's copy is handed over too; its chmod fails as any symlink's (EOPNOTSUPP),
    with the copy in place and the lock let go of."""
    nodeid = _node(drv, "d/link")
    with pytest.raises(OSError):
        drv.ops.setattr(REQ, nodeid, SETATTRS["chmod"])
    assert os.path.islink(tmp_path / "upper" / "d" / "link")
    assert not drv.fs.ns_lock._is_owned()


def test_the_install_hands_its_hold_over_with_the_copy_a_lookup_finds(drv):
    fs = drv.fs
    copy = fs.attrs.copy_up_for_setattr("d/g")
    assert copy is not None
    seen = fs.copyup.handing_over(copy, "d/g")
    try:
        assert isinstance(seen, Seen)
        assert fs.ns_lock._is_owned()  # (the install's hold: no other change can land)
        assert seen.epoch == fs.lookup.epoch
        fresh = fs.lookup.lookup("d/g")
        assert len(seen.node.entries) == len(fresh.entries) == 1
        got, want = seen.node.top, fresh.top
        assert (got.layer, got.rel, got.st.st_ino, got.st.st_ctime_ns) == \
            (want.layer, want.rel, want.st.st_ino, want.st.st_ctime_ns)
        assert got.parent is want.parent  # (the parent's fd the lookup holds)
        assert seen.node.upper is got and seen.node.data is None
    finally:
        fs.ns_lock.release()
    assert not fs.ns_lock._is_owned()


def test_nothing_is_handed_over_for_a_copy_another_call_made(drv):
    fs = drv.fs
    copy = fs.attrs.copy_up_for_setattr("d/g")
    fs.copyup.ensure_upper("d/g")  # (another request copied it up first)
    assert fs.copyup.handing_over(copy, "d/g") is None
    assert not fs.ns_lock._is_owned()


def test_a_directory_or_a_metadata_only_copy_is_not_handed_over(tmp_path):
    helpers.require("root")
    drv = _driver(tmp_path, metacopy=True)
    try:
        fs = drv.fs
        for rel in ("d", "d/g"):  # (a merged directory; a metacopy file, its data below)
            copy = fs.attrs.copy_up_for_setattr(rel)
            assert copy is not None
            assert fs.copyup.handing_over(copy, rel) is None
            assert not fs.ns_lock._is_owned()
            assert fs.lookup.lookup(rel).upper is not None
    finally:
        drv.close()


def test_a_failure_after_the_hand_over_lets_go_of_the_lock(drv, monkeypatch):
    fs = drv.fs

    def fails(method):
        raise OSError(5, "injected after the install")
    monkeypatch.setattr(fs.copyup.stats, "copy_up", fails)
    copy = fs.attrs.copy_up_for_setattr("d/g")
    with pytest.raises(OSError, match="injected"):
        fs.copyup.handing_over(copy, "d/g")
    assert not fs.ns_lock._is_owned()
    assert fs.copyup._handover.rel is None and not fs.copyup._handover.held


def test_a_handed_copy_is_not_taken_once_the_namespace_changed(drv):
    """``handed`` answers only while the epoch is the install's: a change of the namespace
    in the same hold (none runs there today) makes the change look the name up."""
    fs = drv.fs
    seen = fs.copyup.handing_over(fs.attrs.copy_up_for_setattr("d/g"), "d/g")
    try:
        fs.copyup.offer(seen)
        assert fs.copyup.handed("d/f") is None  # (another name)
        fs.lookup.changed()
        assert fs.copyup.handed("d/g") is None
        fs.copyup.offer(seen._replace(epoch=fs.lookup.epoch))
        assert fs.copyup.handed("d/g") is not None
        assert fs.copyup.handed("d/g") is None  # (taken once)
    finally:
        fs.copyup.offer(None)
        fs.ns_lock.release()


def test_the_copys_number_is_known_without_reading_its_origin(drv, monkeypatch):
    """The copy's number is kept under its stat at the install (``InodeNumbers.known``) and
    carried over the change (``carry``): the reply reads no origin xattr. Before: one
    lgetxattr of trusted.overlay.origin per chmod copy-up."""
    nodeid = _node(drv, "d/f")
    before = drv.ops.getattr(REQ, nodeid).attr
    inos = drv.fs.inos
    read = []
    real = inos._from_origin

    def from_origin(entry):
        read.append(entry.rel)
        return real(entry)
    monkeypatch.setattr(inos, "_from_origin", from_origin)
    reply = drv.ops.setattr(REQ, nodeid, SETATTRS["chmod"]).attr
    assert read == []
    assert reply.ino == before.ino


def _set_flags(path, flags: int) -> None:
    from overlaypc import sysapi
    fd = os.open(path, os.O_RDONLY)
    try:
        sysapi.set_flags(fd, flags)
    finally:
        os.close(fd)


@pytest.mark.parametrize("append_only", [False, True])
def test_the_handed_copy_names_the_private_xattrs_its_copy_up_wrote(drv, tmp_path, append_only):
    """copyup49: the handed copy's overlay-private xattr names (``Seen.private``) are those
    the upper file has, so its flags check (``Protection.of_copy``) answers as a lookup's
    would: none without ``protattr`` (no call), the copy's ``protattr`` where its source
    was append-only."""
    from overlaypc import protattr
    from overlaypc.copyup import is_private_xattr
    fs = drv.fs
    lower = tmp_path / "lower" / "d" / "g"
    if append_only:
        _set_flags(lower, protattr.FS_APPEND_FL)
    try:
        copy = fs.attrs.copy_up_for_setattr("d/g")
        assert copy is not None
        seen = fs.copyup.handing_over(copy, "d/g")
        try:
            assert seen is not None and seen.private is not None
            on_disk = {n for n in os.listxattr(tmp_path / "upper" / "d" / "g") if is_private_xattr(n)}
            assert set(seen.private) == on_disk
            assert (fs.protection.xattr in on_disk) == append_only
            flags = fs.protection.of_copy(seen.node, seen.private)
            assert flags == fs.protection.of_node(fs.lookup.lookup("d/g"))
            assert flags == (protattr.FS_APPEND_FL if append_only else 0)
        finally:
            fs.ns_lock.release()
    finally:
        if append_only:
            _set_flags(lower, 0)
