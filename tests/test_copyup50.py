"""copyup50: a chmod alone of a lower regular file is made by its copy-up (``Attributes.one_pass``,
``CopyUp.ensure_upper``'s ``mode``): the mode goes into the ``fchmod`` every copy gets (after its
ACLs, before its times and its install) and the reply is the copy handed over
(``CopyUpFirst.answer``, ``Seen.mode``): no second try, no ``fchmodat2``, no reply ``fstatat``.

Short against generic, driven without FUSE: two cores over one lower tree, each with its own
upper, one taking the one pass, the other with it turned off (``one_pass`` answering False,
the path every chmod of a lower file took before); each case runs the same requests on both
and compares the answer (attributes but ctime, or the error) and the state it leaves (the
upper file's mode, owner, times but ctime, size, data, every xattr: ACLs, origin, protattr;
its flags; the parent's times; ``workdir/work`` empty). Which path each side took is counted:
the one pass answers through ``Attributes.made`` and makes no chmod of its own
(``Ownership.chmod``); every case the guard sends to the generic path shows one chmod there
and no ``made``.
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

import helpers
from overlaypc import faults, sysapi
from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr
from overlaypc.idmap import IdMap
from overlaypc.overlay_ops import OverlayOps

from core_driver import REQ
from test_nodes_unit import Recorder

#: the lower's times: an atime after its mtime and ctime and ahead of the clock, which a read
#: (the first side's copy-up) does not move under ``relatime``: both sides copy the same
T_LOWER = (2_000_000_000_123_456_789, 1_600_000_000_987_654_321)
T_SET = (1_400_000_000_000_000_001, 1_450_000_000_000_000_002)
#: an access ACL: user 1234 rwx, group r-x, mask rwx (``acl.to_xattr``'s format)
ACL = (b"\x02\x00\x00\x00"
       b"\x01\x00\x06\x00\xff\xff\xff\xff"   # user_obj rw-
       b"\x02\x00\x07\x00\xd2\x04\x00\x00"   # user 1234 rwx
       b"\x04\x00\x05\x00\xff\xff\xff\xff"   # group_obj r-x
       b"\x10\x00\x07\x00\xff\xff\xff\xff"   # mask rwx
       b"\x20\x00\x04\x00\xff\xff\xff\xff")  # other r--


def _chattr(path: Path, flags: str) -> None:
    subprocess.run(["chattr", flags, str(path)], check=True, capture_output=True)


@pytest.fixture
def lower(tmp_path, request):
    """The lower tree every case's sides share; its flags dropped again at the end."""
    helpers.require("root")  # (trusted.overlay.origin, chown, flags)
    lo = tmp_path / "lower"
    (lo / "d" / "sub").mkdir(parents=True)
    files = {"plain": 0o644, "suid": 0o4755, "acl": 0o674, "xattr": 0o600, "noatime": 0o644,
             "sync": 0o640, "linked": 0o644, "immutable": 0o644, "append": 0o644,
             "other": 0o644}
    for name, mode in files.items():
        f = lo / "d" / name
        f.write_bytes(b"data of " + name.encode() * 50)
        os.chmod(f, mode)
    (lo / "top").write_bytes(b"at the root")
    os.chown(lo / "d" / "suid", 1234, 5678)
    os.chmod(lo / "d" / "suid", 0o4755)
    os.setxattr(lo / "d" / "acl", "system.posix_acl_access", ACL)
    os.setxattr(lo / "d" / "xattr", "user.note", b"kept")
    os.setxattr(lo / "d" / "xattr", "trusted.mine", b"root's")
    os.link(lo / "d" / "linked", lo / "d" / "linked2")
    os.symlink("plain", lo / "d" / "link")
    for q in [*lo.rglob("*"), lo]:
        os.utime(q, ns=T_LOWER, follow_symlinks=False)
    request.addfinalizer(lambda: [_chattr(lo / "d" / name, "-ia") for name in ("immutable", "append")])
    _chattr(lo / "d" / "noatime", "+A")
    _chattr(lo / "d" / "sync", "+S")
    _chattr(lo / "d" / "immutable", "+i")
    _chattr(lo / "d" / "append", "+a")
    return lo


class Side:
    """One core over ``lower`` with its own upper; ``one_pass`` False: the generic path."""

    def __init__(self, base: Path, lower: Path, one_pass: bool, **options) -> None:
        for d in ("upper", "work", "mnt"):
            (base / d).mkdir(parents=True)
        self.base = base
        self.cfg = MountConfig(lowers=[str(lower)], upper=str(base / "upper"),
                               work=str(base / "work"), mountpoint=str(base / "mnt"), **options)
        validate(self.cfg)
        self._umask = os.umask(0)
        self.fs = fs = OverlayFS(self.cfg)
        fs.start()
        self.ops = OverlayOps(fs)
        self.ops.notifier = Recorder()
        self.made = self.chmods = 0
        if not one_pass:
            fs.attrs.one_pass = lambda node: False
        real_made, real_chmod = fs.attrs.made, fs.ownership.chmod

        def made(seen, rel):
            self.made += 1
            return real_made(seen, rel)

        def chmod(entry, mode):
            self.chmods += 1
            return real_chmod(entry, mode)
        fs.attrs.made = made
        fs.ownership.chmod = chmod

    def close(self) -> None:
        os.umask(self._umask)
        self.fs.close()
        self.fs.lookup.invalidate()

    def node(self, path: str) -> int:
        nodeid = p.ROOT_ID
        for name in path.split("/"):
            nodeid = self.ops.lookup(REQ, nodeid, os.fsencode(name)).nodeid
        return nodeid

    def rename(self, old: str, new: str) -> None:
        """A RENAME of a name at the root (the node table follows it)."""
        self.ops.rename(REQ, p.ROOT_ID, os.fsencode(old), p.ROOT_ID, os.fsencode(new), 0)

    def setattr(self, path: str, sa: SetAttr):
        """The reply's attributes but ctime, or the error's name."""
        try:
            a = self.ops.setattr(REQ, self.node(path), sa).attr
        except OSError as e:
            return errno.errorcode.get(e.errno, e.errno)
        return _attr(a)

    def getattr(self, path: str):
        return _attr(self.ops.getattr(REQ, self.node(path)).attr)

    def state(self, path: str) -> dict:
        """What the change left: the upper object and its parent, the workdir."""
        upper = self.base / "upper"
        out = {"work": sorted(os.listdir(self.base / "work" / "work"))}
        q = upper / path
        try:
            st = os.lstat(q)
        except FileNotFoundError:
            return {**out, "upper": None}
        out["upper"] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size, st.st_nlink, st.st_atime_ns, st.st_mtime_ns)
        names = sorted(os.listxattr(q, follow_symlinks=False))
        out["xattrs"] = {n: os.getxattr(q, n, follow_symlinks=False) for n in names}
        if stat.S_ISREG(st.st_mode):
            fd = os.open(q, os.O_RDONLY | os.O_NOATIME)
            try:
                out["data"] = os.read(fd, 1 << 16)
                out["flags"] = sysapi.get_flags(fd)
            finally:
                os.close(fd)
        if q.parent != upper:  # (each side's upper root is its own)
            parent = os.lstat(q.parent)
            out["parent"] = (stat.S_IMODE(parent.st_mode), parent.st_atime_ns, parent.st_mtime_ns)
        return out


def _attr(a) -> tuple:
    """A reply's attributes but ctime."""
    return (a.ino, a.mode, a.nlink, a.uid, a.gid, a.size, a.blocks, a.atime_ns, a.mtime_ns)


def _mode(mode: int) -> SetAttr:
    return SetAttr(p.FATTR_MODE, None, 0, 0, 0, stat.S_IFREG | mode, 0, 0)


CHMOD = _mode(0o640)
CHMOD_D = SetAttr(p.FATTR_MODE, None, 0, 0, 0, stat.S_IFDIR | 0o750, 0, 0)

#: case -> (path, SetAttr, MountConfig options, whether the one pass makes it). The parent is
#: copied up first (chmod -R's order: a directory's own chmod comes before its files')
CASES = {
    # the one pass
    "plain": ("d/plain", CHMOD, {}, True),
    "setuid file to setuid and setgid": ("d/suid", _mode(0o6750), {}, True),
    "setuid dropped": ("d/suid", _mode(0o755), {}, True),
    "sticky and every bit": ("d/plain", _mode(0o7777), {}, True),
    "no bit": ("d/plain", _mode(0), {}, True),
    "the same mode": ("d/plain", _mode(0o644), {}, True),
    "an access ACL (the mask)": ("d/acl", _mode(0o604), {}, True),
    "xattrs": ("d/xattr", _mode(0o444), {}, True),
    "noatime flag": ("d/noatime", CHMOD, {}, True),
    "sync flag": ("d/sync", CHMOD, {}, True),
    "at the root": ("top", CHMOD, {}, True),
    "redirect_dir": ("d/plain", CHMOD, {"redirect_dir": "on"}, True),
    "volatile": ("d/plain", CHMOD, {"volatile": True}, True),
    # the generic path
    "owner": ("d/plain", SetAttr(p.FATTR_UID | p.FATTR_GID, None, 0, 0, 0, 0, 1234, 5678), {}, False),
    "mode and owner": ("d/plain", SetAttr(p.FATTR_MODE | p.FATTR_UID, None, 0, 0, 0,
                                          stat.S_IFREG | 0o600, 1234, 0), {}, False),
    "mode and kill flag": ("d/suid", SetAttr(p.FATTR_MODE | p.FATTR_KILL_SUIDGID, None, 0, 0, 0,
                                             stat.S_IFREG | 0o4700, 0, 0), {}, False),
    "times": ("d/plain", SetAttr(p.FATTR_ATIME | p.FATTR_MTIME, None, 0, *T_SET, 0, 0, 0), {}, False),
    "mode and times": ("d/plain", SetAttr(p.FATTR_MODE | p.FATTR_MTIME, None, 0, 0, T_SET[1],
                                          stat.S_IFREG | 0o600, 0, 0), {}, False),
    "size": ("d/plain", SetAttr(p.FATTR_SIZE, None, 3, 0, 0, 0, 0, 0), {}, False),
    "hard-linked lower": ("d/linked", CHMOD, {}, False),
    "directory": ("d/sub", CHMOD_D, {}, False),
    "symlink": ("d/link", _mode(0o600), {}, False),
    "upper file": ("d/other", CHMOD, {}, False),
    "metacopy=on": ("d/plain", CHMOD, {"metacopy": True, "redirect_dir": "on"}, False),
    "index=on": ("d/plain", CHMOD, {"index": True}, False),
    "uidmapping": ("d/plain", CHMOD, {"uidmapping": IdMap.parse("0:0:65536")}, False),
    "squash_to_root": ("d/plain", CHMOD, {"squash_to_root": True}, False),
    "xattr_permissions": ("d/plain", CHMOD, {"xattr_permissions": 2}, False),
    "immutable: EPERM first": ("d/immutable", CHMOD, {}, False),
    "append-only: EPERM first": ("d/append", CHMOD, {}, False),
    "parent not in the upper": ("d/plain", CHMOD, {}, False),
}


#: cases whose times are the clock's (a truncate's mtime) or whose number is the copy's own (a
#: hard link's copy has no origin): each side's, not compared
NOW_TIMES, OWN_NUMBER = {"size"}, {"hard-linked lower"}


def _mask(case: str, got):
    """``got`` (a reply's attributes or a state) without what ``case`` makes each side's own."""
    if isinstance(got, dict):
        if case in NOW_TIMES and got.get("upper"):
            got = {**got, "upper": got["upper"][:6]}
        return got
    if isinstance(got, str):
        return got
    if case in NOW_TIMES:
        got = got[:7]
    if case in OWN_NUMBER:
        got = got[1:]
    return got


def _prepare(side: Side, case: str) -> None:
    if case != "parent not in the upper" and case != "at the root":
        side.setattr("d", CHMOD_D)  # (copies d up)
    if case == "upper file":
        side.setattr("d/other", _mode(0o600))


def _sides(tmp_path: Path, lower: Path, options: dict):
    return (Side(tmp_path / "one", lower, True, **options),
            Side(tmp_path / "generic", lower, False, **options))


@pytest.mark.parametrize("case", list(CASES))
def test_the_one_pass_answers_and_leaves_what_the_generic_path_does(case, lower, tmp_path):
    path, sa, options, one = CASES[case]
    sides = _sides(tmp_path, lower, options)
    try:
        got = []
        for side in sides:
            _prepare(side, case)
            side.made = side.chmods = 0
            reply = side.setattr(path, sa)
            after = side.getattr(path)
            got.append((_mask(case, reply), _mask(case, side.state(path)),
                        (side.made, side.chmods), _mask(case, after)))
            if not isinstance(reply, str):
                assert reply == after  # (the reply is what a GETATTR shows after it)
        (reply, state, counts, after), (g_reply, g_state, g_counts, g_after) = got
        assert reply == g_reply
        assert state == g_state
        assert after == g_after
        if one:
            assert counts == (1, 0), "not made by the copy-up"
            assert state["upper"][1] == stat.S_IMODE(sa.mode)
        else:
            assert counts == g_counts and counts[0] == 0, "made by the copy-up"
            if sa.valid & p.FATTR_MODE and not isinstance(reply, str):
                assert counts[1] == 1, "the generic path's chmod not made"
    finally:
        for side in reversed(sides):  # (each restores the umask it found)
            side.close()


# -- guard cases that need a step between the first try and the answer ----------------------------
def _stale_epoch(side: Side) -> None:
    """Another change of the namespace between the refused try and the copy-up: the copy-up
    looks the name up again and may find another object there; it makes no chmod then."""
    real = side.fs.copyup.handing_over

    def handing_over(copy, rel):
        side.fs.lookup.changed()
        return real(copy, rel)
    side.fs.copyup.handing_over = handing_over


def _not_handed(side: Side) -> None:
    """A copy not handed over (its parent not cached): the mode is in it, and the change, in a
    hold of its own, chmods it again (the same mode)."""
    side.fs.copyup._hand_over = lambda ctx, entry, parent: False


def _during_install(change):
    """Arm ``change`` to run at the copy-up's install, as another request would meanwhile.
    It runs on this thread, inside the copy-up: the stripe locks become reentrant for it,
    as a change of another name, on another thread, takes its own stripe (with plain
    locks, the one suite run in 64 where ``hash('e')`` and ``hash('d/plain')`` share a
    stripe waited for itself: PYTHONHASHSEED=120)."""
    def arm(side: Side) -> None:
        copyup = side.fs.copyup
        copyup._stripes = [threading.RLock() for _ in copyup._stripes]
        done = []

        def hook(point, *args):
            if not done:  # (once: the change may copy up, and so reach this point, itself)
                done.append(None)
                change(side)
        faults.install("copyup.rename", hook)
    return arm


#: case -> (path, what to arm on each side, one pass made)
RACES = {
    "another change before the copy-up": ("d/plain", _stale_epoch, False),
    "not handed over": ("d/plain", _not_handed, False),
    # (review50a) a change of another name while the copy is built (the epoch moved): the install
    # looks the name up again, finds the same lower file there and installs; the answer is given
    "another change during the copy-up": ("d/plain", _during_install(
        lambda side: side.fs.lookup.changed()), True),
    # a directory moved elsewhere while the copy is built: its install lands, the answer not
    # given (the move count moved), the change runs again in a new hold
    "a move elsewhere during the copy-up": ("d/plain", _during_install(
        lambda side: side.rename("e", "e2")), False),
    # the parent moved: the install finds no name, the request starts over with the new path
    # in the namespace lock, where its copy-up runs (``refusing()``), and chmods as generic
    "the parent moved during the copy-up": ("d/plain", _during_install(
        lambda side: side.rename("d", "d2")), False),
}


@pytest.mark.parametrize("case", list(RACES))
def test_a_change_meanwhile_leaves_the_chmod_to_the_generic_path(case, lower, tmp_path):
    path, arm, one = RACES[case]
    (lower / "e").mkdir(exist_ok=True)
    sides = _sides(tmp_path, lower, {})
    try:
        got = []
        for side in sides:
            _prepare(side, case)
            nodeid = side.node(path)
            side.made = side.chmods = 0
            arm(side)
            try:
                a = side.ops.setattr(REQ, nodeid, CHMOD).attr
            finally:
                faults.configure(None)
            after = side.ops.getattr(REQ, nodeid).attr
            assert _attr(a) == _attr(after)
            assert not side.fs.ns_lock._is_owned() and side.fs.copyup._handover.offered is None
            moved = "d2/plain" if "parent moved" in case else path
            got.append((_attr(a), side.state(moved), (side.made, side.chmods)))
        (reply, state, counts), (g_reply, g_state, g_counts) = got
        assert (reply, state) == (g_reply, g_state)
        assert state["upper"][1] == 0o640
        assert counts == ((1, 0) if one else (0, 1)) and g_counts == (0, 1)
    finally:
        for side in reversed(sides):
            side.close()


def test_an_immutable_source_whose_flags_were_not_asked_is_left_to_the_change(lower, tmp_path):
    """The change's check reads a lower file's flags before its copy-up and answers EPERM for
    a chmod of an immutable or append-only one; asked without it (``check`` None: a core
    caller), the copy-up sees the flags itself and makes no chmod: the change does, as before."""
    sides = _sides(tmp_path, lower, {})
    try:
        got = []
        for side in sides:
            side.setattr("d", CHMOD_D)
            side.made = side.chmods = 0
            side.fs.setattr("d/immutable", mode=stat.S_IFREG | 0o600)
            got.append((side.state("d/immutable"), side.chmods, side.made))
        assert got[0] == got[1]
        state, chmods, made = got[0]
        assert (state["upper"][1], chmods, made) == (0o600, 1, 0)
        assert state["xattrs"]["trusted.overlay.protattr"]
    finally:
        for side in reversed(sides):
            side.close()


def test_the_one_pass_makes_no_chmod_and_reads_no_stat_after_the_install(lower, tmp_path,
                                                                          monkeypatch):
    """Per chmod of a lower file: no ``fchmodat2`` (``Layer.do_chmod``) and no stat of the copy
    after its install's (``Attributes._refreshed``); the copy's ``fsync`` sees it with its new
    mode; the reply's number is the lower file's (its origin, kept at the install)."""
    side = Side(tmp_path / "one", lower, True)
    try:
        side.setattr("d", CHMOD_D)
        nodeid = side.node("d/xattr")
        side.made = side.chmods = 0
        counts = {"chmod": 0, "refreshed": 0}
        real_chmod, real_refreshed = side.fs.stack.upper.do_chmod, side.fs.attrs._refreshed

        def do_chmod(*a, **kw):
            counts["chmod"] += 1
            return real_chmod(*a, **kw)

        def refreshed(*a, **kw):
            counts["refreshed"] += 1
            return real_refreshed(*a, **kw)
        monkeypatch.setattr(side.fs.stack.upper, "do_chmod", do_chmod)
        monkeypatch.setattr(side.fs.attrs, "_refreshed", refreshed)
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append(os.fstat(fd))
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        a = side.ops.setattr(REQ, nodeid, _mode(0o4711)).attr
        monkeypatch.undo()
        assert counts == {"chmod": 0, "refreshed": 0}
        assert [stat.S_IMODE(s.st_mode) for s in synced if stat.S_ISREG(s.st_mode)] == [0o4711]
        st = os.lstat(tmp_path / "one" / "upper" / "d" / "xattr")
        assert (a.mode, a.ino, a.ctime_ns) == (st.st_mode, os.lstat(lower / "d" / "xattr").st_ino,
                                               st.st_ctime_ns)
        assert side.made == 1 and side.chmods == 0
    finally:
        side.close()


# -- review50a: a copy-up failing after its rename ------------------------------------------------
def _fsync_dir_fails(side: Side, monkeypatch) -> None:
    """The parent's fsync after the rename fails (EIO): the copy is in place, the copy-up fails."""
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "injected")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def _readable_dir_fails(side: Side, monkeypatch) -> None:
    """The parent's readable fd cannot be opened (EMFILE) after the rename: its times are not
    kept (best effort), its fsync fails the copy-up."""
    def readable_dir(held, rel):
        raise OSError(errno.EMFILE, "injected")
    monkeypatch.setattr(side.fs.stack.upper, "readable_dir", readable_dir)


@pytest.mark.parametrize("fail", [_fsync_dir_fails, _readable_dir_fails])
def test_a_chmod_whose_copy_up_fails_after_its_rename_leaves_the_mode_as_the_generic_path(
        fail, lower, tmp_path, monkeypatch):
    """review50a: a step of the install after the rename fails (the parent's fsync, its fd at
    the fd limit): the copy is in place and the chmod answers the error. The generic path's
    copy has the lower file's mode (its chmod never ran); the one pass's must not have the
    chmod's mode either (an error answered for a chmod that was made)."""
    sides = _sides(tmp_path, lower, {})
    try:
        got = []
        for side in sides:
            side.setattr("d", CHMOD_D)
            nodeid = side.node("d/plain")
            with monkeypatch.context() as m:
                fail(side, m)
                try:
                    reply = _attr(side.ops.setattr(REQ, nodeid, CHMOD).attr)
                except OSError as e:
                    reply = errno.errorcode[e.errno]
            assert not side.fs.ns_lock._is_owned() and side.fs.copyup._handover.offered is None
            got.append((reply, side.state("d/plain"), _attr(side.ops.getattr(REQ, nodeid).attr)))
        # (one pass, generic): the copy's mode on disk, the mode a GETATTR shows after
        assert [(g[1]["upper"][1], stat.S_IMODE(g[2][1])) for g in got] == [(0o644, 0o644)] * 2
        if fail is _readable_dir_fails:  # (the parent's times not kept on either side: now)
            for g in got:
                g[1]["parent"] = g[1]["parent"][:2]
        assert got[0] == got[1]
        assert isinstance(got[0][0], str)
    finally:
        for side in reversed(sides):
            side.close()
