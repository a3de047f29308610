"""Support for the engine's tests (``overlaypc.engine``): a fake kernel, an in-memory
filesystem that records its calls, and a tiny passthrough filesystem that mounts for real.

What this module owns:
- ``FakeKernel``: drives a ``Session`` over ``SOCK_SEQPACKET`` socket pairs (message
  boundaries as on /dev/fuse), one pair per worker (cloned fds have their own reply
  queues), so a reply must come back on the socket its request went out on. It builds
  requests, parses replies, and fails chosen replies with ENOENT through the session's
  one seam, ``Session._writev`` (the kernel's answer to the reply of an interrupted
  request). Notifications (unique 0) are set aside as they arrive.
- ``MemoryOps``: an ``Operations`` over a dict of nodes with exact lookup counts and
  open handles, recording every call; ``boom`` raises a non-OSError, ``gate`` blocks.
- ``PassthroughFS``: a filesystem mirroring a directory by O_PATH fds (one per kernel
  node, closed on the last FORGET), with four test hooks: the virtual xattr
  ``user.pt.max_write`` (the largest WRITE seen), ``user.pt.inval`` (set it: the node's
  cache is invalidated by notification), files named ``barrier``, whose reads wait
  until two of them are in progress (two workers serving at once), and files named
  ``hold*``, whose reads at offset 0 block in a system call (``poll`` of a pipe, as a read from a
  slow disk or file system would, not on a lock) until released: ``user.pt.held`` on any
  node says how many are held, setting ``user.pt.release`` to N releases N (each gives
  up after 30 s).
- run as a script: mount a ``PassthroughFS`` through ``daemon.run``
  (``engine_support.py SRC MNT [--daemon] [--workers N] [--log FILE] [-o opt,...]``);
  a mount error is printed on stderr with status 2.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

if __name__ == "__main__":  # a daemon: the checkout's package, as PYTHONPATH names it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlaypc.engine import protocol as p  # noqa: E402
from overlaypc.engine.ops import (AttrReply, ConnInfo, DirItem, Entry, Opened,  # noqa: E402
                                  Operations, Request)
from overlaypc.engine.session import Session  # noqa: E402

log = logging.getLogger("enginetest")

#: what the fake kernel offers in INIT unless told otherwise (as a 6.x kernel does)
KERNEL_FLAGS = (p.ASYNC_READ | p.POSIX_LOCKS | p.ATOMIC_O_TRUNC | p.EXPORT_SUPPORT | p.BIG_WRITES
                | p.DONT_MASK | p.AUTO_INVAL_DATA | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO
                | p.ASYNC_DIO | p.WRITEBACK_CACHE | p.PARALLEL_DIROPS | p.HANDLE_KILLPRIV
                | p.POSIX_ACL | p.ABORT_ERROR | p.MAX_PAGES | p.CACHE_SYMLINKS
                | p.EXPLICIT_INVAL_DATA | p.HANDLE_KILLPRIV_V2 | p.SETXATTR_EXT | p.INIT_EXT
                | p.SECURITY_CTX | p.CREATE_SUPP_GROUP | p.DIRECT_IO_ALLOW_MMAP | p.PASSTHROUGH)


# ==========================================================================================
# The fake kernel
# ==========================================================================================
@dataclass
class Reply:
    unique: int
    error: int          # 0 or a negative errno
    body: bytes


class FakeKernel:
    """A ``Session`` over socket pairs. ``session_cls`` may be a subclass; the fake installs
    its own ``_writev`` on the instance to fail chosen replies."""

    def __init__(self, ops: Operations, *, workers: int = 1, **session_kw) -> None:
        self.ops = ops
        self.kernel_socks: list[socket.socket] = []
        self._session_socks: list[socket.socket] = []
        self.workers = workers
        #: every worker's socket exists (the session clones once its first worker answered
        #: a request, or after ``clone_delay``: 0 here unless a test asks for another)
        self.all_cloned = threading.Event()
        #: the connection ended (``close``): a clone then fails, as the kernel's does
        self._ended = False
        self._pairs_lock = threading.Lock()
        first = self._pair()
        session_kw.setdefault("clone_delay", 0)
        #: the session-side fds of retired workers, as the session closed them
        self.closed: list[int] = []
        self.session = Session(ops, first, clone=self._pair if workers > 1 else None,
                               close_clone=self._close_pair, workers=workers, **session_kw)
        self.session._writev = self._writev  # the seam: see ``fail_reply``
        self.notifications: list[bytes] = []
        self._fail: set[int] = set()
        self.failed: list[int] = []
        self._unique = itertools.count(2, 2)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    def _pair(self) -> int:
        with self._pairs_lock:
            if self._ended:  # (the kernel: a clone of an ended connection fails)
                raise OSError(errno.ENODEV, "the connection has ended")
            k, s = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            k.settimeout(20)  # a session that never answers fails the test instead of hanging
            self.kernel_socks.append(k)
            self._session_socks.append(s)
        if len(self.kernel_socks) == self.workers:
            self.all_cloned.set()
        return s.fileno()

    def _close_pair(self, fd: int) -> None:
        """The session retires a worker: its socket closes (its kernel side reads EOF)."""
        for s in self._session_socks:
            if s.fileno() == fd:
                s.close()
                self.closed.append(fd)
                return
        raise AssertionError(f"fd {fd} is not one of the session's sockets")

    def _writev(self, fd: int, buffers) -> int:
        unique = p.OUT_HEADER.unpack_from(bytes(buffers[0]))[2]
        with self._lock:
            if unique in self._fail:
                self._fail.discard(unique)
                self.failed.append(unique)
                raise OSError(errno.ENOENT, "no such request (interrupted)")
        return os.writev(fd, buffers)

    def fail_reply(self, unique: int) -> None:
        """The reply to ``unique`` fails with ENOENT, as to an interrupted request."""
        with self._lock:
            self._fail.add(unique)

    def next_unique(self) -> int:
        with self._lock:
            return next(self._unique)

    # -- messages ---------------------------------------------------------------------------
    def send(self, opcode: int, nodeid: int = p.ROOT_ID, body: bytes = b"", *, via: int = 0,
             uid: int = 0, gid: int = 0, pid: int = 1, unique: int | None = None) -> int:
        unique = self.next_unique() if unique is None else unique
        msg = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid,
                               pid, 0, 0) + body
        self.kernel_socks[via].send(msg)
        return unique

    def receive(self, via: int = 0) -> Reply:
        """The next reply on socket ``via``; notifications are set aside."""
        while True:
            msg = self.kernel_socks[via].recv(1 << 21)
            length, error, unique = p.OUT_HEADER.unpack_from(msg)
            assert length == len(msg), (length, len(msg))
            if unique == 0:
                self.notifications.append(msg)
                continue
            return Reply(unique, error, msg[p.OUT_HEADER.size:])

    def request(self, opcode: int, nodeid: int = p.ROOT_ID, body: bytes = b"", *, via: int = 0,
                fail: bool = False, **kw) -> Reply:
        """Send one request and wait for its answer; ``fail``: its reply fails with ENOENT
        (then the returned Reply is None-bodied with error ENOENT, nothing having arrived)."""
        unique = self.next_unique()
        if fail:
            self.fail_reply(unique)
        self.send(opcode, nodeid, body, via=via, unique=unique, **kw)
        if fail:
            # nothing arrives; a harmless request after it proves the first was handled
            self.send(p.STATFS, p.ROOT_ID, via=via)
            r = self.receive(via)
            assert unique in self.failed, f"the reply to {unique} was never written"
            return Reply(unique, -errno.ENOENT, r.body)
        r = self.receive(via)
        assert r.unique == unique, (r.unique, unique)
        return r

    def ok(self, opcode: int, nodeid: int = p.ROOT_ID, body: bytes = b"", **kw) -> bytes:
        r = self.request(opcode, nodeid, body, **kw)
        assert r.error == 0, f"{p.OPCODE_NAMES[opcode]}: {errno.errorcode.get(-r.error, r.error)}"
        return r.body

    # -- INIT and the loop -----------------------------------------------------------------------
    def init(self, major: int = 7, minor: int = 44, flags: int = KERNEL_FLAGS,
             max_readahead: int = 1 << 17, *, body: bytes | None = None) -> Reply:
        """Send INIT, run the session's handshake, return its reply."""
        unique = self.send(p.INIT, 0, p.InitIn(major, minor, max_readahead, flags).encode()
                           if body is None else body)
        self.session.handshake()
        r = self.receive()
        assert r.unique == unique
        return r

    def start(self, **init_kw) -> p.InitOut:
        r = self.init(**init_kw)
        assert r.error == 0, r
        self._thread = threading.Thread(target=self.session.serve, args=(self.ready.set,),
                                        name="fake-kernel-serve", daemon=True)
        self._thread.start()
        assert self.ready.wait(10)
        if not self.session.clone_delay:
            assert self.all_cloned.wait(10)
        return p.InitOut.decode(r.body)

    def close(self) -> bool:
        """End the connection; True if the session's loop ended. A clone made while it
        closes would keep a worker waiting for ever: none is made after (``_pair``)."""
        with self._pairs_lock:
            self._ended = True
        for s in self.kernel_socks:
            s.close()
        ended = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            ended = not self._thread.is_alive()
        if ended:
            for s in self._session_socks:
                s.close()
        return ended

    # -- request bodies ----------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes, **kw) -> Reply:
        return self.request(p.LOOKUP, parent, name + b"\0", **kw)

    def forget(self, nodeid: int, n: int = 1, *, via: int = 0) -> None:
        self.send(p.FORGET, nodeid, p.FORGET_IN.pack(n), via=via)

    def batch_forget(self, pairs: Iterable[tuple[int, int]], *, via: int = 0) -> None:
        pairs = list(pairs)
        body = p.BATCH_FORGET_IN.pack(len(pairs), 0) + b"".join(p.FORGET_ONE.pack(*x) for x in pairs)
        self.send(p.BATCH_FORGET, 0, body, via=via)


def entry_of(body: bytes) -> tuple[int, p.FileAttr]:
    nodeid = p.ENTRY_HEAD.unpack_from(body)[0]
    return nodeid, p.unpack_attr(body, p.ENTRY_HEAD.size)


def parse_dirents(body: bytes, plus: bool) -> list[tuple[bytes, int, int, int, int]]:
    """(name, ino, next offset, d_type, nodeid) of each entry of a READDIR(PLUS) reply."""
    out, pos = [], 0
    while pos < len(body):
        nodeid = 0
        if plus:
            nodeid = p.ENTRY_HEAD.unpack_from(body, pos)[0]
            pos += p.ENTRY_OUT_SIZE
        ino, off, namelen, typ = p.DIRENT.unpack_from(body, pos)
        name = body[pos + p.DIRENT.size:pos + p.DIRENT.size + namelen]
        out.append((name, ino, off, typ, nodeid))
        pos += (p.DIRENT.size + namelen + 7) & ~7
    assert pos == len(body), "a reply ends inside an entry"
    return out


# ==========================================================================================
# An in-memory filesystem that records its calls
# ==========================================================================================
@dataclass
class MemNode:
    nodeid: int
    mode: int
    parent: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    nlookup: int = 0


class MemoryOps(Operations):
    """Nodes in a dict; ``nlookup`` counts the kernel's references exactly, ``handles``
    the open ones. Every call is recorded in ``calls`` as (name, args). Its READDIRPLUS
    offers ``take`` for every item, ``.`` and ``..`` included (the session must not use
    those). Names: ``boom`` raises RuntimeError in lookup; ``gate`` blocks a lookup
    until ``gate_open`` is set."""

    def __init__(self, wanted: int = 0) -> None:
        self.wanted = wanted
        self.lock = threading.Lock()
        self.nodes: dict[int, MemNode] = {p.ROOT_ID: MemNode(p.ROOT_ID, stat.S_IFDIR | 0o755, p.ROOT_ID)}
        self._ids = itertools.count(2)
        self._fhs = itertools.count(100)
        self.handles: dict[int, int] = {}     # fh -> nodeid
        self.calls: list[tuple[str, tuple]] = []
        self.taken: list[bytes] = []          # names whose READDIRPLUS take ran
        self.gate_open = threading.Event()
        #: the threads waiting at the gate (what the pool's tests count as blocked)
        self.at_gate: set[int] = set()
        self.destroyed = threading.Event()
        self.conn: ConnInfo | None = None
        self.errors = 0

    def _rec(self, name: str, *args) -> None:
        with self.lock:
            self.calls.append((name, args))

    def called(self, name: str) -> list[tuple]:
        with self.lock:
            return [a for n, a in self.calls if n == name]

    def count_error(self) -> None:
        self.errors += 1

    # -- helpers ---------------------------------------------------------------------------
    def add(self, parent: int, name: bytes, mode: int, data: bytes = b"") -> int:
        with self.lock:
            nid = next(self._ids)
            self.nodes[nid] = MemNode(nid, mode, parent, bytearray(data))
            self.nodes[parent].children[name] = nid
            return nid

    def attr(self, nid: int) -> p.FileAttr:
        n = self.nodes[nid]
        return p.FileAttr(nid, len(n.data), (len(n.data) + 511) // 512, 1_000_000_000,
                          2_500_000_000, 3_000_000_007, n.mode, 1, 0, 0, 0, 4096)

    def _entry_locked(self, nid: int) -> Entry:
        self.nodes[nid].nlookup += 1
        return Entry(nid, self.attr(nid), 1.0, 1.0)

    def nlookups(self) -> dict[int, int]:
        with self.lock:
            return {n.nodeid: n.nlookup for n in self.nodes.values() if n.nlookup}

    def _node(self, nid: int) -> MemNode:
        try:
            return self.nodes[nid]
        except KeyError:
            raise OSError(errno.ESTALE, "no such node") from None

    # -- Operations --------------------------------------------------------------------------
    def init(self, conn: ConnInfo) -> None:
        self._rec("init", conn.offered)
        self.conn = conn
        conn.wanted = self.wanted

    def destroy(self) -> None:
        self._rec("destroy")
        self.destroyed.set()

    def forget(self, nodeid: int, nlookup: int) -> None:
        self._rec("forget", nodeid, nlookup)
        with self.lock:
            n = self.nodes[nodeid]
            assert n.nlookup >= nlookup, f"forget({nodeid}, {nlookup}) of {n.nlookup}"
            n.nlookup -= nlookup

    def lookup(self, req: Request, parent: int, name: bytes) -> Entry:
        self._rec("lookup", parent, name)
        if name == b"boom":
            raise RuntimeError("a bug in the filesystem")
        if name == b"gate":
            tid = threading.get_native_id()
            with self.lock:
                self.at_gate.add(tid)
            try:
                self.gate_open.wait(20)
            finally:
                with self.lock:
                    self.at_gate.discard(tid)
        with self.lock:
            nid = self._node(parent).children.get(name)
            if nid is None:
                if name.startswith(b"neg"):
                    return Entry(0, None, 5.0, 0.0)
                raise OSError(errno.ENOENT, "no such name")
            return self._entry_locked(nid)

    def getattr(self, req: Request, nodeid: int, fh: Optional[int]) -> AttrReply:
        self._rec("getattr", nodeid, fh)
        with self.lock:
            self._node(nodeid)
            return AttrReply(self.attr(nodeid), 1.0)

    def setattr(self, req: Request, nodeid: int, sa: p.SetAttr) -> AttrReply:
        self._rec("setattr", nodeid, sa)
        with self.lock:
            n = self._node(nodeid)
            if sa.valid & p.FATTR_SIZE:
                del n.data[sa.size:]
                n.data.extend(bytes(sa.size - len(n.data)))
            return AttrReply(self.attr(nodeid), 1.0)

    def _make(self, parent: int, name: bytes, mode: int) -> Entry:
        with self.lock:
            if name in self._node(parent).children:
                raise OSError(errno.EEXIST, "exists")
        nid = self.add(parent, name, mode)
        with self.lock:
            return self._entry_locked(nid)

    def mkdir(self, req: Request, parent: int, name: bytes, mode: int) -> Entry:
        self._rec("mkdir", parent, name, mode, req.umask)
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777))

    def mknod(self, req: Request, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        self._rec("mknod", parent, name, mode, rdev, req.umask)
        return self._make(parent, name, mode)

    def symlink(self, req: Request, parent: int, name: bytes, target: bytes) -> Entry:
        self._rec("symlink", parent, name, target)
        e = self._make(parent, name, stat.S_IFLNK | 0o777)
        self.nodes[e.nodeid].data[:] = target
        return e

    def link(self, req: Request, nodeid: int, parent: int, name: bytes) -> Entry:
        self._rec("link", nodeid, parent, name)
        with self.lock:
            self._node(parent).children[name] = nodeid
            return self._entry_locked(nodeid)

    def readlink(self, req: Request, nodeid: int) -> bytes:
        return bytes(self._node(nodeid).data)

    def unlink(self, req: Request, parent: int, name: bytes) -> None:
        self._rec("unlink", parent, name)
        with self.lock:
            if self._node(parent).children.pop(name, None) is None:
                raise OSError(errno.ENOENT, "no such name")

    rmdir = unlink

    def rename(self, req: Request, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self._rec("rename", parent, name, newparent, newname, flags)
        with self.lock:
            nid = self._node(parent).children.pop(name)
            self._node(newparent).children[newname] = nid

    def _open_handle(self, nodeid: int) -> int:
        with self.lock:
            fh = next(self._fhs)
            self.handles[fh] = nodeid
            return fh

    def open(self, req: Request, nodeid: int, flags: int, open_flags: int) -> Opened:
        self._rec("open", nodeid, flags)
        self._node(nodeid)
        return Opened(self._open_handle(nodeid), keep_cache=True)

    def opendir(self, req: Request, nodeid: int, flags: int) -> Opened:
        self._rec("opendir", nodeid, flags)
        self._node(nodeid)
        return Opened(self._open_handle(nodeid), cache_dir=True)

    def create(self, req: Request, parent: int, name: bytes, flags: int, mode: int, open_flags: int = 0):
        self._rec("create", parent, name, mode, flags, req.umask)
        e = self._make(parent, name, stat.S_IFREG | (mode & 0o7777))
        return e, Opened(self._open_handle(e.nodeid), direct_io=True)

    def tmpfile(self, req: Request, parent: int, flags: int, mode: int, open_flags: int = 0):
        """A node in no directory's children (O_TMPFILE), open."""
        self._rec("tmpfile", parent, mode, flags, req.umask, open_flags)
        self._node(parent)
        with self.lock:
            nid = next(self._ids)
            self.nodes[nid] = MemNode(nid, stat.S_IFREG | (mode & 0o7777), parent)
            entry = self._entry_locked(nid)
        return entry, Opened(self._open_handle(nid), keep_cache=True)

    def _close_handle(self, nodeid: int, fh: int) -> None:
        with self.lock:
            assert self.handles.pop(fh) == nodeid, (fh, nodeid)

    def release(self, req: Request, nodeid: int, fh: int, flags: int) -> None:
        self._rec("release", nodeid, fh, flags)
        self._close_handle(nodeid, fh)

    def releasedir(self, req: Request, nodeid: int, fh: int) -> None:
        self._rec("releasedir", nodeid, fh)
        self._close_handle(nodeid, fh)

    def flush(self, req: Request, nodeid: int, fh: int) -> None:
        self._rec("flush", nodeid, fh)

    def fsync(self, req: Request, nodeid: int, fh: int, datasync: bool) -> None:
        self._rec("fsync", nodeid, fh, datasync)

    def read(self, req: Request, nodeid: int, fh: int, buf: memoryview, offset: int) -> int:
        self._rec("read", nodeid, fh, len(buf), offset)
        data = self._node(nodeid).data[offset:offset + len(buf)]
        buf[:len(data)] = data
        return len(data)

    def write(self, req: Request, nodeid: int, fh: int, data: memoryview, offset: int,
              write_flags: int) -> int:
        self._rec("write", nodeid, fh, bytes(data), offset, write_flags)
        with self.lock:
            d = self._node(nodeid).data
            if len(d) < offset:
                d.extend(bytes(offset - len(d)))
            d[offset:offset + len(data)] = data
        return len(data)

    def statfs(self, req: Request, nodeid: int):
        return {"f_blocks": 1000, "f_bfree": 500, "f_bavail": 400, "f_files": 100, "f_ffree": 50,
                "f_bsize": 4096, "f_namemax": 255, "f_frsize": 4096}

    def setxattr(self, req: Request, nodeid: int, name: str, value: bytes, flags: int,
                 *setxattr_flags: int) -> None:
        self._rec("setxattr", nodeid, name, value, flags, *setxattr_flags)
        with self.lock:
            self._node(nodeid).xattrs[name] = value

    def getxattr(self, req: Request, nodeid: int, name: str) -> bytes:
        with self.lock:
            try:
                return self._node(nodeid).xattrs[name]
            except KeyError:
                raise OSError(errno.ENODATA, "no such attribute") from None

    def listxattr(self, req: Request, nodeid: int) -> list[str]:
        with self.lock:
            return list(self._node(nodeid).xattrs)

    def removexattr(self, req: Request, nodeid: int, name: str) -> None:
        with self.lock:
            if self._node(nodeid).xattrs.pop(name, None) is None:
                raise OSError(errno.ENODATA, "no such attribute")

    def readdir(self, req: Request, nodeid: int, fh: int, offset: int, plus: bool):
        self._rec("readdir", nodeid, fh, offset, plus)
        with self.lock:
            n = self._node(nodeid)
            items = [(b".", nodeid), (b"..", n.parent)] + sorted(n.children.items())
        for i, (name, nid) in enumerate(items[offset:], offset):
            take = None
            if plus:
                def take(name=name, nid=nid) -> Entry:
                    with self.lock:
                        self.taken.append(name)
                        return self._entry_locked(nid)
            yield DirItem(name, nid, self.nodes[nid].mode, i + 1, take)


# ==========================================================================================
# A tiny passthrough filesystem, mounted for real
# ==========================================================================================
@dataclass
class PtNode:
    fd: int            # O_PATH, O_NOFOLLOW
    key: tuple[int, int]
    nlookup: int = 0
    barrier: bool = False
    hold: bool = False


class PassthroughFS(Operations):
    """``root`` through the engine: one O_PATH fd per node the kernel knows, found again by
    (st_dev, st_ino); everything else goes through ``*at`` calls on those fds, or through
    /proc/self/fd for what has no ``*at`` form (open, xattrs, chmod, utimes)."""

    TIMEOUT = 1.0

    def __init__(self, root: str) -> None:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(fd)
        self.root_fd = fd
        self.nodes: dict[int, PtNode] = {p.ROOT_ID: PtNode(fd, (st.st_dev, st.st_ino), 1)}
        self.by_key: dict[tuple[int, int], int] = {}
        self.lock = threading.Lock()
        self._ids = itertools.count(2)
        self.max_write = 0
        self.dirs: dict[int, list[tuple[bytes, int, int]]] = {}
        self._dir_ids = itertools.count(1)
        self.barrier = threading.Barrier(2, timeout=20)
        self._release_r, self._release_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.held = 0

    # -- nodes --------------------------------------------------------------------------------
    def _fd(self, nodeid: int) -> int:
        with self.lock:
            return self.nodes[nodeid].fd

    @staticmethod
    def _proc(fd: int) -> str:
        return f"/proc/self/fd/{fd}"

    def _attr(self, st: os.stat_result) -> p.FileAttr:
        return p.FileAttr.from_stat(st)

    def _entry(self, parent: int, name: bytes) -> Entry:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._fd(parent))
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        with self.lock:
            nid = self.by_key.get(key)
            if nid is not None:
                node = self.nodes[nid]
                os.close(fd)
            else:
                nid = next(self._ids)
                node = self.nodes[nid] = PtNode(fd, key, barrier=name == b"barrier",
                                                hold=name.startswith(b"hold"))
                self.by_key[key] = nid
            node.nlookup += 1  # before the reply goes out: see ops
        return Entry(nid, self._attr(st), self.TIMEOUT, self.TIMEOUT)

    def forget(self, nodeid: int, nlookup: int) -> None:
        with self.lock:
            node = self.nodes[nodeid]
            node.nlookup -= nlookup
            if node.nlookup > 0 or nodeid == p.ROOT_ID:
                return
            del self.nodes[nodeid]
            del self.by_key[node.key]
        os.close(node.fd)

    def destroy(self) -> None:
        log.info("destroy: %d nodes known", len(self.nodes))

    # -- Operations ------------------------------------------------------------------------------
    def init(self, conn: ConnInfo) -> None:
        conn.wanted = (p.ASYNC_READ | p.BIG_WRITES | p.MAX_PAGES | p.PARALLEL_DIROPS
                       | p.DO_READDIRPLUS | p.ATOMIC_O_TRUNC | p.EXPORT_SUPPORT)

    def lookup(self, req, parent, name):
        return self._entry(parent, name)

    def getattr(self, req, nodeid, fh):
        st = os.fstat(fh) if fh is not None else os.fstat(self._fd(nodeid))
        return AttrReply(self._attr(st), self.TIMEOUT)

    def setattr(self, req, nodeid, sa: p.SetAttr):
        fd = self._fd(nodeid)
        path = self._proc(fd)
        if sa.valid & p.FATTR_MODE:
            os.chmod(path, stat.S_IMODE(sa.mode))
        if sa.valid & (p.FATTR_UID | p.FATTR_GID):
            os.chown(path, sa.uid if sa.valid & p.FATTR_UID else -1,
                     sa.gid if sa.valid & p.FATTR_GID else -1, follow_symlinks=False)
        if sa.valid & p.FATTR_SIZE:
            if sa.fh is not None:
                os.ftruncate(sa.fh, sa.size)
            else:
                os.truncate(path, sa.size)
        if sa.valid & (p.FATTR_ATIME | p.FATTR_MTIME):
            st = os.fstat(fd)
            now = time.time_ns()
            atime = (st.st_atime_ns if not sa.valid & p.FATTR_ATIME
                     else now if sa.atime_ns is None else sa.atime_ns)
            mtime = (st.st_mtime_ns if not sa.valid & p.FATTR_MTIME
                     else now if sa.mtime_ns is None else sa.mtime_ns)
            os.utime(path, ns=(atime, mtime))
        return AttrReply(self._attr(os.fstat(fd)), self.TIMEOUT)

    def readlink(self, req, nodeid):
        return os.readlink(b"", dir_fd=self._fd(nodeid))

    def mkdir(self, req, parent, name, mode):
        os.mkdir(name, mode & ~req.umask, dir_fd=self._fd(parent))
        return self._entry(parent, name)

    def mknod(self, req, parent, name, mode, rdev):
        os.mknod(name, mode & ~req.umask, rdev, dir_fd=self._fd(parent))
        return self._entry(parent, name)

    def symlink(self, req, parent, name, target):
        os.symlink(target, name, dir_fd=self._fd(parent))
        return self._entry(parent, name)

    def unlink(self, req, parent, name):
        os.unlink(name, dir_fd=self._fd(parent))

    def rmdir(self, req, parent, name):
        os.rmdir(name, dir_fd=self._fd(parent))

    def rename(self, req, parent, name, newparent, newname, flags):
        if flags:
            raise OSError(errno.EINVAL, "rename flags not supported")
        os.rename(name, newname, src_dir_fd=self._fd(parent), dst_dir_fd=self._fd(newparent))

    def _opened(self, nodeid: int, fd: int) -> Opened:
        with self.lock:
            node = self.nodes[nodeid]
            direct = node.barrier or node.hold  # every read reaches the daemon
        return Opened(fd, direct_io=direct, keep_cache=not direct)

    def _hold(self) -> None:
        """Block in ``poll`` until a release byte is ours (or 30 s pass)."""
        import select
        with self.lock:
            self.held += 1
        try:
            deadline = time.monotonic() + 30
            poller = select.poll()
            poller.register(self._release_r, select.POLLIN)
            while time.monotonic() < deadline:
                poller.poll(1000)
                try:
                    os.read(self._release_r, 1)
                    return
                except BlockingIOError:
                    continue  # another held read took that byte
        finally:
            with self.lock:
                self.held -= 1

    def open(self, req, nodeid, flags, open_flags):
        # (O_NOFOLLOW: the kernel has resolved the name already; on the /proc magic link it
        # would be ELOOP)
        fd = os.open(self._proc(self._fd(nodeid)),
                     flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW) | os.O_CLOEXEC)
        return self._opened(nodeid, fd)

    def create(self, req, parent, name, flags, mode, open_flags=0):
        fd = os.open(name, flags | os.O_CREAT | os.O_CLOEXEC, mode & ~req.umask,
                     dir_fd=self._fd(parent))
        try:
            entry = self._entry(parent, name)
        except BaseException:
            os.close(fd)
            raise
        return entry, self._opened(entry.nodeid, fd)

    def read(self, req, nodeid, fh, buf, offset):
        with self.lock:
            barrier = self.nodes[nodeid].barrier
            hold = self.nodes[nodeid].hold
        if hold and offset == 0:  # (not the read that finds the end of the file)
            self._hold()
        if barrier:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                raise OSError(errno.ETIMEDOUT, "the other read never came") from None
        return os.preadv(fh, [buf], offset)

    def write(self, req, nodeid, fh, data, offset, write_flags):
        with self.lock:
            self.max_write = max(self.max_write, len(data))
        return os.pwrite(fh, data, offset)

    def flush(self, req, nodeid, fh):
        pass

    def release(self, req, nodeid, fh, flags):
        os.close(fh)

    def fsync(self, req, nodeid, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    def statfs(self, req, nodeid):
        return os.statvfs(self._proc(self.root_fd))

    def getxattr(self, req, nodeid, name):
        if name == "user.pt.max_write":
            with self.lock:
                return str(self.max_write).encode()
        if name == "user.pt.held":
            with self.lock:
                return str(self.held).encode()
        return os.getxattr(self._proc(self._fd(nodeid)), name)

    def setxattr(self, req, nodeid, name, value, flags):
        if name == "user.pt.inval":
            # queued: the notification is written after this reply, by the notify thread
            self.notifier.inval_inode(nodeid, 0, 0)
            return
        if name == "user.pt.release":
            os.write(self._release_w, b"r" * int(value))
            return
        os.setxattr(self._proc(self._fd(nodeid)), name, value, flags)

    def listxattr(self, req, nodeid):
        return os.listxattr(self._proc(self._fd(nodeid)))

    def removexattr(self, req, nodeid, name):
        os.removexattr(self._proc(self._fd(nodeid)), name)

    def opendir(self, req, nodeid, flags):
        fd = os.open(self._proc(self._fd(nodeid)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            entries = [(b".", st.st_ino, st.st_mode), (b"..", 1, stat.S_IFDIR)]
            with os.scandir(fd) as it:
                for e in it:
                    entries.append((os.fsencode(e.name), e.inode(),
                                    e.stat(follow_symlinks=False).st_mode))
        finally:
            os.close(fd)
        with self.lock:
            fh = next(self._dir_ids)
            self.dirs[fh] = sorted(entries)
        return Opened(fh)

    def readdir(self, req, nodeid, fh, offset, plus):
        with self.lock:
            entries = self.dirs[fh]
        for i, (name, ino, mode) in enumerate(entries[offset:], offset):
            take = None
            if plus and name not in (b".", b".."):
                take = (lambda name=name: self._entry(nodeid, name))
            yield DirItem(name, ino, mode, i + 1, take)

    def releasedir(self, req, nodeid, fh):
        with self.lock:
            self.dirs.pop(fh, None)

    def fsyncdir(self, req, nodeid, fh, datasync):
        pass


def main(argv: list[str]) -> int:
    from overlaypc.engine import channel, daemon

    ap = argparse.ArgumentParser(prog="engine_support")
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--daemon", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--log")
    ap.add_argument("-o", dest="options", default="")
    args = ap.parse_args(argv)
    handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    opts = channel.MountOptions(f"pt:{args.source}", subtype="enginetest",
                                options=[o for o in args.options.split(",") if o])
    kw = {} if args.workers is None else {"workers": args.workers}
    try:
        return daemon.run(PassthroughFS(args.source), args.mountpoint, opts,
                          foreground=not args.daemon, **kw)
    except OSError as e:
        print(f"engine_support: cannot mount {args.mountpoint}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
