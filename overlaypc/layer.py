"""One layer directory, accessed only through paths confined beneath its root.

Owns: the layer's root fd and every system call the daemon makes on a layer. Each
path is resolved with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`` from the root fd (docs/ARCHITECTURE.md §3), and the
final component is always acted on with ``*at`` calls that do not follow it. So no
symlink or ``..`` inside a layer, and no layer directory swapped for a symlink after
mount, can make the daemon touch anything outside the layer.

Changes go through the ``do_*`` methods, which log call and result at debug level
(the kernel's ``ovl_do_*`` idea): one place to trace and to audit.

Paths here are relative, without a leading slash; ``""`` is the layer root. They may be
longer than PATH_MAX (a caller whose cwd is deep inside the mount uses a legal relative
path, and the daemon sees it from the mount root): such a path is resolved in steps of at
most ``STEP_BYTES``, each an ``openat2`` with the same confinement from the ``O_PATH``
directory fd the previous step opened, so each step stays beneath a directory that is
itself beneath the root.

Every open goes through ``fdbudget.retrying``: at the fd limit the caches are emptied and
the open is tried once more.

Caveats: a layer changed underneath a live mount is not supported (as with the
kernel's overlay); it never leads outside the layer, but the merged view may be stale.
A directory moved out of the layer by another process while a walk in steps holds its fd
is followed there, as the lookup cache's directory fds are.

Changes and opens act relative to their parent's fd when the lookup cache holds it
(``dirs``, ``parent``): one ``*at`` call on the name, no walk from the root. So they follow
the directory the cache holds, which is where the mount last saw it.

Mounts inside a layer: the root is normally held beneath a private, non-recursive clone of
the layer's mount (``layerroots``; ``cloned``), which has no mount on any name beneath it:
every call sees the object a mount made on a name covers, as the kernel's overlay does.
Where no clone could be made, an ``*at`` call on a name crosses a mount point there (no
``RESOLVE_NO_XDEV`` for them), so every read by name counts a name that is a mount point
as absent, as an open does: the lookup's ``fstatat`` (``stat_at``, ``lstat``) and a
listing's stat are checked by one ``statx`` after them (``_crossed``:
``STATX_ATTR_MOUNT_ROOT``, and the same object), and xattr reads and ``readlink`` by name
go through an ``O_PATH`` fd of the name opened confined (``_entry_fd``: EXDEV on a mount
point); chmod, chown and utime of a name the mount looked up go through such an fd too
(``do_chmod``). The cloned path pays none of this. Caveat: a listing that stats nothing (a
lower's plain ``getdents``) still names a mount point, with the type and number of the
object it covers; its lookup then finds it absent.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator

from . import faults, logs, scopes, sysapi
from .fdbudget import retrying
from .typing_lite import NamedTuple

log = logs.get("overlaypc.layer")

_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV)

#: The longest path one ``openat2`` call resolves (PATH_MAX is 4096 bytes with the NUL);
#: longer layer paths are walked in steps of whole components.
STEP_BYTES = 4000


def _getxattr_or_none(fd: int, name: str, child: str | None = None) -> bytes | None:
    """xattr ``name`` of the object an (``O_PATH``) fd refers to, or of its entry ``child``
    (one component, not followed; absent counts as no xattr); None when it has none."""
    path = f"/proc/self/fd/{fd}" if child is None else f"/proc/self/fd/{fd}/{child}"
    try:
        return os.getxattr(path, name, follow_symlinks=child is None)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        if child is not None and (e.errno in _ABSENT or e.errno == errno.ENAMETOOLONG):
            return None
        raise


def debugging() -> bool:
    """Whether layer changes are logged (``Layer._change``'s debug line): read once by a
    caller that makes several, passed to them as ``debug`` (a copy-up)."""
    return log.isEnabledFor(logs.DEBUG)


def split(rel: str) -> tuple[str, str]:
    """``"a/b/c"`` -> ``("a/b", "c")``; ``"c"`` -> ``("", "c")``."""
    head, _, tail = rel.rpartition("/")
    return head, tail


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def moved(rel: str, old: str, new: str) -> str | None:
    """Where ``rel`` is after a rename of ``old`` to ``new`` (itself or below it); None when
    the rename did not move it."""
    if rel == old or rel.startswith(old + "/"):
        return new + rel[len(old):]
    return None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one object (device and inode number)."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def steps(rel: str) -> list[str]:
    """``rel`` cut between components into pieces of at most ``STEP_BYTES`` bytes (a
    component over 255 bytes is left to the kernel's ENAMETOOLONG)."""
    pieces: list[str] = []
    current: list[str] = []
    size = -1
    for part in rel.split("/"):
        n = len(os.fsencode(part)) + 1
        if current and size + n > STEP_BYTES:
            pieces.append("/".join(current))
            current, size = [], -1
        current.append(part)
        size += n
    pieces.append("/".join(current))
    return pieces


def openat_beneath(dirfd: int, rel: str, flags: int, mode: int = 0) -> int:
    """``openat2`` of ``rel`` confined beneath ``dirfd``, in steps when ``rel`` is too long
    for one call. Intermediate steps open directories (``O_PATH``) and follow no symlink."""
    if len(rel) * 4 <= STEP_BYTES or len(os.fsencode(rel)) <= STEP_BYTES:
        return retrying(sysapi.openat2, dirfd, rel, flags, mode)
    pieces = steps(rel)
    fd = dirfd
    try:
        for piece in pieces[:-1]:
            step = retrying(sysapi.openat2, fd, piece, os.O_PATH | os.O_DIRECTORY)
            if fd != dirfd:
                os.close(fd)
            fd = step
        return retrying(sysapi.openat2, fd, pieces[-1], flags, mode)
    finally:
        if fd != dirfd:
            os.close(fd)


class Listed(NamedTuple):
    """One directory entry as ``Layer.scandir`` reads it."""
    name: str
    fmt: int  # S_IFMT bits
    ino: int
    st: os.stat_result | None


#: makes a named tuple from a tuple of its fields without its Python-level ``__new__``
_new_tuple = tuple.__new__
_S_IFMT = 0o170000


#: ``DirFd.origin_ino`` before anyone read it
UNKNOWN = object()


class DirFd:
    """An ``O_PATH`` fd of a directory inside a layer, closed when the last reference to
    it goes. Cached lookups hold these, and a thread using one keeps it alive, so an fd
    is never closed under a concurrent user (CPython frees on the last reference).
    ``origin_ino``: what ``inumbers`` read of the directory's copy-up origin (UNKNOWN until
    then); the fd pins the inode, whose origin xattr is written only before it gets its
    name (copy-up), so the answer holds as long as the fd. ``impure_settled``: an upper
    directory's ``impure`` mark was found or written through this fd, or the upper takes
    none (``impure.mark``); the mark is never removed under a mount, so that holds as long
    as the fd too. ``dir_ino``: the number ``inumbers.dir_ino`` gave the merged directory
    whose top entry holds this fd (UNKNOWN until then, and for one showing its origin's
    number, which ``InodeNumbers._unique`` decides at each answer): a lookup opens new fds,
    so the fd stands for that directory's layers, which its number depends on, as long as
    it lives. ``prot``: the directory's immutable/append-only flags as ``protection``
    read them (UNKNOWN until a change in it asks). ``readable``: a readable fd of the same
    directory (-1: none yet), for what an ``O_PATH`` fd cannot do: the fsync and the times
    of a copy-up's parent (``Layer.readable_dir``: opened at the first copy-up into it,
    counted by the cache holding this, closed with ``fd``; the root's: the layer's
    ``mount_fd``)."""

    __slots__ = ("fd", "_owned", "origin_ino", "impure_settled", "dir_ino", "prot", "readable")

    def __init__(self, fd: int, owned: bool = True) -> None:
        self.fd = fd
        self._owned = owned
        self.origin_ino: object = UNKNOWN
        self.impure_settled = False
        self.dir_ino: object = UNKNOWN
        self.prot: object = UNKNOWN
        self.readable = -1

    def __del__(self) -> None:
        if self._owned:
            os.close(self.fd)
            if self.readable >= 0:
                os.close(self.readable)


class Layer:
    """A layer root. ``index`` 0 is the upper when there is one; lowers follow, top first."""

    def __init__(self, path: str, index: int, *, writable: bool, name: str | None = None,
                 root_fd: int | None = None, cloned: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.index = index
        self.writable = writable
        self.name = name or self.path
        #: ``root_fd``: the root opened by ``layerroots`` (owned from here on); ``cloned``:
        #: it is beneath a private clone of the layer's mount, where no mount on a name is
        self.cloned = cloned
        if root_fd is None:
            root_fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_fd = root_fd
        st = os.fstat(self.root_fd)
        self.dev = st.st_dev
        self.root_ino = st.st_ino
        # a normal fd of the root, for what O_PATH fds cannot do (ioctls, open_by_handle_at)
        self.mount_fd = os.open(f"/proc/self/fd/{self.root_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.uuid = sysapi.fs_uuid(self.mount_fd)
        self.root = DirFd(self.root_fd, owned=False)
        self.root.readable = self.mount_fd  # (not owned either: ``close``)
        #: directory fds of this layer that a cache holds (the lookup cache's), by layer
        #: path: ``rel -> DirFd | None``; operations act relative to them (``parent``)
        self.dirs: Callable[[str], DirFd | None] | None = None
        #: told ``(rel, dirfd)`` when ``readable_dir`` opened a readable fd for a held
        #: directory: the cache that holds it counts that fd (``Lookup.count_readable``)
        self.readable_opened: Callable[[str, DirFd], None] | None = None

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r}, {'rw' if self.writable else 'ro'})"

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            os.close(self.mount_fd)
            self.root_fd = self.mount_fd = -1

    # -- resolution ---------------------------------------------------------------------
    def held_dir(self, head: str) -> DirFd | None:
        """The directory ``head`` of this layer as an fd some cache holds (the root's own,
        or ``dirs``'), or None: resolve it from the root."""
        if not head:
            return self.root
        return self.dirs(head) if self.dirs is not None else None

    def open(self, rel: str, flags: int, mode: int = 0) -> int:
        """Open ``rel`` confined to the layer; the final component is never followed.
        Relative to its parent's fd when a cache holds that, else resolved from the root."""
        if faults.armed:
            faults.hit("layer.open", self, rel)
        head, name = split(rel)
        held = self.held_dir(head) if name else None
        if held is not None:  # ``held`` keeps its fd open for the call
            return retrying(sysapi.openat2, held.fd, name, flags | os.O_NOFOLLOW, mode)
        return openat_beneath(self.root_fd, rel or ".", flags | os.O_NOFOLLOW, mode)

    def open_at(self, parent: DirFd, name: str, rel: str, flags: int) -> int:
        """``open`` of entry ``name`` of an open directory of this layer (a cache's: no
        lookup of it), the final component not followed. ``rel``: its path, for
        ``open``'s fault point (the same: ``layer.open``)."""
        if faults.armed:
            faults.hit("layer.open", self, rel)
        return retrying(sysapi.openat2, parent.fd, name, flags | os.O_NOFOLLOW)

    def path_fd(self, rel: str) -> int:
        return self.open(rel, os.O_PATH)

    @scopes.contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """Yield ``(dirfd, name)`` for acting on the last component of ``rel``: the
        parent's fd from a cache when one holds it (no path walk), else one resolved from
        the root for this call."""
        head, name = split(rel)
        held = self.held_dir(head)
        if held is not None:
            yield held.fd, name  # ``held`` keeps the fd open until the call is done
            return
        fd = openat_beneath(self.root_fd, head, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """``lstat`` of ``rel``, or None when it does not exist inside this layer. One
        ``fstatat`` when a cache holds the parent's fd (a name that is a mount point counts
        as absent, as ``RESOLVE_NO_XDEV`` has it: ``_crossed`` where the root is not
        ``cloned``)."""
        head, name = split(rel)
        held = self.held_dir(head) if name else None
        if held is not None:  # ``held`` keeps its fd open for the call
            try:
                st = os.stat(name, dir_fd=held.fd, follow_symlinks=False)
            except OSError as e:
                if e.errno in _ABSENT:
                    return None
                raise
            if st.st_dev != self.dev or (not self.cloned and self._crossed(held.fd, name, st)):
                return None
            return st
        try:
            fd = self.open(rel, os.O_PATH)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    # -- resolution relative to an open directory (one syscall per step) ------------------
    # ``name`` is always a single component from a FUSE path (never "", ".", ".." or with
    # "/"), acted on without following it; a name that is a mount point is treated as
    # absent, as ``RESOLVE_NO_XDEV`` does (another filesystem's by ``st_dev``; where the
    # root is not ``cloned``, any, ``_crossed``; xattr reads through ``_entry_fd`` there).
    def stat_at(self, parent: DirFd, name: str) -> os.stat_result | None:
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError as e:
            if e.errno in _ABSENT or e.errno == errno.ENAMETOOLONG:
                return None
            raise
        if st.st_dev != self.dev or (not self.cloned and self._crossed(parent.fd, name, st)):
            return None
        return st

    def _crossed(self, dirfd: int, name: str, st: os.stat_result) -> bool:
        """Whether the ``fstatat`` of entry ``name`` of ``dirfd`` that gave ``st`` crossed a
        mount on the name (roots not ``cloned`` only: beneath a clone no name is a mount
        point). One ``statx`` after it: the name is a mount's root, or is another object
        than ``st`` (a mount made or gone between the two calls) -- or gone. Where the
        kernel does not say (before 5.8), an ``O_PATH`` open of the name confined
        (``RESOLVE_NO_XDEV``: EXDEV on a mount point) and its ``fstat``."""
        try:
            seen = sysapi.mount_root_at(dirfd, name)
            if seen is not None:
                return seen[2] or (seen[0], seen[1]) != (st.st_dev, st.st_ino)
            fd = self._entry_fd(dirfd, name)
        except OSError as e:
            if e.errno in _ABSENT or e.errno == errno.ENAMETOOLONG:
                return True
            raise
        try:
            return not same_file(os.fstat(fd), st)
        finally:
            os.close(fd)

    def entry_xattr_path(self, dirfd: int, name: str) -> tuple[str, bool, int | None]:
        """Where to read the xattrs of entry ``name`` of ``dirfd`` itself: ``(path, follow,
        fd to close after)``. ``/proc/self/fd/DIRFD/NAME`` not followed where the root is
        ``cloned``, else the magic link of an ``_entry_fd`` (EXDEV where the name is a
        mount point: no read follows it)."""
        if self.cloned:
            return f"/proc/self/fd/{dirfd}/{name}", False, None
        fd = self._entry_fd(dirfd, name)
        return f"/proc/self/fd/{fd}", True, fd

    def _entry_fd(self, dirfd: int, name: str) -> int:
        """An ``O_PATH`` fd of entry ``name`` of ``dirfd`` itself (not followed), opened
        confined: EXDEV where the name is a mount point. For reads by name where the root
        is not ``cloned`` (a path through ``/proc/self/fd/N/name`` would cross the mount)."""
        return retrying(sysapi.openat2, dirfd, name, os.O_PATH | os.O_NOFOLLOW)

    def dir_at(self, parent: DirFd, name: str) -> DirFd | None:
        try:
            return DirFd(retrying(sysapi.openat2, parent.fd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW))
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise

    def dir_fd(self, rel: str) -> DirFd | None:
        try:
            return DirFd(openat_beneath(self.root_fd, rel or ".", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW))
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise

    def getxattr_at(self, dirfd: DirFd, name: str) -> bytes | None:
        return _getxattr_or_none(dirfd.fd, name)

    def getxattr_name(self, parent: DirFd, name: str, attr: str) -> bytes | None:
        """xattr ``attr`` of entry ``name`` of an open directory, not following it (one
        ``lgetxattr``); None when it has none or is gone (or is a mount point, where the
        root is not ``cloned``: an ``O_PATH`` open, the read, a close)."""
        return self._entry_getxattr(parent.fd, name, attr)

    def _entry_getxattr(self, dirfd: int, name: str, attr: str) -> bytes | None:
        """xattr ``attr`` of entry ``name`` of ``dirfd`` itself: by name where the root is
        ``cloned``, else through ``_entry_fd``; None when it has none, is gone or is a
        mount point."""
        if self.cloned:
            return _getxattr_or_none(dirfd, attr, name)
        try:
            fd = self._entry_fd(dirfd, name)
        except OSError as e:
            if e.errno in _ABSENT or e.errno == errno.ENAMETOOLONG:
                return None
            raise
        try:  # (the magic link of an O_PATH fd of a symlink leads to the symlink itself)
            return _getxattr_or_none(fd, attr)
        finally:
            os.close(fd)

    def xattr_names_at(self, parent: DirFd, name: str) -> frozenset[str] | None:
        """The xattr names of entry ``name`` of an open directory, not following it (one
        ``listxattrat``, or ``llistxattr`` through ``/proc/self/fd`` where the kernel has
        none or the list is long; through ``_entry_fd`` where the root is not ``cloned``);
        None when they cannot be listed (gone, a mount point, or an error)."""
        try:
            if not self.cloned:  # (a mount point: EXDEV, None)
                fd = self._entry_fd(parent.fd, name)
                try:
                    return frozenset(os.listxattr(f"/proc/self/fd/{fd}"))
                finally:
                    os.close(fd)
            names = sysapi.listxattr_at(parent.fd, name)
            if names is None:
                names = os.listxattr(f"/proc/self/fd/{parent.fd}/{name}", follow_symlinks=False)
            return frozenset(names)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return frozenset()
            return None

    def xattr_names_of(self, dirfd: DirFd) -> frozenset[str] | None:
        """The xattr names of the directory an ``O_PATH`` fd refers to (one ``listxattr``);
        None when they cannot be listed."""
        try:
            return frozenset(os.listxattr(f"/proc/self/fd/{dirfd.fd}"))
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return frozenset()
            return None

    def scandir(self, dirfd: DirFd, *, stat_all: bool = False) -> list[Listed]:
        """Entries of an open directory. Type and inode number come from ``d_type`` and
        ``d_ino`` without a stat, except for character devices (whiteouts are 0/0 ones),
        unknown types, and everything when ``stat_all``. Where the root is not ``cloned``,
        an entry stat-ed that is a mount point is left out (absent, as to a lookup); one
        not stat-ed shows the type and number of the object it covers, as ``getdents``
        does."""
        fd = retrying(lambda: os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd.fd))
        out: list[Listed] = []
        try:
            with retrying(os.scandir, fd) as it:  # scandir dups the fd
                crossed = None if self.cloned else self._crossed
                if stat_all:  # (per entry of a READDIRPLUS: no d_type tests, the stat says)
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if crossed is not None and crossed(fd, e.name, st):
                            continue  # a mount point: absent, as to a lookup
                        out.append(_new_tuple(Listed, (e.name, st.st_mode & _S_IFMT, e.inode(), st)))
                    return out
                for e in it:
                    fmt = (stat.S_IFDIR if e.is_dir(follow_symlinks=False) else
                           stat.S_IFREG if e.is_file(follow_symlinks=False) else
                           stat.S_IFLNK if e.is_symlink() else 0)
                    st = None
                    if not fmt:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if crossed is not None and crossed(fd, e.name, st):
                            continue
                        fmt = stat.S_IFMT(st.st_mode)
                    out.append(Listed(e.name, fmt, e.inode(), st))
        finally:
            os.close(fd)
        return out

    def names_at(self, dirfd: DirFd, limit: int) -> list[str] | None:
        """The entry names of an open directory (no stat); None as soon as there are more
        than ``limit`` (the rest is not read)."""
        fd = retrying(lambda: os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd.fd))
        names: list[str] = []
        try:
            with retrying(os.scandir, fd) as it:  # scandir dups the fd
                for e in it:
                    if len(names) >= limit:
                        return None
                    names.append(e.name)
        finally:
            os.close(fd)
        return names

    def listdir(self, rel: str) -> list[tuple[str, os.stat_result]]:
        """Names in directory ``rel`` with their ``lstat``, read while the dir fd is open
        (a name that is a mount point left out where the root is not ``cloned``)."""
        fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            out = []
            for name in retrying(os.listdir, fd):  # listdir dups the fd
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not self.cloned and self._crossed(fd, name, st):
                    continue  # a mount point: absent, as to a lookup
                out.append((name, st))
            return out
        finally:
            os.close(fd)

    def getxattr_strict(self, rel: str, name: str) -> bytes:
        """Like ``getxattr`` but raising ENODATA and friends, for answers to callers."""
        fd = self.path_fd(rel)
        try:
            return os.getxattr(f"/proc/self/fd/{fd}", name)
        finally:
            os.close(fd)

    def readlink(self, rel: str) -> str:
        """The target of symlink ``rel``; where the root is not ``cloned``, through a
        confined ``O_PATH`` fd (EXDEV where the name is a mount point)."""
        with self.parent(rel) as (dfd, name):
            if self.cloned or not name:
                return os.readlink(name, dir_fd=dfd)
            fd = self._entry_fd(dfd, name)
            try:
                return os.readlink("", dir_fd=fd)  # (readlinkat of the fd itself)
            finally:
                os.close(fd)

    # -- xattrs (through an O_PATH fd of the object itself) ------------------------------
    def getxattr(self, rel: str, name: str) -> bytes | None:
        fd = self.path_fd(rel)
        try:
            return _getxattr_or_none(fd, name)
        finally:
            os.close(fd)

    def getxattr_fd(self, fd: int, name: str) -> bytes | None:
        """xattr ``name`` of the object ``fd`` (any fd, ``O_PATH`` too) refers to; None
        when it has none."""
        return _getxattr_or_none(fd, name)

    def listxattr(self, rel: str) -> list[str]:
        fd = self.path_fd(rel)
        try:
            return os.listxattr(f"/proc/self/fd/{fd}")
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                return []
            raise
        finally:
            os.close(fd)

    def do_setxattr(self, rel: str, name: str, value: bytes, flags: int = 0) -> None:
        log.debug("%s: setxattr %s %s (%d bytes)", self.name, rel, name, len(value))
        fd = self.path_fd(rel)
        try:
            os.setxattr(f"/proc/self/fd/{fd}", name, value, flags)
        finally:
            os.close(fd)

    def do_removexattr(self, rel: str, name: str) -> None:
        log.debug("%s: removexattr %s %s", self.name, rel, name)
        fd = self.path_fd(rel)
        try:
            os.removexattr(f"/proc/self/fd/{fd}", name)
        finally:
            os.close(fd)

    # -- changes ------------------------------------------------------------------------
    def _change(self, what: str, rel: str, *args: object, debug: bool = True) -> None:
        """A change of ``rel`` about to be made: refused in a read-only layer, a fault
        point, a debug line. ``debug`` False: the caller read the debug level as off (a
        copy-up, once for its ~7 changes: ``debugging``)."""
        if not self.writable:
            raise OSError(errno.EROFS, "layer is read-only", rel)
        # (the point's name and the log line made only where used: ~7 changes per copy-up)
        if faults.armed:
            faults.hit(f"layer.{what}", self, rel)
        if debug and log.isEnabledFor(logs.DEBUG):
            log.debug("%s: %s %s %s", self.name, what, rel, " ".join(map(str, args)))

    def do_mkdir(self, rel: str, mode: int) -> None:
        self._change("mkdir", rel, oct(mode))
        with self.parent(rel) as (dfd, name):
            os.mkdir(name, mode, dir_fd=dfd)

    def mkdir_at(self, parent: DirFd, name: str, rel: str, mode: int) -> None:
        """``do_mkdir`` of entry ``name`` of an open directory of this layer (``rel``, its
        path, for the log line and the fault points)."""
        self._change("mkdir", rel, oct(mode))
        os.mkdir(name, mode, dir_fd=parent.fd)

    def do_mknod(self, rel: str, mode: int, device: int = 0) -> None:
        self._change("mknod", rel, oct(mode), device)
        with self.parent(rel) as (dfd, name):
            os.mknod(name, mode, device, dir_fd=dfd)

    def do_symlink(self, target: str, rel: str) -> None:
        self._change("symlink", rel, target)
        with self.parent(rel) as (dfd, name):
            os.symlink(target, name, dir_fd=dfd)

    def do_unlink(self, rel: str) -> None:
        self._change("unlink", rel)
        head, name = split(rel)
        held = self.held_dir(head)
        if held is not None:  # (``parent``'s first case inlined: one per file of an rm -rf)
            os.unlink(name, dir_fd=held.fd)
            return
        with self.parent(rel) as (dfd, name):
            os.unlink(name, dir_fd=dfd)

    def unlink_at(self, parent: DirFd, name: str, rel: str) -> None:
        """``do_unlink`` of entry ``name`` of an open directory of this layer (``rel``, its
        path, for the log line and the fault points)."""
        self._change("unlink", rel)
        os.unlink(name, dir_fd=parent.fd)

    def do_rmdir(self, rel: str) -> None:
        self._change("rmdir", rel)
        head, name = split(rel)
        held = self.held_dir(head)
        if held is not None:  # (as ``do_unlink``'s)
            os.rmdir(name, dir_fd=held.fd)
            return
        with self.parent(rel) as (dfd, name):
            os.rmdir(name, dir_fd=dfd)

    def rmdir_at(self, parent: DirFd, name: str, rel: str) -> None:
        """``do_rmdir`` of entry ``name`` of an open directory of this layer (as
        ``unlink_at``)."""
        self._change("rmdir", rel)
        os.rmdir(name, dir_fd=parent.fd)

    def do_remove_tree(self, rel: str) -> None:
        """Remove ``rel`` and, for a directory, everything beneath it (no-op if absent):
        ``_TreeRemoval``, iterative and with a bounded number of fds at any depth."""
        st = self.lstat(rel)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.do_unlink(rel)
            return
        if not self.writable:
            raise OSError(errno.EROFS, "layer is read-only", rel)
        with self.parent(rel) as (top_fd, name):
            _TreeRemoval(self, top_fd, rel, name).run()

    def _step(self, what: str, path: "Callable[[], str]") -> None:
        """``_change`` of one step of a tree removal, its path made only when a fault
        point or the debug log can use it (a path thousands of levels deep costs as many
        bytes, at each step)."""
        if faults.armed or log.isEnabledFor(logs.DEBUG):
            self._change(what, path())

    def do_remove_tree_contents(self, rel: str) -> None:
        for name, _ in self.listdir(rel):
            self.do_remove_tree(join(rel, name))

    def do_create(self, rel: str, flags: int, mode: int, debug: bool = True) -> int:
        self._change("create", rel, oct(mode), debug=debug)
        return self.open(rel, flags | os.O_CREAT, mode)

    def create_at(self, parent: DirFd, name: str, rel: str, flags: int, mode: int,
                  debug: bool = True) -> int:
        """``do_create`` of entry ``name`` of an open directory of this layer (``rel``, its
        path, for the log line and the fault points): ``open``'s call in the held fd.
        ``debug``: ``_change``'s."""
        self._change("create", rel, oct(mode), debug=debug)
        return retrying(sysapi.openat2, parent.fd, name, flags | os.O_CREAT | os.O_NOFOLLOW, mode)

    def do_tmpfile(self, rel: str, flags: int, mode: int) -> int:
        """An unnamed regular file in the directory ``rel`` (``O_TMPFILE``), open with
        ``flags``: it goes with its last fd unless ``do_link_fd`` names it (never one
        opened with ``O_EXCL``)."""
        self._change("tmpfile", rel, oct(mode))
        return self.open(rel, flags | os.O_TMPFILE, mode)

    def do_link_fd(self, fd: int, rel: str) -> None:
        """Name the open file ``fd`` of this layer ``rel`` (``sysapi.link_fd``)."""
        self._change("link", rel, f"fd {fd}")
        with self.parent(rel) as (dfd, name):
            sysapi.link_fd(fd, dfd, name)

    # chmod, chown and utime of a name: one call on the name through its parent's fd where
    # no mount can be on the name: beneath a private clone of the layer's mount
    # (``cloned``: the call acts on the object a mount on the name covers, as the kernel's
    # overlay does), or ``by_name``, for a name the daemon made itself in this lock hold (a
    # copy in ``workdir/work``, a new object) or a directory (the lookup's ``dir_at``
    # refuses one that is a mount point). Else through an ``O_PATH`` fd of the object,
    # opened confined (``path_fd``): a name that is a mount point (a bind mount from
    # elsewhere on the layer's filesystem passes the lookup's ``st_dev`` check) is refused
    # with EXDEV, where an ``*at`` call on the name would cross it and change the mount's
    # source, outside the layer (review24).
    def do_chmod(self, rel: str, mode: int, *, by_name: bool = False) -> None:
        self._change("chmod", rel, oct(mode))
        head, name = split(rel)
        held = self.held_dir(head) if (by_name or self.cloned) and name else None
        # not followed: one system call where the kernel has ``fchmodat2`` (EOPNOTSUPP for
        # a symlink)
        if held is not None and sysapi.chmod_nofollow(held.fd, name, mode):
            return
        fd = self.path_fd(rel)
        try:
            if sysapi.chmod_nofollow(fd, "", mode):
                return
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, "cannot chmod a symlink", rel)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def do_chown(self, rel: str, uid: int, gid: int, *, by_name: bool = False) -> None:
        self._change("chown", rel, uid, gid)
        if not rel:  # the layer root has no parent inside the layer
            os.chown(f"/proc/self/fd/{self.root_fd}", uid, gid)
            return
        if by_name or self.cloned:
            with self.parent(rel) as (dfd, name):
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            return
        fd = self.path_fd(rel)
        try:  # (the magic link leads to the object the fd holds, a symlink itself too)
            os.chown(f"/proc/self/fd/{fd}", uid, gid)
        finally:
            os.close(fd)

    def do_utime(self, rel: str, ns: tuple[int, int], *, by_name: bool = False,
                 debug: bool = True) -> None:
        self._change("utime", rel, ns, debug=debug)
        if not rel:  # the layer root has no parent inside the layer
            os.utime(f"/proc/self/fd/{self.root_fd}", ns=ns)
            return
        if by_name or self.cloned:
            with self.parent(rel) as (dfd, name):
                os.utime(name, ns=ns, dir_fd=dfd, follow_symlinks=False)
            return
        fd = self.path_fd(rel)
        try:
            os.utime(f"/proc/self/fd/{fd}", ns=ns)
        finally:
            os.close(fd)

    # -- changes through an open fd of the object (``rel``: its path, for faults and the
    # debug log); for a file the daemon just opened through this layer, so no path walk
    def do_fchown(self, fd: int, rel: str, uid: int, gid: int, debug: bool = True) -> None:
        self._change("chown", rel, uid, gid, debug=debug)
        os.chown(fd, uid, gid)

    def chown_kept(self, rel: str, uid: int, gid: int, debug: bool = True) -> None:
        """A ``do_fchown`` not made: ``rel`` was created with that owner (a copy-up's,
        ``CopyUp._created``). Its fault point and debug line, as the chown's."""
        self._change("chown", rel, uid, gid, "(created so: not made)", debug=debug)

    def do_fchmod(self, fd: int, rel: str, mode: int, debug: bool = True) -> None:
        self._change("chmod", rel, oct(mode), debug=debug)
        os.chmod(fd, mode)

    def do_futime(self, fd: int, rel: str, ns: tuple[int, int], debug: bool = True) -> None:
        self._change("utime", rel, ns, debug=debug)
        os.utime(fd, ns=ns)

    def getxattr_entry(self, rel: str, name: str) -> bytes | None:
        """xattr ``name`` of ``rel`` itself (not followed) through its parent's fd: no open
        when a cache holds the parent (a top-level name: the root's); None when it has none."""
        if not rel:
            return _getxattr_or_none(self.root_fd, name)
        with self.parent(rel) as (dfd, last):
            return self._entry_getxattr(dfd, last, name)

    def do_setxattr_entry(self, rel: str, name: str, value: bytes) -> None:
        """Set xattr ``name`` of ``rel`` itself (not followed) through its parent's fd, as
        ``getxattr_entry`` reads it."""
        log.debug("%s: setxattr %s %s (%d bytes)", self.name, rel, name, len(value))
        if not rel:
            os.setxattr(f"/proc/self/fd/{self.root_fd}", name, value)
            return
        with self.parent(rel) as (dfd, last):
            os.setxattr(f"/proc/self/fd/{dfd}/{last}", name, value, follow_symlinks=False)

    def do_setxattr_held(self, fd: int, rel: str, name: str, value: bytes) -> None:
        """Set xattr ``name`` of the object an ``O_PATH`` fd (a cache's, of ``rel``) refers to."""
        log.debug("%s: setxattr %s %s (%d bytes)", self.name, rel, name, len(value))
        os.setxattr(f"/proc/self/fd/{fd}", name, value)

    def do_fsetxattr(self, fd: int, rel: str, name: str, value: bytes) -> None:
        log.debug("%s: setxattr %s %s (%d bytes)", self.name, rel, name, len(value))
        os.setxattr(fd, name, value)

    def do_truncate(self, rel: str, length: int) -> None:
        self._change("truncate", rel, length)
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def fsync_dir(self, rel: str, held: DirFd | None = None) -> None:
        """fsync of directory ``rel``, through ``held``'s readable fd where given (a cache's,
        ``readable_dir``). One the daemon may not open for reading (EACCES: a plain user's
        daemon and an upper directory of its own of mode 0300, which root's never meets) is
        made durable by ``sync`` instead: every filesystem's, not this directory's alone,
        but the copy-up is durable as everywhere else rather than failed after its rename."""
        try:
            if held is not None:
                fd = self.readable_dir(held, rel)
            else:
                fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        except PermissionError:
            os.sync()
            return
        if held is not None:
            os.fsync(fd)
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def readable_dir(self, held: DirFd, rel: str) -> int:
        """A readable fd of the held directory ``rel`` (``held``: a cache's, ``held_dir``),
        kept with it (``DirFd.readable``): the first call opens it (through the held fd:
        no path walk) and has the cache count it (``readable_opened``). Called under the
        namespace lock (a copy-up's install: no two threads open one for the same
        directory at once). A directory removed or renamed since still answers: the fd
        is of its inode (the caller found ``held`` in this lock hold, where the cache holds
        only directories that are where it says)."""
        fd = held.readable
        if fd < 0:
            fd = retrying(sysapi.openat2, held.fd, ".", os.O_RDONLY | os.O_DIRECTORY)
            held.readable = fd
            if self.readable_opened is not None:
                self.readable_opened(rel, held)
        return fd

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(f"/proc/self/fd/{self.root_fd}")


#: directory fds a tree removal (``_TreeRemoval``) holds at most, whatever the depth
REMOVAL_FDS = 16
_REMOVAL_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class _Level:
    """One directory on a tree removal's way down: its name in the one above, its fd
    (-1: not held) and its names not yet removed (None: not listed yet)."""
    __slots__ = ("name", "fd", "names")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = -1
        self.names: list[str] | None = None


class _TreeRemoval:
    """``Layer.do_remove_tree`` of a directory: depth first, with a list of the
    directories on the way down instead of recursion (a tree left in workdir/work may be
    thousands of levels deep). Only the ``REMOVAL_FDS`` deepest directories on the way
    keep their fds; going back up to one that let its fd go opens it again by its path
    from the removal's top (``openat_beneath``: confined beneath that directory, no
    symlink followed, no other filesystem entered, in steps when the path is long), with
    the levels below it, ``REMOVAL_FDS`` at a time. Every entry is acted on by name in its
    open directory without being followed (a symlink is unlinked, a directory of another
    filesystem is refused with EBUSY: ``rmdir`` could not remove it). Memory: the names
    not yet removed of each directory on the way."""

    def __init__(self, layer: Layer, top_fd: int, rel: str, name: str) -> None:
        self.layer = layer
        self.top_fd = top_fd  # the removed directory's parent (held by the caller)
        self.rel = rel
        self.levels = [_Level(name)]

    def _path(self, child: str | None = None) -> str:
        """The layer path of the deepest level (or of ``child`` in it)."""
        parts = [self.rel] + [level.name for level in self.levels[1:]]
        return "/".join(parts if child is None else parts + [child])

    def run(self) -> None:
        layer, levels = self.layer, self.levels
        try:
            while levels:
                level = levels[-1]
                fd = self._fd()
                if level.names is None:
                    level.names = retrying(os.listdir, fd)  # (it dups the fd)
                if self._down(level, fd):
                    continue
                # empty now: it goes from the directory above
                levels.pop()
                os.close(level.fd)
                layer._step("rmdir", lambda: self._path(level.name) if levels else self.rel)
                os.rmdir(level.name, dir_fd=self._fd() if levels else self.top_fd)
        finally:
            for level in levels:
                if level.fd >= 0:
                    os.close(level.fd)

    def _down(self, level: _Level, fd: int) -> bool:
        """Remove the non-directories left in ``level`` (open as ``fd``) up to its next
        directory, which becomes the deepest level: True; False when none is left."""
        names = level.names
        assert names is not None
        while names:
            name = names.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != self.layer.dev:
                    raise OSError(errno.EBUSY, "another filesystem is mounted there",
                                  self._path(name))
                self.levels.append(_Level(name))
                return True
            self.layer._step("unlink", lambda: self._path(name))
            os.unlink(name, dir_fd=fd)
        return False

    def _fd(self) -> int:
        """The deepest level's fd, opened if it is not held: from the level above when
        that one is held, else the levels from ``REMOVAL_FDS`` above it down to it, the
        first by its path from the top. At most ``REMOVAL_FDS`` are held after."""
        levels = self.levels
        deepest = levels[-1]
        if deepest.fd >= 0:
            return deepest.fd
        at = len(levels) - 1
        if at == 0:
            deepest.fd = retrying(sysapi.openat2, self.top_fd, deepest.name, _REMOVAL_OPEN)
        elif levels[at - 1].fd >= 0:
            deepest.fd = retrying(sysapi.openat2, levels[at - 1].fd, deepest.name, _REMOVAL_OPEN)
            # the held levels are the deepest ones, one after the other: one goes
            beyond = levels[at - REMOVAL_FDS] if at >= REMOVAL_FDS else None
            if beyond is not None and beyond.fd >= 0:
                os.close(beyond.fd)
                beyond.fd = -1
        else:  # back up to a level that let its fd go: the window again, from the top
            first = max(0, at - REMOVAL_FDS + 1)
            path = "/".join(level.name for level in levels[:first + 1])
            levels[first].fd = openat_beneath(self.top_fd, path, _REMOVAL_OPEN)
            for i in range(first + 1, at + 1):
                levels[i].fd = retrying(sysapi.openat2, levels[i - 1].fd, levels[i].name,
                                        _REMOVAL_OPEN)
        return deepest.fd


def do_rename(src: Layer, src_rel: str, dst: Layer, dst_rel: str, flags: int = 0,
              debug: bool = True) -> None:
    """``renameat2`` between two layers on one filesystem (workdir -> upper, or within one).
    ``debug``: as ``Layer._change``'s."""
    _renaming(src, src_rel, dst, dst_rel, flags, debug)
    with src.parent(src_rel) as (sfd, sname), dst.parent(dst_rel) as (dfd, dname):
        if flags:
            sysapi.renameat2(sfd, sname, dfd, dname, flags)
        else:
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)


def rename_at(src: Layer, src_dir: DirFd, src_name: str, src_rel: str, dst: Layer, dst_dir: DirFd,
              dst_name: str, dst_rel: str, flags: int, debug: bool = True) -> None:
    """``do_rename`` between entries of two open directories (a copy-up's: ``workdir/work``
    and the upper parent, held by caches; the paths for ``_change``): no lookup of them."""
    _renaming(src, src_rel, dst, dst_rel, flags, debug)
    sysapi.renameat2(src_dir.fd, src_name, dst_dir.fd, dst_name, flags)


def _renaming(src: Layer, src_rel: str, dst: Layer, dst_rel: str, flags: int, debug: bool) -> None:
    """A rename's ``_change`` (``do_rename``, ``rename_at``): its log line's parts made only
    where it may be written."""
    if debug:
        dst._change("rename", dst_rel, f"from {src.name}:{src_rel}", f"flags={flags}")
    else:
        dst._change("rename", dst_rel, debug=False)


def do_link(src: Layer, src_rel: str, dst: Layer, dst_rel: str) -> None:
    """Hard link between two layers on one filesystem (upper -> workdir, or within one)."""
    dst._change("link", dst_rel, f"to {src.name}:{src_rel}")
    with src.parent(src_rel) as (sfd, sname), dst.parent(dst_rel) as (dfd, dname):
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
