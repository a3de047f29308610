"""The engine's short SETATTR, GETXATTR ``security.capability`` and RELEASE of an open file
(``OverlayOps._setattr_short``, ``_capability_short``, ``release_fh``; ``Session``'s short
handlers): they answer as the generic path (``setattr``, ``getxattr``, ``release``) does,
and leave to it, with nothing done, every case their guard excludes. Driven without FUSE
(``core_driver``: the hooks called as the session calls them; ``engine_support``'s fake
kernel for the session's side), and through mounts against the kernel's overlay (fchmod,
fchown and futimens of an open file: the requests the short path answers, and the
files renamed, unlinked, linked or lower that it leaves to the generic one)."""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver, NodeRef
from engine_support import FakeKernel, MemoryOps
from overlaypc import faults
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr
from upper_support import stack_options

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
T = 1_600_000_000_123_456_789


class Recorder:
    """A notifier that keeps what it was asked (``inval_inode`` after a strip)."""

    def __init__(self) -> None:
        self.inval: list[tuple] = []

    def inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> None:
        self.inval.append((nodeid, offset, length))

    def inval_entry(self, parent: int, name: bytes) -> None:
        pass

    def delete(self, parent: int, child: int, name: bytes) -> None:
        pass


@pytest.fixture
def drv(tmp_path):
    helpers.require("root")  # chown, and security.capability (CAP_SETFCAP)
    d = CoreDriver.in_dir(tmp_path)
    d.ops.notifier = Recorder()
    yield d
    d.close()


def _fields(valid: int, atime: int | None = 0, mtime: int | None = 0, mode: int = 0,
            uid: int = 0, gid: int = 0, fh: int | None = None, size: int = 0) -> tuple:
    """``SETATTR_IN`` unpacked, as the session hands it to ``setattr_node``."""
    return p.SETATTR_IN.unpack(SetAttr(valid, fh, size, atime, mtime, mode, uid, gid).encode())


def _short(drv: CoreDriver, node: NodeRef, *args, **kw) -> bytes | None:
    return drv.ops.setattr_node(0, 0, os.getpid(), node.nodeid, _fields(*args, **kw))


def _generic(drv: CoreDriver, node: NodeRef, valid: int, atime=0, mtime=0, mode=0, uid=0, gid=0):
    return drv.ops.setattr(REQ, node.nodeid, SetAttr(valid, None, 0, atime, mtime, mode, uid, gid))


def _shown(reply: bytes, times: bool = True) -> tuple:
    """A packed ``fuse_attr_out`` as compared: its timeout and attributes, but the inode
    number (two files), the ctime, the atime (each file's own where not set: a step sets
    both or none), and (``times`` False) the mtime (once set to now)."""
    s, ns = p.ATTR_OUT.unpack_from(reply)[:2]
    a = p.unpack_attr(reply, p.ATTR_HEAD.size)
    return (s, ns, a.size, a.blocks, a.mtime_ns if times else None, a.mode, a.nlink, a.uid,
            a.gid, a.rdev)


def _on_disk(path, times: bool = True) -> tuple:
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size,
            st.st_mtime_ns if times else None, sorted(os.listxattr(path)))


#: (valid, atime, mtime, mode, uid, gid): as tar sends them, then others
STEPS = [
    (p.FATTR_MTIME, 0, T, 0, 0, 0),                                   # tar's (atime omitted)
    (p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID, 0, 0, 0, 1234, 5678),
    (p.FATTR_MODE, 0, 0, 0o6755, 0, 0),
    (p.FATTR_ATIME | p.FATTR_MTIME, T - 9, T - 9, 0, 0, 0),
    (p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID, 0, 0, 0, 99, 98),   # strips both bits
    (p.FATTR_MODE, 0, 0, 0o2750, 0, 0),
    (p.FATTR_GID | p.FATTR_KILL_SUIDGID, 0, 0, 0, 0, 4242),
    (p.FATTR_MODE | p.FATTR_UID | p.FATTR_ATIME_NOW | p.FATTR_MTIME, 0, T, 0o4711, 7, 0),
    (p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW | p.FATTR_ATIME | p.FATTR_MTIME, 0, 0, 0, 0, 0),
    (p.FATTR_KILL_SUIDGID, 0, 0, 0, 0, 0),                            # a kill alone
]


def test_the_short_setattr_answers_as_the_generic_one(drv, tmp_path):
    """Each step on two open files, one through the short path, one through ``setattr``
    (which goes through the handle too, ``Files.setattr_open``): the same replies (the
    timeout too), files, invalidations, change count and data version."""
    root = drv.root()
    files = {}
    for name in ("short", "generic"):
        node, fh = drv.create(root, name, os.O_WRONLY, 0o644)
        drv.write(fh, b"data", 0)
        files[name] = node, fh
    short, generic = files["short"][0], files["generic"][0]
    inodes = {n: drv.fs.handles.get(fh).inode for n, (_, fh) in files.items()}
    recorder = drv.ops.notifier
    times = True  # (False once an mtime was set to now: each file's own from then on)
    for step in STEPS:
        valid = step[0]
        times = times and not valid & p.FATTR_MTIME_NOW
        if valid & p.FATTR_KILL_SUIDGID:  # something for the kill to strip
            for node, _ in files.values():
                drv.ops.setxattr(REQ, node.nodeid, "security.capability", CAP, 0)
        versions = {n: inode.data_version for n, inode in inodes.items()}
        change = drv.ops._change
        recorder.inval.clear()
        reply = _short(drv, short, *step)
        assert reply is not None, f"SETATTR {valid:#x} of an open upper file left to setattr"
        assert drv.ops._change != change, "the short SETATTR voided no listing's stats"
        short_inval = [(n == short.nodeid, o) for n, o, _ in recorder.inval]
        recorder.inval.clear()
        r = _generic(drv, generic, *step)
        generic_reply = p.pack_attr_out(r.attr, r.timeout)
        assert _shown(reply, times) == _shown(generic_reply, times), f"SETATTR {valid:#x}"
        if valid & p.FATTR_ATIME and not valid & p.FATTR_ATIME_NOW:
            assert p.unpack_attr(reply, p.ATTR_HEAD.size).atime_ns == step[1]
        assert short_inval == [(n == generic.nodeid, o) for n, o, _ in recorder.inval]
        assert _on_disk(tmp_path / "upper" / "short", times) == \
            _on_disk(tmp_path / "upper" / "generic", times)
        for n, inode in inodes.items():
            assert inode.data_version == versions[n], f"{n}: SETATTR {valid:#x} moved the data version"
        assert p.unpack_attr(reply, p.ATTR_HEAD.size).ino == drv.getattr(short).ino
    # the chowns stripped (and said so) as Linux's chown does
    assert stat.S_IMODE(os.lstat(tmp_path / "upper" / "short").st_mode) == 0o711
    for _, fh in files.values():
        drv.release(fh)
    drv.settle()


def _lower_file(drv, tmp_path, name="low"):
    (tmp_path / "lower" / name).write_bytes(b"lower data\n")
    return drv.lookup(drv.root(), name)


#: each case: a name and a function (driver, tmp_path) -> (node, fields, cleanup), for a
#: SETATTR the short path must leave to ``setattr``
def _open_file(drv, name="f"):
    node, fh = drv.create(drv.root(), name, os.O_WRONLY, 0o644)
    return node, fh


def _case_size(drv, tmp_path):
    node, fh = _open_file(drv)
    return node, _fields(p.FATTR_SIZE | p.FATTR_MODE, mode=0o600, size=1), [fh]


def _case_fh(drv, tmp_path):
    node, fh = _open_file(drv)
    return node, _fields(p.FATTR_FH | p.FATTR_MODE, mode=0o600, fh=fh), [fh]


def _case_lock_owner(drv, tmp_path):
    node, fh = _open_file(drv)
    return node, _fields(p.FATTR_LOCKOWNER | p.FATTR_MODE, mode=0o600), [fh]


def _case_nothing_asked(drv, tmp_path):  # chown(f, -1, -1): ``_may_strip`` decides
    node, fh = _open_file(drv)
    return node, _fields(0), [fh]


def _case_closed(drv, tmp_path):
    node, fh = _open_file(drv)
    drv.release(fh)
    return node, _fields(p.FATTR_MODE, mode=0o600), []


def _case_unlinked(drv, tmp_path):
    node, fh = _open_file(drv)
    drv.unlink(drv.root(), "f")
    return node, _fields(p.FATTR_MODE, mode=0o600), [fh]


def _case_two_links(drv, tmp_path):
    node, fh = _open_file(drv)
    drv.link(node, drv.root(), "g")
    return node, _fields(p.FATTR_MODE, mode=0o600), [fh]


def _case_lower_read_only(drv, tmp_path):
    node = _lower_file(drv, tmp_path)
    fh = drv.open(node, os.O_RDONLY)
    return node, _fields(p.FATTR_MODE, mode=0o600), [fh]


def _case_directory(drv, tmp_path):
    node = drv.mkdir(drv.root(), "d", 0o755)
    return node, _fields(p.FATTR_MODE, mode=0o700), []


def _case_faults_armed(drv, tmp_path):
    node, fh = _open_file(drv)
    faults.install("ops.nothing", lambda *a: None)
    return node, _fields(p.FATTR_MODE, mode=0o600), [fh]


GUARDED = [_case_size, _case_fh, _case_lock_owner, _case_nothing_asked, _case_closed,
           _case_unlinked, _case_two_links, _case_lower_read_only, _case_directory,
           _case_faults_armed]


@pytest.mark.parametrize("case", GUARDED, ids=lambda c: c.__name__[6:])
def test_the_short_setattr_leaves_the_rest_to_setattr(drv, tmp_path, case):
    """None, with nothing changed (files, change count, invalidations), wherever
    ``setattr`` might answer otherwise or do more; ``setattr`` then answers."""
    node, fields, fhs = case(drv, tmp_path)
    try:
        before = {n: _on_disk(tmp_path / "upper" / n) for n in sorted(os.listdir(tmp_path / "upper"))}
        change = drv.ops._change
        assert drv.ops.setattr_node(0, 0, os.getpid(), node.nodeid, fields) is None
        assert drv.ops._change == change and drv.ops.notifier.inval == []
        after = {n: _on_disk(tmp_path / "upper" / n) for n in sorted(os.listdir(tmp_path / "upper"))}
        assert after == before
    finally:
        faults.configure(None)
    for fh in fhs:
        drv.release(fh)
    drv.settle()


def test_no_short_setattr_where_owners_are_shown_mapped_or_the_mount_is_read_only(tmp_path):
    """``Files.setattr_open`` never answers under an ownership mapping (the name's path
    shows owners), and a read-only mount answers EROFS by name: no hook there."""
    helpers.require("root")
    squashed = CoreDriver.in_dir(tmp_path / "a", squash_to_uid=4321)
    try:
        assert squashed.ops.setattr_node is None
        assert squashed.ops.capability_node is not None  # (the capability is stored as is)
    finally:
        squashed.close()
    (tmp_path / "b" / "lower").mkdir(parents=True)
    from overlaypc.config import MountConfig, validate
    from overlaypc.core import OverlayFS
    from overlaypc.overlay_ops import OverlayOps
    cfg = MountConfig(lowers=[str(tmp_path / "b" / "lower")], mountpoint=str(tmp_path))
    validate(cfg)
    fs = OverlayFS(cfg)
    fs.start()
    try:
        assert OverlayOps(fs).setattr_node is None
    finally:
        fs.close()


def test_the_short_capability_answers_as_getxattr(drv, tmp_path):
    """ENODATA (an errno, no exception) for an open upper file without one, its value
    with one (read through the handle, as ``getxattr``), None without a handle or where
    the handle is not on an upper file (the name decides, ``getxattr``)."""
    root = drv.root()
    node, fh = drv.create(root, "f", os.O_WRONLY, 0o644)
    assert drv.ops.capability_node(node.nodeid) == errno.ENODATA
    assert drv.ops.capability_node(node.nodeid) == errno.ENODATA  # (known clean now)
    drv.ops.setxattr(REQ, node.nodeid, "security.capability", CAP, 0)
    assert drv.ops.capability_node(node.nodeid) == CAP == drv.ops.getxattr(REQ, node.nodeid,
                                                                           "security.capability")
    drv.release(fh)
    assert drv.ops.capability_node(node.nodeid) is None
    low = _lower_file(drv, tmp_path)
    os.setxattr(tmp_path / "lower" / "low", "security.capability", CAP)
    fh = drv.open(low, os.O_RDONLY)
    assert drv.ops.capability_node(low.nodeid) is None
    assert drv.ops.getxattr(REQ, low.nodeid, "security.capability") == CAP
    drv.release(fh)
    drv.settle()


# -- the session's side ---------------------------------------------------------------------
class ShortOps(MemoryOps):
    """``MemoryOps`` with the three hooks, answering from ``answers`` (None: leave it to
    the generic method, an exception: raised)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, object] = {}
        self.setattr_node = lambda uid, gid, pid, nodeid, fields: self._hook(
            "setattr_node", (uid, gid, pid, nodeid, fields[0]))
        self.capability_node = lambda nodeid: self._hook("capability_node", (nodeid,))
        self.release_fh = lambda nodeid, fh, flags: self._hook("release_fh", (nodeid, fh, flags))

    def _hook(self, name: str, args: tuple):
        self._rec(name, *args)
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _session(ops, **kw) -> FakeKernel:
    fk = FakeKernel(ops, **kw)
    fk.start()
    return fk


def test_the_session_answers_through_the_hooks_and_falls_back():
    ops = ShortOps()
    fk = _session(ops)
    try:
        f = ops.add(p.ROOT_ID, b"f", stat.S_IFREG | 0o644, b"abc")
        attr_out = p.pack_attr_out(p.FileAttr(f, 3, 0, 0, 0, 0, stat.S_IFREG | 0o600, 1, 0, 0, 0, 4096), 1.0)
        ops.answers["setattr_node"] = attr_out
        body = SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o600, 0, 0).encode()
        assert fk.ok(p.SETATTR, f, body, uid=5, gid=6, pid=7) == attr_out
        assert ops.called("setattr_node") == [(5, 6, 7, f, p.FATTR_MODE)]
        assert ops.called("setattr") == []
        ops.answers["setattr_node"] = None  # left to ``setattr``
        fk.ok(p.SETATTR, f, body)
        assert len(ops.called("setattr")) == 1
        ops.answers["setattr_node"] = PermissionError(errno.EPERM, "no")
        assert fk.request(p.SETATTR, f, body).error == -errno.EPERM
        ops.answers["setattr_node"] = RuntimeError("bug")
        assert fk.request(p.SETATTR, f, body).error == -errno.EIO and ops.errors == 1

        cap = p.GETXATTR_IN.pack(0, 0) + b"security.capability\0"
        ops.answers["capability_node"] = errno.ENODATA
        assert fk.request(p.GETXATTR, f, cap).error == -errno.ENODATA
        ops.answers["capability_node"] = CAP
        assert fk.ok(p.GETXATTR, f, cap) == p.GETXATTR_OUT.pack(len(CAP), 0)     # size 0
        assert fk.ok(p.GETXATTR, f, p.GETXATTR_IN.pack(64, 0) + b"security.capability\0") == CAP
        assert fk.request(p.GETXATTR, f, p.GETXATTR_IN.pack(len(CAP) - 1, 0)
                          + b"security.capability\0").error == -errno.ERANGE
        assert len(ops.called("capability_node")) == 4
        # another name is not asked; None leaves it to ``getxattr`` (MemoryOps': the node's)
        ops.nodes[f].xattrs.update({"user.other": b"other", "security.capability": b"generic"})
        sized = p.GETXATTR_IN.pack(64, 0)
        assert fk.ok(p.GETXATTR, f, sized + b"user.other\0") == b"other"
        assert len(ops.called("capability_node")) == 4
        ops.answers["capability_node"] = None
        assert fk.ok(p.GETXATTR, f, sized + b"security.capability\0") == b"generic"
        assert len(ops.called("capability_node")) == 5

        fh = p.OPEN_OUT.unpack_from(fk.ok(p.OPEN, f, p.OPEN_IN.pack(os.O_RDONLY, 0)))[0]
        assert fk.ok(p.RELEASE, f, p.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0)) == b""
        assert ops.called("release_fh") == [(f, fh, os.O_RDONLY)]
        assert ops.called("release") == []
        ops.answers["release_fh"] = OSError(errno.EBADF, "no such handle")
        assert fk.request(p.RELEASE, f, p.RELEASE_IN.pack(fh, 0, 0, 0)).error == -errno.EBADF
    finally:
        assert fk.close()


def test_the_session_asks_no_hook_that_would_skip_deny_others():
    """With ``deny_others`` (allow_root) other users' SETATTR and GETXATTR are refused
    before any handler: the hooks are not used; RELEASE (exempt) still is."""
    ops = ShortOps()
    fk = _session(ops, deny_others=1000)
    try:
        f = ops.add(p.ROOT_ID, b"f", stat.S_IFREG | 0o644)
        body = SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o600, 0, 0).encode()
        assert fk.request(p.SETATTR, f, body, uid=2000).error == -errno.EACCES
        cap = p.GETXATTR_IN.pack(0, 0) + b"security.capability\0"
        assert fk.request(p.GETXATTR, f, cap, uid=2000).error == -errno.EACCES
        assert ops.called("setattr_node") == ops.called("capability_node") == []
        fk.ok(p.RELEASE, f, p.RELEASE_IN.pack(0, 0, 0, 0), uid=2000)
        assert len(ops.called("release_fh")) == 1
    finally:
        assert fk.close()


# -- through mounts, against the kernel's overlay ---------------------------------------------
def _fd_states(base, mount) -> dict:
    """fchmod, fchown and futimens of open files (the requests the short path answers) and
    of files renamed, unlinked, linked or lower meanwhile (which it leaves to the generic
    path): each file's ``fstat`` after each step (the SETATTR's reply, cached) and its
    state by name at the end."""
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for name in ("low_ro", "low_rw"):
        (lower / name).write_bytes(b"lower\n")
        os.chmod(lower / name, 0o4755)
    mnt = mount(lower, upper, work)
    out = {}

    def shown(st):
        return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_mtime_ns)

    def steps(name, fd, between=None):
        seen = []
        for i, step in enumerate((
                lambda: os.fchmod(fd, 0o6755),
                lambda: os.setxattr(fd, "security.capability", CAP),
                lambda: os.utime(fd, ns=(T, T + 1)),
                lambda: os.fchown(fd, 1234, 5678),          # strips both bits and the capability
                lambda: os.fchmod(fd, 0o2750),
                lambda: os.fchown(fd, -1, 4242),
                lambda: os.utime(fd, ns=(T + 5, T + 7)))):
            if between is not None:
                between(i)
            try:
                step()
                res = "ok"
            except OSError as e:
                res = errno.errorcode[e.errno]
            try:
                cap = os.getxattr(fd, "security.capability") == CAP
            except OSError as e:
                cap = errno.errorcode[e.errno]
            st = shown(os.fstat(fd))
            seen.append((res, st if i >= 2 else st[:-1], cap))  # (the mtime: set at step 2)
        out[name] = seen

    # an untar's file: made, written, changed through its fd, closed
    fd = os.open(mnt / "made", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"data")
    steps("made", fd)
    os.close(fd)
    # renamed over and over while open
    fd = os.open(mnt / "r0", os.O_RDWR | os.O_CREAT, 0o644)
    steps("renamed", fd, lambda i: os.rename(mnt / f"r{i}", mnt / f"r{i + 1}"))
    os.close(fd)
    # unlinked while open (no name left)
    fd = os.open(mnt / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    os.unlink(mnt / "gone")
    steps("unlinked", fd)
    os.close(fd)
    # a second link made, then removed again half-way (two links, then one)
    fd = os.open(mnt / "l1", os.O_RDWR | os.O_CREAT, 0o644)
    os.link(mnt / "l1", mnt / "l2")
    steps("linked", fd, lambda i: os.unlink(mnt / "l2") if i == 3 else None)
    os.close(fd)
    # lower files: open read-only (not copied up by the open) and read-write
    fd = os.open(mnt / "low_ro", os.O_RDONLY)
    steps("low_ro", fd)
    os.close(fd)
    fd = os.open(mnt / "low_rw", os.O_RDWR)
    steps("low_rw", fd)
    os.close(fd)
    for name in ("made", "r7", "l1", "low_ro", "low_rw"):
        out[f"{name} by name"] = shown(os.stat(mnt / name))
    return out


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_fd_changes_answer_as_the_kernel_overlay(tmp_path, overlay_mount, kernel_mount, cache):
    helpers.require("root")
    mounters = {
        "kernel": lambda lo, up, wk: kernel_mount([lo], up, wk),
        "overlaypc": lambda lo, up, wk: overlay_mount(stack_options([lo], up, wk, f"cache={cache}")).path,
    }
    states = {w: _fd_states(tmp_path / w, mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    diff = {n: (k[n], o[n]) for n in k if k[n] != o[n]}
    assert not diff, "\n".join(f"{n}:\n kernel    {k[n]}\n overlaypc {o[n]}" for n in sorted(diff))
    # spelled out: the chown stripped setuid, setgid and the capability
    assert o["made"][3] == ("ok", (oct(stat.S_IFREG | 0o755), 1234, 5678, 1, 4, T + 1), "ENODATA")


def test_a_listing_after_short_changes_reads_no_origin_of_the_file(drv, monkeypatch):
    """The inode-number answer of the changed file is kept under its new ctime (as
    ``setattr`` keeps it): a listing after the changes (rm -rf's READDIRPLUS after an
    untar) reads no origin xattrs of the file again."""
    root = drv.root()
    node, fh = drv.create(root, "f", os.O_WRONLY, 0o644)
    drv.write(fh, b"data", 0)               # (a write changes the ctime first)
    for step in STEPS[:4]:
        assert _short(drv, node, *step) is not None
    drv.release(fh)
    read: list[str] = []
    real = drv.fs.inos._from_origin
    monkeypatch.setattr(drv.fs.inos, "_from_origin", lambda e: read.append(e.rel) or real(e))
    assert "f" in drv.readdir(root)
    assert read == []
    drv.settle()
