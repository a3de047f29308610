"""The core's part of a short CREATE (issue 17, ``speed48a``): a new regular file made and
opened in a directory the lookup cache holds as one upper entry, without the generic
machinery (``OverlayOps._create_name`` holds the namespace lock around it, the node table
and the reply are its).

Owns ``made_in``: what ``Files.create`` -> ``Namespace.create`` (``_prepare_new``,
``_place_new``, ``_place``, ``_named``, ``_created``) -> ``Files._opened_new`` do for such a
file, in the same order and with the same system calls, results and state, where they
would make it in place: the parent is ``Lookup.upper_dir`` (an upper-only or opaque
directory at its own path: only the upper holds names there, and no whiteout or OCI
marker can be at a name a lookup found absent), the caller's IDs are the daemon's own
(``Namespace._owned_after``: no ``workdir/work`` route; the hook is not set where IDs are
mapped or owners kept in xattrs: ``Ownership.active``), the mode has no special bits, and
the kernel's negative LOOKUP of the name kept its absence (``Lookup.absent``, taken once).
``None``, with nothing done, where the generic path must decide: a read of the parent
failing (the generic path's own reads answer it), a parent with
immutable/append-only flags (``Protection.of_node``: EPERM, or an append-only parent's
creation), a default ACL (``acl.inherit``, read here as ``_owner_in`` reads it) or the
setgid bit (``_owner_in``'s fresh ``fstat``), no kept absence (a fresh lookup decides),
the name taken behind the mount's back (``O_EXCL``'s EEXIST: ``_place_new`` looks afresh;
the absence is taken, as there). Once the file is made, a failure removes it again
(``Namespace._unmake_new``) and is the answer, as ``_named``'s.
"""
from __future__ import annotations

import errno
import os
import stat

from . import acl, whiteout
from .files import OpenResult
from .inodes import OPEN_FLAGS, InodeKey
from .lookup import Entry, Node
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import OverlayFS

#: the open flags a new file is opened with (``Namespace.create``'s ``access``)
_ACCESS = OPEN_FLAGS & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)

#: what ``made_in`` answers: (the open as ``Files._register`` made it, the new file's
#: stat, its inode number, its key). A tuple: one per CREATE
Made = tuple


def free_in(fs: "OverlayFS", pnode: Node, rel: str) -> bool:
    """Whether a short creation (``made_in``, ``shortdirs.made_dir_in``) may make ``rel`` in
    ``pnode`` (``Lookup.upper_dir``'s node): the kernel's negative LOOKUP kept its absence
    (looked at first, ``Lookup.absent_kept``, so that a creation with none reads nothing the
    generic path reads again; then taken, ``Lookup.absent``) and the parent asks for nothing
    the generic path does: no immutable/append-only flags (``Protection.of_node``: EPERM,
    as ``protattr.check_dir_add``), no default ACL (``acl.inherit``), no setgid bit
    (``Namespace._owner_in``: the new object takes the group, a directory the bit). False
    where a read fails too (the generic path reads again and answers it). The one place of
    these rules for both short creations."""
    if not fs.lookup.absent_kept(rel):
        return False
    top = pnode.entries[0]
    upper, parent = top.layer, top.dirfd
    try:
        if fs.protection.of_node(pnode) or upper.getxattr_at(parent, acl.DEFAULT) is not None \
                or os.fstat(parent.fd).st_mode & stat.S_ISGID:
            return False
    except OSError:
        return False
    return fs.lookup.absent(rel) is not None


def made_in(fs: "OverlayFS", pnode: Node, name: str, rel: str, flags: int,
            mode: int) -> "Made | None":
    """Make and open the regular file ``name`` (at merged path ``rel``) in ``pnode``
    (``Lookup.upper_dir``'s node), ``mode`` its type and permission bits with the umask
    applied (no special bits); under the namespace lock, whose holder moves the lookup's
    epoch at its end, as ``Namespace._changing``, after a raise too (only the creation and
    what follows it raise), not after a None."""
    if not free_in(fs, pnode, rel):
        return None
    top = pnode.entries[0]
    upper, parent = top.layer, top.dirfd
    try:
        fd = upper.create_at(parent, name, rel, flags & _ACCESS | os.O_EXCL, stat.S_IMODE(mode))
    except FileExistsError:
        return None
    made = None
    try:
        # ``_set_owner``'s check, through the new fd: the upper may have given it another
        # group (a ``grpid`` mount) or bits; then its steps (``_own_fd``)
        st = os.fstat(fd)
        own = fs.namespace._own_ids
        if (st.st_uid, st.st_gid) != own or st.st_mode & 0o7000:
            st = fs.namespace._own_fd(upper, fd, rel, own[0], own[1], mode) or os.fstat(fd)
        else:
            made = st
        try:
            names: frozenset[str] | None = frozenset(os.listxattr(fd))
        except OSError as e:
            names = frozenset() if e.errno in _NO_XATTRS else None
        inos = fs.inos
        if names is not None and inos.origin_xattr not in names \
                and whiteout.FOO_ORIGIN not in names:
            # no origin: what ``InodeNumbers.recorded`` keeps for it (``made``), and its own number
            inos.made(st)
            ino = inos.xino.ino(st.st_dev, st.st_ino)
        else:
            ino = inos.ino_of(Node(rel, (Entry(upper, rel, st, None, parent, names),)))
        key = InodeKey(st.st_dev, st.st_ino)  # (``identity`` of an upper object)
        fs.inodes.forget_version(key)  # (before ``acquire``: as ``Files._opened_new``)
        inode = fs.inodes.acquire(key, ino, Entry(upper, rel, st))
    except BaseException:
        os.close(fd)
        fs.namespace._unmake_new(rel, made, hides=False)
        raise
    try:
        fs.files.made_clean(inode, st, names)
        result = fs.files._register(inode, flags, rel, fd, inode.generation)
    except BaseException:
        fs.inodes.release(inode)  # (before its fd closes: ``release``)
        os.close(fd)
        fs.namespace._unmake_new(rel, made, hides=False)
        raise
    return result, st, ino, key


def unmade(fs: "OverlayFS", rel: str, result: OpenResult, st: os.stat_result) -> None:
    """Undo ``made_in``'s file after a later step in the same lock hold failed (the node
    table's): its handle released, the file removed (``Namespace._unmake_new``)."""
    try:
        fs.release(result.fh)  # (closes the fd)
    finally:
        fs.namespace._unmake_new(rel, st, hides=False)


__all__ = ["Made", "free_in", "made_in", "unmade"]
