"""The core's part of a short MKDIR and a short RMDIR (issue 17, ``speed50b``): a directory
made, or an empty one removed, in a directory the lookup cache holds as one upper entry
(``Lookup.upper_dir``: an upper-only or opaque directory at its own path), without the
generic machinery (``OverlayOps._mkdir_name`` and ``_rmdir_name`` hold the namespace lock
around these, the node table and the reply are theirs). One MKDIR per new directory of an
untar, one RMDIR per directory of an ``rm -rf``.

Owns ``made_dir_in``: what ``Namespace.mkdir`` (``_prepare_new``, ``_place_new``, ``_owner_in``,
``_place``, ``_set_owner``, ``_named``, ``_then_made_dir``) does for such a directory, in the
same order and with the same system calls, results and state, where it makes it in place: the
caller's IDs are the daemon's own (``Namespace._owned_after``: no ``workdir/work`` route; the
hook is not set where IDs are mapped or owners kept in xattrs: ``Ownership.active``), the mode
has no special bits, and the kernel's negative LOOKUP of the name kept its absence
(``Lookup.absent``, taken once; looked at first with ``Lookup.absent_kept``, so that a MKDIR
with none reads nothing twice). None, with nothing done, where the generic path must decide: a
read of the parent failing, a parent with immutable/append-only flags (``Protection.of_node``:
EPERM, as ``protattr.check_dir_add``), a default ACL (``acl.inherit``) or the setgid bit
(``_owner_in``: the new directory takes the group and the bit), no kept absence, the name taken
behind the mount's back (``mkdirat``'s EEXIST: ``_place_new`` looks afresh). A failure once the
directory is made removes it again (``Namespace._unmake`` before it is named, ``_unmake_new``
after) and is the answer.

Owns ``removed_dir_in``: what ``Namespace.rmdir`` (``_check_rmdir``, ``_check_protected``,
``_rmdir_if_empty``, the merged listing's ENOTEMPTY, ``_remove``, ``_done``) does for a
directory the lookup cache holds as ``upper_dir`` too (one upper entry at its own path: no
redirect merges a lower one in; inside an ``upper_dir`` parent no lower layer holds the name,
so ``lower_exists`` is False and no whiteout is left), found still there with one ``fstatat``
(``Lookup._still_there``, the generic lookup's own check). An upper directory holding only
whiteouts (a former mount's) is empty in the merged view and goes as ``_remove`` takes it
(renamed into ``workdir/work`` and discarded); one that lists anything is ENOTEMPTY. The
kernel answers EBUSY for a mount point itself (no RMDIR is sent).
"""
from __future__ import annotations

import errno
import stat

from . import shortcreate
from .lookup import Entry, Lookup, Node
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from .core import OverlayFS

#: what ``made_dir_in`` answers: (the new directory's node, as ``Namespace._made_node``
#: makes it; its stat as ``Namespace._set_owner`` answered it: None where that changed
#: something, what ``_unmake_new`` compares). A tuple: one per MKDIR
MadeDir = tuple


def made_dir_in(fs: "OverlayFS", pnode: Node, name: str, rel: str,
                mode: int) -> "MadeDir | None":
    """Make the directory ``name`` (at merged path ``rel``) in ``pnode`` (``Lookup.upper_dir``'s
    node), ``mode`` its permission bits with the umask applied (no special bits), cached as
    ``Lookup.made_dir`` caches it (``MadeDir``; a failure of the caller's steps that follow
    is undone by ``unmade_dir``). Under the namespace lock, whose holder moves the lookup's
    epoch at its end (after a raise too: only the creation and what follows it raise), not
    after a None."""
    if not shortcreate.free_in(fs, pnode, rel):  # (the checks ``made_in``'s are)
        return None
    top = pnode.entries[0]
    upper, parent = top.layer, top.dirfd
    try:
        upper.mkdir_at(parent, name, rel, mode)
    except FileExistsError:
        return None
    ns = fs.namespace
    made = None
    try:
        # ``_set_owner`` (no override xattrs: ``Ownership.active`` is False), its ``_lstat``
        # through the parent's held fd; the IDs differ only where the upper gave another
        # group (a ``grpid`` mount), the special bits only where it set them
        st = upper.stat_at(parent, name)
        if st is not None:
            made = st
            own = ns._own_ids
            if (st.st_uid, st.st_gid) != own:
                upper.do_chown(rel, own[0], own[1], by_name=True)
                made = None
            if st.st_mode & 0o7000:
                upper.do_chmod(rel, stat.S_IMODE(st.st_mode) & 0o777, by_name=True)
                made = None
    except BaseException:
        ns._unmake(upper, rel, True)  # (``_place``'s: a failed operation leaves no trace)
        raise
    try:  # (``_named`` -> ``_then_made_dir`` -> ``_made_node``)
        st = made if made is not None else upper.stat_at(parent, name)
        if st is None:
            raise OSError(errno.ENOENT, "vanished while it was made", rel)
        fs.inos.made(st)
        node = Node(rel, (Entry(upper, rel, st, None, parent),))
        fs.lookup.made_dir(rel, st)
    except BaseException:
        ns._unmake_new(rel, made, hides=False)
        raise
    return node, made


def unmade_dir(fs: "OverlayFS", rel: str, made: "MadeDir") -> None:
    """Undo ``made_dir_in``'s directory after a later step in the same lock hold failed
    (the node table's), as ``Namespace._named`` undoes it (``_unmake_new``)."""
    fs.namespace._unmake_new(rel, made[1], hides=False)


def removed_dir_in(fs: "OverlayFS", pnode: Node, name: str, rel: str,
                   gone: "Callable[[Node], None]") -> bool:
    """Remove the directory ``name`` (at merged path ``rel``) of ``pnode``
    (``Lookup.upper_dir``'s node) when the lookup cache holds it as ``upper_dir`` too and it
    is still there; then ``gone(its node as found)`` (the node table's part), in the
    caller's namespace lock hold, counted in ``pathguard`` as ``rmdir``'s removal, the
    lookup's epoch moved at the end (after a raise too). False, nothing changed nor moved,
    where ``rmdir``'s lookup must decide: not cached so, not found again, its flags not read
    or set (``_check_protected``: EPERM). The removal's own error is the answer (ENOTEMPTY,
    a failed ``rmdir``)."""
    cached = fs.lookup.upper_dir(rel)
    if cached is None:
        return False
    try:
        node = Lookup._still_there(cached, pnode)
        if node is None or fs.protection.of_node(node):
            return False
    except OSError:
        return False
    lookup = fs.lookup
    try:
        with fs.paths.moving():  # (``pathguard``: as ``rmdir``'s)
            try:
                try:
                    node.entries[0].layer.rmdir_at(pnode.entries[0].dirfd, name, rel)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    # (whiteouts, markers or real entries: the merged listing decides;
                    # ``readdir`` imported here, not at start-up: ``test_startup_unit``)
                    from .readdir import merged_listing
                    if merged_listing(node, fs.inos, fs.prefix):
                        raise OSError(errno.ENOTEMPTY, "directory not empty", rel) from None
                    fs.namespace._remove(node, False)
            finally:
                # (``rmdir``'s: even after a failure, the cache never holds its fd under
                # this name, changes act through it)
                lookup.invalidate(rel)
            fs.unlinked(node)
            gone(node)
    finally:
        lookup.changed()  # (``Namespace._changing``'s end)
    return True


__all__ = ["MadeDir", "made_dir_in", "removed_dir_in", "unmade_dir"]
