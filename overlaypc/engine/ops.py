"""The operation interface a filesystem gives the engine, and the typed results it returns.

Owns the contract between ``session`` (which decodes requests and encodes replies) and a
filesystem: one method per FUSE operation, addressed by nodeid or by (parent nodeid,
name), as the kernel addresses them. A method answers by returning a result object, or
fails by raising ``OSError`` with an errno; the session turns anything else into EIO
and logs it. Methods run on worker threads, concurrently.

Reference counting (the kernel's ``nlookup``): every successful ``lookup``, ``create``,
``tmpfile``, ``mkdir``, ``mknod``, ``symlink`` and ``link``, and every READDIRPLUS entry taken with
``DirItem.take`` (through ``take_entries``), gives the kernel one reference to the returned node, which it hands
back through ``forget``. The method takes the reference itself, *before* returning (the
session writes the reply afterwards: a FORGET on another worker can then never free the
node first). If the reply cannot be delivered (the request was interrupted), the session
calls ``forget(nodeid, 1)`` for an entry and ``release`` for an opened handle.

Caveat: names are ``bytes`` as the kernel sends them; the filesystem decodes them.
"""
from __future__ import annotations

import errno
from collections.abc import Callable, Iterable

from ..records import record
from ..typing_lite import NamedTuple, Protocol
from . import protocol as p
from .protocol import FileAttr, SetAttr


class Request(NamedTuple):
    """Who asks: the credentials and pid the kernel put in the request header, and the
    umask of creations (with DONT_MASK negotiated). A named tuple: one is made per
    request, and a frozen dataclass costs 2.5x as much to make."""
    uid: int
    gid: int
    pid: int
    unique: int = 0
    umask: int = 0


class Entry(NamedTuple):
    """A looked-up or created node. ``nodeid`` 0 is a negative entry (cached absence). A
    named tuple: one is made per LOOKUP and per READDIRPLUS entry, and a frozen record
    costs 2.5x as much to make."""
    nodeid: int
    attr: FileAttr | None
    entry_timeout: float
    attr_timeout: float
    generation: int = 0


@record(frozen=True)
class AttrReply:
    attr: FileAttr
    timeout: float


class Opened(NamedTuple):
    """An open file or directory: its handle and how the kernel caches it. A named tuple:
    one is made per OPEN (a frozen record sets each field through ``object.__setattr__``)."""
    fh: int
    direct_io: bool = False
    keep_cache: bool = False
    cache_dir: bool = False
    noflush: bool = False
    nonseekable: bool = False
    parallel_direct_writes: bool = False
    #: FUSE passthrough: the id ``BackingFiles.open`` gave (0: none). The kernel then
    #: reads and writes that backing file itself; only DIRECT_IO, NOFLUSH and
    #: PARALLEL_DIRECT_WRITES may be combined with it (KEEP_CACHE makes the open fail)
    backing_id: int = 0


def fopen_flags(o: Opened) -> int:
    """``fuse_open_out``'s ``open_flags`` for ``o`` (an OPEN's, a CREATE's, an OPENDIR's)."""
    return ((p.FOPEN_DIRECT_IO if o.direct_io else 0) | (p.FOPEN_KEEP_CACHE if o.keep_cache else 0)
            | (p.FOPEN_CACHE_DIR if o.cache_dir else 0) | (p.FOPEN_NOFLUSH if o.noflush else 0)
            | (p.FOPEN_NONSEEKABLE if o.nonseekable else 0)
            | (p.FOPEN_PARALLEL_DIRECT_WRITES if o.parallel_direct_writes else 0)
            | (p.FOPEN_PASSTHROUGH if o.backing_id else 0))


@record
class DirItem:
    """One listing entry: ``offset`` is where the *next* entry starts (its cookie).
    ``take`` (READDIRPLUS only) returns the entry with one reference taken; the session
    calls it (through ``Operations.take_entries``) only for items that fit in the reply.
    None: the kernel looks the name up."""
    name: bytes
    ino: int
    mode: int
    offset: int
    take: Callable[[], Entry | None] | None = None


@record
class ConnInfo:
    """INIT: what the kernel offers (``offered``) and what the filesystem asks for
    (``wanted``, a subset; the session drops anything not offered)."""
    major: int
    minor: int
    offered: int
    wanted: int = 0
    max_write: int = 1 << 20
    max_readahead: int = 1 << 20
    time_gran: int = 1
    max_background: int = 64
    max_stack_depth: int = 0
    #: set by the session once the INIT reply is written, if PASSTHROUGH was negotiated
    backing: "BackingFiles | None" = None


class BackingFiles(Protocol):
    """Registering backing files for passthrough opens (``FUSE_DEV_IOC_BACKING_*``)."""

    def open(self, fd: int) -> int:
        """A backing id for ``fd`` (an O_PATH fd suffices). OSError: EPERM without
        CAP_SYS_ADMIN in the initial user namespace, ELOOP past ``max_stack_depth``."""
        ...

    def close(self, backing_id: int) -> None: ...


class Notifier(Protocol):
    """Unsolicited messages to the kernel. An attribute-only ``inval_inode`` (``offset`` < 0)
    is written before the asking request's reply (the kernel takes no inode lock for it);
    the others are queued and written by the session's own thread (never from inside a
    request: the kernel may hold the lock the request holds)."""

    def inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> None: ...

    def inval_entry(self, parent: int, name: bytes) -> None: ...

    def delete(self, parent: int, child: int, name: bytes) -> None: ...


class NoNotifier:
    """Before a session exists (and in tests without a kernel): notifications go nowhere."""

    def inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> None:
        pass

    def inval_entry(self, parent: int, name: bytes) -> None:
        pass

    def delete(self, parent: int, child: int, name: bytes) -> None:
        pass


def _nosys(*_args, **_kwargs):
    raise OSError(errno.ENOSYS, "not implemented")


class Operations:
    """Base class: every operation answers ENOSYS until a filesystem defines it. The
    kernel remembers an ENOSYS for FLUSH, ACCESS, GETXATTR-family, STATX and more, and
    stops asking."""

    #: set by the session before INIT
    notifier: Notifier = NoNotifier()

    def init(self, conn: ConnInfo) -> None:
        """Choose ``conn.wanted``; nothing else may be sent before the reply."""

    def initialized(self, conn: ConnInfo) -> None:
        """The INIT reply is written: notifications and backing ioctls may be used."""

    def served(self) -> None:
        """The mount's first request is answered (or none came in ``clone_delay``): work
        the mount's first reply should not wait for goes here (logging "mounted")."""

    def destroy(self) -> None:
        """The session ended (unmounted or aborted)."""

    def forget(self, nodeid: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references to ``nodeid`` (no reply)."""

    #: if set, a BATCH_FORGET calls this once with its (nodeid, nlookup) pairs (an
    #: iterable, read once, in order) instead of ``forget`` per pair: the kernel queues
    #: its forgets and sends them batched, thousands after a cache drop
    forget_nodes: Callable[[Iterable[tuple[int, int]]], None] | None = None

    def count_error(self) -> None:
        """An operation raised something other than OSError (answered EIO, logged)."""

    def take_entries(self, req: Request, parent: int, items: list[DirItem]) -> list[Entry | None]:
        """READDIRPLUS: what each item's ``take`` gives, for the items of one reply that
        carry a ``take`` (never ``.`` or ``..``), in order; all or nothing (a failure forgets
        the references taken). A filesystem may take a reply's entries at once (one lock
        for all rather than one per entry)."""
        out: list[Entry | None] = []
        try:
            for item in items:
                out.append(item.take())  # type: ignore[misc]
        except BaseException:
            for entry in out:
                if entry is not None and entry.nodeid:
                    self.forget(entry.nodeid, 1)
            raise
        return out

    lookup: Callable[[Request, int, bytes], Entry] = _nosys
    getattr: Callable[[Request, int, int | None], AttrReply] = _nosys
    #: if set, a GETATTR without a handle (where every caller may ask: no ``deny_others``)
    #: calls this first, with the node alone (no ``Request`` is made): the packed
    #: ``fuse_attr_out``, or None to answer through ``getattr``. For a filesystem that
    #: answers its common case without result objects: the kernel sends a directory's
    #: GETATTR after each change in it (its attributes are dropped), one per file of an
    #: untar or an ``rm -rf``
    getattr_node: Callable[[int], bytes | None] | None = None
    #: if set, a LOOKUP (where every caller may ask) calls this first, with the parent's
    #: node and the name alone (no ``Request``): the packed ``fuse_entry_out`` of a
    #: negative entry, the ``Entry`` ``lookup`` would answer (its reference taken), that
    #: entry packed as (its nodeid, ``fuse_entry_out``; the reference forgotten again if
    #: the reply is not delivered), or None to answer through ``lookup``. The kernel sends
    #: a negative LOOKUP before each creation of a new name (one per file of an untar)
    lookup_name: Callable[[int, bytes], "bytes | Entry | tuple[int, bytes] | None"] | None = None
    setattr: Callable[[Request, int, SetAttr], AttrReply] = _nosys
    #: if set, a SETATTR without extensions (where every caller may ask: no
    #: ``deny_others``) calls this first with (uid, gid, pid, nodeid, ``SETATTR_IN``'s
    #: fields as unpacked; no ``Request`` or ``SetAttr`` is made): the packed
    #: ``fuse_attr_out``, or None, nothing done, to answer through ``setattr``. For a
    #: filesystem that answers its common case without result objects: an untar's
    #: utimens, chown and chmod of each file it makes (three per file)
    setattr_node: Callable[[int, int, int, int, tuple], bytes | None] | None = None
    readlink: Callable[[Request, int], bytes] = _nosys
    symlink: Callable[[Request, int, bytes, bytes], Entry] = _nosys     # parent, name, target
    mknod: Callable[[Request, int, bytes, int, int], Entry] = _nosys    # parent, name, mode, rdev
    mkdir: Callable[[Request, int, bytes, int], Entry] = _nosys         # parent, name, mode
    #: if set, a MKDIR without extensions (where every caller may ask: no ``deny_others``)
    #: calls this first with (uid, gid, parent, name, mode, umask; no ``Request``): (the
    #: new nodeid, the packed ``fuse_entry_out``; the reference forgotten again if the reply
    #: is not delivered), or None, nothing done, to answer through ``mkdir``; an error
    #: raised is the answer. One per new directory of an untar
    mkdir_name: Callable[[int, int, int, bytes, int, int], "tuple[int, bytes] | None"] \
        | None = None
    unlink: Callable[[Request, int, bytes], None] = _nosys
    #: if set, an UNLINK (where every caller may ask) calls this first, with the parent's
    #: node and the name alone (no ``Request``): True once the name is removed, False to
    #: answer through ``unlink`` (nothing done); an error raised is the answer. One per
    #: file of an ``rm -rf``
    unlink_name: Callable[[int, bytes], bool] | None = None
    rmdir: Callable[[Request, int, bytes], None] = _nosys
    #: if set, an RMDIR (where every caller may ask) calls this first, with the parent's
    #: node and the name alone (no ``Request``): True once the directory is removed, False
    #: to answer through ``rmdir`` (nothing done); an error raised is the answer. One per
    #: directory of an ``rm -rf``
    rmdir_name: Callable[[int, bytes], bool] | None = None
    rename: Callable[[Request, int, bytes, int, bytes, int], None] = _nosys  # ..., flags
    link: Callable[[Request, int, int, bytes], Entry] = _nosys          # node, newparent, name
    open: Callable[[Request, int, int, int], Opened] = _nosys           # node, flags, open_flags
    #: if set (with ``release_fh``), an OPEN without extensions (no ``deny_others``)
    #: calls this first with (node, flags, open_flags; no ``Request``): the ``Opened``
    #: ``open`` would answer, or None, nothing done, to answer through ``open``. An
    #: undelivered reply's handle is released through ``release_fh``. One per file a
    #: ``grep -r`` reads
    open_node: Callable[[int, int, int], Opened | None] | None = None
    #: (parent, name, flags, mode, open_flags) -> the new node and its open handle
    create: Callable[[Request, int, bytes, int, int, int], tuple[Entry, Opened]] = _nosys
    #: if set, a CREATE without extensions (where every caller may ask: no ``deny_others``;
    #: and only with ``release_fh``) calls this first with (uid, gid, parent, name, flags,
    #: mode, umask; no ``Request`` is made): (the new nodeid, its handle, the packed
    #: ``fuse_entry_out`` and ``fuse_open_out``), or None, nothing done, to answer through
    #: ``create``; an error raised is the answer. An undelivered reply is undone through
    #: ``release_fh`` and ``forget``. One per file of an untar
    create_name: Callable[[int, int, int, bytes, int, int, int], "tuple[int, int, bytes] | None"] \
        | None = None
    #: O_TMPFILE: (directory, flags, mode, open_flags) -> a new node with no name and its
    #: open handle (the entry's reference as a CREATE's; LINK may name the node later)
    tmpfile: Callable[[Request, int, int, int, int], tuple[Entry, Opened]] = _nosys
    #: read into the given buffer (the engine's reply buffer), returning the byte count
    read: Callable[[Request, int, int, memoryview, int], int] = _nosys  # node, fh, buf, offset
    #: if set, READ calls this instead of ``read``: (fh, buf, offset) -> byte count, for a
    #: filesystem whose reads depend on the open handle alone (READ is the hot path of
    #: direct-io files: no ``Request`` is made for it)
    read_fh: Callable[[int, memoryview, int], int] | None = None
    write: Callable[[Request, int, int, memoryview, int, int], int] = _nosys  # ..., write_flags
    flush: Callable[[Request, int, int], None] = _nosys
    release: Callable[[Request, int, int, int], None] = _nosys          # node, fh, flags
    #: if set, RELEASE calls this instead of ``release``: (node, fh, flags), for a
    #: filesystem whose release needs no caller (no ``Request`` is made: one per close)
    release_fh: Callable[[int, int, int], None] | None = None
    fsync: Callable[[Request, int, int, bool], None] = _nosys           # node, fh, datasync
    #: an ``os.statvfs_result`` or a dict of its ``f_*`` fields (``protocol.pack_statfs``)
    statfs: Callable[[Request, int], object] = _nosys
    #: (node, name, value, flags[, setxattr_flags]): the last only with SETXATTR_EXT
    setxattr: Callable[..., None] = _nosys
    getxattr: Callable[[Request, int, str], bytes] = _nosys
    #: if set, a GETXATTR of ``security.capability`` without extensions (no
    #: ``deny_others``) calls this first with the node alone: the value, an errno to
    #: answer (ENODATA: none), or None to answer through ``getxattr``. The kernel asks
    #: for it before every write and chown of a file (untar: twice per file)
    capability_node: Callable[[int], bytes | int | None] | None = None
    listxattr: Callable[[Request, int], list[str]] = _nosys
    removexattr: Callable[[Request, int, str], None] = _nosys
    access: Callable[[Request, int, int], None] = _nosys
    opendir: Callable[[Request, int, int], Opened] = _nosys
    #: if set, OPENDIR calls this instead of ``opendir``, with the node alone (no
    #: ``Request`` is made; not called where ``deny_others`` refuses other users): the
    #: directory is opened with handle 0 and KEEP_CACHE, and CACHE_DIR if it returns True.
    #: For a filesystem whose listings need no directory handle; a warm ``find`` sends
    #: little else, one OPENDIR and one RELEASEDIR per directory
    opendir_zero: Callable[[int], bool] | None = None
    #: with ``opendir_zero``: a RELEASEDIR of handle 0 calls this (with the node) instead
    #: of ``releasedir``, also when an OPENDIR reply never reached the kernel
    releasedir_zero: Callable[[int], None] | None = None
    #: if set, a READDIRPLUS without extensions (exempt from ``deny_others``) calls this
    #: first with (nodeid, fh, offset, size; no ``Request``): the packed ``fuse_direntplus``
    #: entries that fit in ``size`` bytes and the nodeids whose reference it took (one
    #: each, as ``take_entries`` would: only for entries with attributes, never for ``.``
    #: and ``..``; forgotten by the session if the reply never reaches the kernel), or
    #: None, nothing done, to answer through ``readdir``. One per directory a cold
    #: ``find`` lists, ~100 entries each
    readdirplus_node: Callable[[int, int, int, int], "tuple[bytes, list[int]] | None"] | None = None
    #: entries from cookie ``offset`` on, lazily; ``plus``: items carry ``take``
    readdir: Callable[[Request, int, int, int, bool], Iterable[DirItem]] = _nosys
    releasedir: Callable[[Request, int, int], None] = _nosys
    fsyncdir: Callable[[Request, int, int, bool], None] = _nosys
    fallocate: Callable[[Request, int, int, int, int, int], None] = _nosys  # node fh off len mode
    lseek: Callable[[Request, int, int, int, int], int] = _nosys        # node fh off whence
    #: (node, fh, ioctl flags, cmd, arg, input bytes, output size) -> the output (at most
    #: that size; the session pads it). Restricted ioctls only (no retry); ENOSYS: the
    #: kernel answers ENOTTY. The kernel sends FS_IOC_GETFLAGS/SETFLAGS and FSGETXATTR/
    #: FSSETXATTR (``chattr``, ``lsattr``) this way, on a handle it opened for the purpose,
    #: with ``arg`` 0; a caller's own ioctl comes with its buffer's address as ``arg``
    ioctl: Callable[[Request, int, int, int, int, int, bytes, int], bytes] = _nosys
    #: (node_in, fh_in, off_in, node_out, fh_out, off_out, length, flags) -> bytes copied
    copy_file_range: Callable[[Request, int, int, int, int, int, int, int, int], int] = _nosys
