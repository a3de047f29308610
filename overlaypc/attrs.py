"""Attributes and extended attributes: getattr, chmod, chown, utimens, truncate, xattrs.

Owns: what ``stat`` shows for a merged object and every metadata change. Changes copy
the object up first (``copyup.ensure_upper``) and then act on the upper. Which copy-up a
change makes is decided once, here, by the function beside it (``copy_up_for_setattr``,
``copy_up_for_xattr``), which the change itself runs: the adapter decides nothing. Under
the namespace lock (``OverlayOps._at_node``) the copy-up is refused (``CopyUp.refusing``)
and the request runs it without the lock, then the change again, which finds it done. Overlay-
private xattrs (``trusted.overlay.*``, ``user.overlay.*``, also ``*.overlaypc.*`` for safety,
and the override-stat xattrs of ``ownership``) are never listed, read, set or removed
through the mount; the one exception is the read-only, unlisted virtual
``user.overlaypc.stats`` on the mount root, which stays readable under ``noxattrs=1``
(fuse-overlayfs's option: every other xattr operation answers ENOTSUP).

Owner and mode go through ``ownership`` both ways: what ``getattr`` shows and what
chmod/chown write (ID mapping, squashing, override xattrs).

POSIX ACLs (``system.posix_acl_*``) pass through like any xattr: the kernel reads them
for its permission checks (``FUSE_CAP_POSIX_ACL``), and the upper filesystem keeps the
mode and the ACL mask in step on setxattr and chmod. A layer without ACL support answers
EOPNOTSUPP, which the kernel would take as a failed check, so that becomes ENODATA (no
ACL: the mode bits decide).

``utimens`` takes UTIME_NOW / UTIME_OMIT as bare nanosecond values (the engine's SETATTR
maps the kernel's "now" and "unset" to them); they are resolved here, so ``touch -m`` leaves
atime alone.
"""
from __future__ import annotations

import errno
import os
import stat
import time

from . import acl, faults, killpriv
from .copyup import CopyUpFirst, Seen, is_private_xattr
from .lookup import Entry, Node, UpperName
from .typing_lite import TYPE_CHECKING, NamedTuple
from .whiteout import is_whiteout

if TYPE_CHECKING:
    from collections.abc import Callable

    from .core import OverlayFS

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
STATS_XATTR = "user.overlaypc.stats"

#: ``st_nlink`` of a merged directory, as the kernel overlay shows it: "unknown". Its real
#: count, the upper's or a lower's alone, may undercount its subdirectories, and a tool
#: that trusts ``nlink - 2`` as that count (fts's leaf optimisation, ``find`` without
#: ``-noleaf``) would skip some; 1 tells them not to.
MERGED_DIR_NLINK = 1

_ST_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev", "st_blocks", "st_blksize")



# -- xattrs of a file reached by fd, not by path (nameless files and directories) ------------
def getxattr_at(link: str, name: str) -> bytes:
    """getxattr of the file ``link`` (a /proc magic link) names: a layer without POSIX
    ACLs answers ENODATA for them, as ``Attributes.getxattr``."""
    try:
        return os.getxattr(link, name)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP and name in acl.NAMES:
            raise OSError(errno.ENODATA, "no POSIX ACL on this layer", name) from None
        raise


def listxattr_at(link: str) -> list[str]:
    """The xattr names a user sees of the file ``link`` names (none on a layer without
    xattrs; overlay-private ones never)."""
    try:
        names = os.listxattr(link)
    except OSError as e:
        if e.errno != errno.ENOTSUP:
            raise
        return []
    return [n for n in names if not is_private_xattr(n)]


def setxattr_fd(ownership, layer, fd: int, name: str, value: bytes, flags: int,
                kill_sgid: bool) -> None:
    """setxattr through ``fd``; ``kill_sgid`` (an access ACL set by a caller outside the
    group without CAP_FSETID: ``Attributes.kill_sgid``) then drops S_ISGID."""
    os.setxattr(fd, name, value, flags)
    if kill_sgid:
        mode = ownership.stored_fd(layer, os.fstat(fd), fd).mode
        if mode & stat.S_ISGID:
            ownership.chmod_fd(layer, fd, stat.S_IMODE(mode) & ~stat.S_ISGID)

class Attr(NamedTuple):
    """What ``stat`` shows for a merged object: a backing stat with the overlay's inode
    number and, where they differ from the backing's, its link count and blocks, and its
    owner and mode (``ownership``: ID mapping, squashing, override xattrs)."""
    st: os.stat_result
    ino: int
    nlink: int | None = None
    blocks: int | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    @property
    def st_uid(self) -> int:
        return self.st.st_uid if self.uid is None else self.uid

    @property
    def st_gid(self) -> int:
        return self.st.st_gid if self.gid is None else self.gid

    @property
    def st_mode(self) -> int:
        return self.st.st_mode if self.mode is None else self.mode

    @property
    def st_nlink(self) -> int:
        return self.st.st_nlink if self.nlink is None else self.nlink

    def as_dict(self) -> dict:
        st = self.st
        d = {name: getattr(st, name) for name in _ST_FIELDS}
        d.update(st_ino=self.ino, st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns,
                 st_ctime=st.st_ctime_ns, st_uid=self.st_uid, st_gid=self.st_gid,
                 st_mode=self.st_mode, st_nlink=self.st_nlink)
        if self.blocks is not None:
            d["st_blocks"] = self.blocks
        return d


def resolve_times(times: tuple[int, int] | None, st: os.stat_result) -> tuple[int, int]:
    """(atime, mtime) in ns with UTIME_NOW / UTIME_OMIT resolved against ``st``."""
    now = time.time_ns()
    if times is None:
        return now, now
    atime, mtime = times
    atime = st.st_atime_ns if atime == UTIME_OMIT else now if atime == UTIME_NOW else atime
    mtime = st.st_mtime_ns if mtime == UTIME_OMIT else now if mtime == UTIME_NOW else mtime
    return atime, mtime


#: xattr namespaces whose names ``listxattr`` shows whenever ``getxattr`` could read them
_LISTED = ("user.", "trusted.", "security.capability")


class Attributes:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs

    def getattr(self, rel: str) -> Attr:
        return self.lookup_attr(rel)[1]

    def lookup_attr(self, rel: str, found: "UpperName | None" = None) -> tuple[Node, Attr]:
        """The merged object at ``rel`` and its attributes, from one lookup (``found``: the
        name as ``Lookup.upper_name`` found it, not read again: ``Lookup.found_upper``)."""
        node = self.fs.lookup.lookup(rel) if found is None else self.fs.lookup.found_upper(rel, found)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file or directory", rel)
        if faults.armed:
            faults.hit("attrs.found", rel)  # test-only (faults.py)
        return node, self.of_node(node, rel)

    def of_node(self, node: Node, rel: str) -> Attr:
        st = node.st
        # an index entry with no upper name left has one link of its own, yet it may
        # count lower names (index=on: an unlink of a name copied up, as the kernel does)
        if not node.is_dir and (st.st_nlink > 1 or node.index is not None):
            nlink = self.fs.overlay_nlink(node)
        elif node.merged_dir:
            nlink = MERGED_DIR_NLINK
        else:
            nlink = None
        # metacopy: the blocks are the lower's
        attr = Attr(st, self.fs.inos.ino_of(node), nlink,
                    None if node.data is None else node.data.st.st_blocks)
        return self.fs.ownership.show_entry(attr, node.top)

    # -- which copy-up a change makes first ------------------------------------------------------
    def copy_up_for_setattr(self, rel: str, *, changes: bool = True, kill: bool = False,
                            ids: tuple[int, int] | None = None, data: bool = False,
                            seen: Seen | None = None,
                            check: "Callable[[int], None] | None" = None,
                            mode: int | None = None,
                            deferred: bool = True) -> "Callable[[], Entry] | None":
        """The copy-up a SETATTR (or any attribute change) by path of ``rel`` makes before it
        changes anything: a call that makes it and returns the upper entry, or None. None for
        an object in the upper already (with its data, for ``data``: a truncate), one that
        does not exist (the change fails), a read-only mount (EROFS), or when nothing changes
        (``changes`` False) but a kill flag (``kill``) on a lower regular file, which is
        copied up (metadata only where allowed) before its privileges are looked at. The
        errors the change answers before a copy-up are answered here first (a chown's IDs the
        kill flag checks: EOVERFLOW). ``seen``: ``rel`` as the change just looked it up;
        without it, one ``fstatat`` answers for an upper object (``known_upper``).
        ``check(the object's immutable/append-only flags)`` first, before any copy-up (it
        may refuse the change; a lower object's from this lookup, an upper one's
        ``protattr``: ``protection``); for a lower regular file that is copied up, made by its
        copy-up with the flags it reads of the source anyway (``CopyUp.ensure_upper``'s
        ``check``: no ``statx`` of its own), unless ``deferred`` is False (an error the caller
        answers after this and before the copy-up must not come first: a removed xattr's
        ENODATA). ``mode``: a chmod the copy-up may make itself (``one_pass``,
        ``CopyUp.ensure_upper``)."""
        fs = self.fs
        copyup = fs.copyup
        if not fs.writable or copyup is None:
            return None
        if seen is None:
            if self.known_upper(rel, data):
                if check is not None:
                    check(fs.protection.of_upper_path(fs.stack.upper, rel))
                return None
            epoch = fs.lookup.epoch  # (read before the layers: ``copyup.Seen``)
            seen = Seen(fs.lookup.lookup(rel), epoch)
        node = seen.node
        if check is not None and node.exists:
            if deferred and node.upper is None and stat.S_ISREG(node.st.st_mode) \
                    and (changes or kill):
                pass  # (copied up: by its copy-up, copyup53)
            else:
                # (a copy handed over: the private xattr names its copy-up wrote, ``Seen.private``)
                private = seen.private
                check(fs.protection.of_node(node) if private is None
                      else fs.protection.of_copy(node, private))
                check = None
        if not node.exists or node.upper is not None and not (data and node.data is not None):
            return None
        if not changes and not (kill and stat.S_ISREG(node.st.st_mode)):
            return None
        if kill and ids is not None:
            fs.ownership.chown_ids(*ids)  # (EOVERFLOW: ``OverlayFS.kill_privs``)
        # (in a box: the copy-up lets go of the node before it may wait for fds, stall20)
        held = copyup.holding(seen)
        del seen, node
        if data:
            return lambda: copyup.ensure_data(rel, seen=held, check=check)
        return lambda: copyup.ensure_upper(rel, metadata_only=True, seen=held, mode=mode,
                                           check=check)

    def one_pass(self, node: Node) -> bool:
        """Whether the copy-up of ``node`` (found, not in the upper) for a chmod that asks
        for nothing else may make that chmod itself (``CopyUp.ensure_upper``'s ``mode``:
        the mode in the ``fchmod`` every copy gets, after its ACLs, before its times and
        its install; ``setattr`` then answers from the copy handed over to it): a regular
        file with one link, on a mount where the mode bits alone hold the mode and a copy is
        renamed into place whole: no ID mapping, squashing or override xattrs
        (``Ownership.active``: the mode shown is not the one stored), no ``metacopy=on``
        (metadata-only copies are not handed over), no ``index=on`` (linked, maybe to
        another name's copy). The copy-up declines it where it finds more (``_copy_one``,
        ``_copy_metadata``): the chmod is then the change's, as for everything else. The
        caller's permission and the setgid bit of a caller outside the file's group are
        the kernel's (``default_permissions``: ``setattr_prepare``), before the request."""
        fs = self.fs
        st = node.st
        return st.st_nlink == 1 and stat.S_ISREG(st.st_mode) and not fs.ownership.active \
            and not fs.config.metacopy and fs.copyup.index is None

    def copy_up_for_xattr(self, rel: str, name: str, *, removed: bool = False,
                          check: "Callable[[int], None] | None" = None) -> "Callable[[], Entry] | None":
        """``copy_up_for_setattr`` of a SETXATTR (REMOVEXATTR: ``removed``): none for one
        refused first (xattrs off, a private name); a removed xattr must exist first
        (ENODATA, before any copy-up)."""
        if self.fs.config.noxattrs or is_private_xattr(name):
            return None
        copy = self.copy_up_for_setattr(rel, check=check, deferred=not removed)
        if copy is not None and removed:
            top = self.fs.lookup.lookup(rel).top
            top.layer.getxattr_strict(top.rel, name)
        return copy

    def known_upper(self, rel: str, data: bool) -> bool:
        """Whether ``rel`` is an object of the upper layer (a lookup's top entry: no copy-up
        then), known without a lookup: one ``fstatat`` through the fd the lookup cache holds
        of its upper parent. False when not known so (absent, a whiteout, or ``data``
        asked of a mount with metacopy files, whose data may be below)."""
        if data and self.fs.config.metacopy:
            return False
        st = self.fs.stack.upper.lstat(rel)  # (one fstatat when the parent's fd is held)
        return st is not None and not is_whiteout(st)

    # -- changes (copy-up first) ---------------------------------------------------------------
    def _upper(self, rel: str, *, data: bool = False) -> Entry:
        """The upper entry of ``rel``, after the copy-up ``copy_up_for_setattr`` decides
        (metadata only where allowed)."""
        return self._after(rel, self.copy_up_for_setattr(rel, data=data), data)

    def _after(self, rel: str, copy: "Callable[[], Entry] | None", data: bool = False) -> Entry:
        """The upper entry of ``rel`` once ``copy`` (the change's decision) ran. None: in the
        upper already (a copy-up it needs all the same, the decision being wrong, runs
        here: or ``CopyUpFirst`` under the namespace lock, and the request runs it)."""
        self.fs.require_writable()
        if copy is not None:
            return copy()
        copyup = self.fs.copyup
        return copyup.ensure_data(rel) if data else copyup.ensure_upper(rel, metadata_only=True)

    def chmod(self, rel: str, mode: int) -> None:
        entry = self._upper(rel)
        self.fs.ownership.chmod(entry, mode)
        self._privs_may_grow(entry)

    def _privs_may_grow(self, entry: Entry) -> None:
        """The upper object ``entry`` (just changed) may have privileges again."""
        inode = self.fs.live_inode_of(entry)
        if inode is not None:
            inode.privs_may_grow()

    def kill_privs(self, rel: str, writer: "killpriv.Writer", seen: Seen | None = None) -> bool:
        """``killpriv`` for a truncate or chown by path (a lower file copied up first:
        ``copy_up_for_setattr`` with ``kill``); ``seen``: ``rel`` as just looked up. True if
        something was stripped."""
        if seen is None:
            epoch = self.fs.lookup.epoch  # (read before the layers: ``copyup.Seen``)
            seen = Seen(self.fs.lookup.lookup(rel), epoch)
        node = seen.node
        if not node.exists or not stat.S_ISREG(node.st.st_mode):
            return False
        self.fs.require_writable()
        entry = node.upper
        if entry is not None and entry.xattrs is None and entry.parent is not None \
                and stat.S_ISREG(entry.st.st_mode):
            # (a copy its copy-up handed over: its names, as a lookup lists them)
            entry = Entry(entry.layer, entry.rel, entry.st, None, entry.parent,
                          entry.layer.xattr_names_at(entry.parent, entry.name))
        if entry is not None and entry.lacks(killpriv.CAPABILITY_XATTR) \
                and not self.fs.ownership.stored_entry(entry).mode & killpriv.PRIVILEGED_BITS:
            # untar's chown of every file: the lookup's stat and xattr names show
            # nothing a write would strip (what ``kill_fd`` would find, without opening)
            return False
        if entry is None:  # a lower file: copied up (metadata only) before it is looked at
            copy = self.copy_up_for_setattr(rel, changes=False, kill=True, seen=seen)
            # (the node is not held while the copy-up may wait for fds: the box ``copy``
            # holds it in lets go of it first; kept here, the thread whose turn it was
            # could lack its fd and answer EMFILE after the whole wait: limits23)
            del seen, node
            entry = self._after(rel, copy)
        fd = entry.layer.open(entry.rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            changed = killpriv.kill_fd(self.fs.ownership, entry.layer, fd, writer).changed
        finally:
            os.close(fd)
        if changed:
            self.fs.stats.add("privileges_cleared")
        return changed

    def kill_sgid(self, rel: str) -> None:
        """An access ACL set by a caller outside the file's group without CAP_FSETID
        (FUSE_SETXATTR_ACL_KILL_SGID): S_ISGID goes, as ``posix_acl_update_mode``
        does; the root daemon's own setxattr kept it."""
        node = self.fs.lookup.lookup(rel)
        if not node.exists or node.upper is None:
            return
        entry = node.upper
        mode = self.fs.ownership.stored_entry(entry).mode
        if mode & stat.S_ISGID:
            self.fs.ownership.chmod(entry, stat.S_IMODE(mode) & ~stat.S_ISGID)

    def setattr(self, rel: str, *, mode: int | None = None, ids: tuple[int, int] | None = None,
                times: tuple[int, int] | None = None,
                writer: "killpriv.Writer | None" = None,
                check: "Callable[[int], None] | None" = None) -> tuple[Attr | None, bool]:
        """A SETATTR by path without a size: strip privileges as ``writer``'s chown or
        write would (``writer`` given), then chmod, chown (shown-side ``ids``, -1:
        unchanged), utimens (``times``: ``utimens``'s), each as its own method does, from
        one lookup. Returns the attributes after the change and whether anything was
        stripped. The attributes are the looked-up node's with its top entry's stat read
        again (the changes alter no structure, xattr names aside, which only ever
        shrink: security.capability); None when that cannot be had (the object was
        copied up or replaced meanwhile: the caller looks it up afresh). A copy of ``rel``
        its copy-up handed over to this lock hold (``CopyUp.handing_over``: the request's
        retry after a refused copy-up) is that lookup. A chmod alone of a lower regular
        file (``one_pass``) has its copy-up make it: refused, its ``CopyUpFirst`` carries the
        mode in its ``copy`` and this change's answer from the copy (``answer``), which the
        request gives once that copy is handed over made so (``Seen.mode``): no second try."""
        fs = self.fs
        handed = fs.copyup.handed(rel) if fs.copyup is not None else None
        if handed is not None:
            node, epoch = handed.node, handed.epoch
        else:
            epoch = fs.lookup.epoch  # (read before the layers: ``copyup.Seen``)
            node = fs.lookup.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file or directory", rel)
        changes = mode is not None or ids is not None or times is not None
        if writer is None and not changes:
            return self._refreshed(node, rel), False
        fs.require_writable()
        if writer is not None and ids is not None:
            fs.ownership.chown_ids(*ids)  # EOVERFLOW before anything is copied up or stripped
        entry = node.upper
        one = None  # (a chmod alone of a lower file: the copy-up's, ``one_pass``)
        if entry is None and mode is not None and ids is None and times is None \
                and writer is None and handed is None and self.one_pass(node):
            one = mode
        copy = self.copy_up_for_setattr(rel, changes=changes, kill=writer is not None, ids=ids,
                                        seen=handed or Seen(node, epoch), check=check, mode=one)
        if copy is not None:  # (under the namespace lock: ``CopyUpFirst``, nothing done)
            node = None  # copied up: its structure changed (and not held while it may wait)
            try:
                entry = copy()
            except CopyUpFirst as first:
                if one is not None:
                    first.answer = lambda seen: self.made(seen, rel)
                raise
        killed = False
        if writer is not None:
            killed = self.kill_privs(rel, writer, None if node is None else Seen(node, epoch))
        if not changes:
            return (None if node is None else self._refreshed(node, rel)), killed
        if entry is None:  # (the decision and the lookup disagree: ``_upper`` copies it up)
            entry = self._upper(rel)
            node = None
        if mode is not None:
            fs.ownership.chmod(entry, mode)
            self._privs_may_grow(entry)
        if ids is not None:
            uid, gid = fs.ownership.chown_ids(*ids)
            fs.ownership.chown(entry, uid, gid)
        if times is not None:
            entry.layer.do_utime(entry.rel, resolve_times(times, entry.st))
        return (None if node is None else self._refreshed(node, rel)), killed

    def made(self, seen: Seen, rel: str) -> tuple[Attr, bool]:
        """``setattr``'s answer for a chmod its copy-up made (``one_pass``): the attributes
        of the copy handed over (``seen``), as its install read them after the rename, and
        nothing stripped. No ``_privs_may_grow``: the install's ``rebind`` of the inode
        voided its mark after the mode was in place."""
        return self.of_node(seen.node, rel), False

    def refreshed(self, seen: Seen, rel: str) -> Attr | None:
        """The attributes of ``seen``'s node after a change in this lock hold (``setattr``'s
        reply), while no change of the namespace ran since it was looked up; else None."""
        if seen.epoch != self.fs.lookup.epoch:
            return None
        return self._refreshed(seen.node, rel)

    def _refreshed(self, node: Node, rel: str) -> Attr | None:
        """``node``'s attributes with its top entry's stat read again (through the fd the
        lookup holds of it, or of its parent); None unless that finds the same object."""
        top = node.top
        if top.dirfd is not None:
            st = os.stat(top.dirfd.fd)
        elif top.parent is not None:
            st = top.layer.stat_at(top.parent, top.name)
        else:
            return None
        if st is None or st.st_ino != top.st.st_ino \
                or stat.S_IFMT(st.st_mode) != stat.S_IFMT(top.st.st_mode):
            return None
        if top.layer.writable and st.st_ctime_ns != top.st.st_ctime_ns:
            # the same object (same name, inode, in the hold that changed it), changed in
            # mode, owner, times or privileges only: its origin, so the number it shows, is
            # what it was (no origin is changed through the mount)
            self.fs.inos.carry(top.st, st)
        fresh = Entry(top.layer, top.rel, st, top.dirfd, top.parent, top.xattrs)
        return self.of_node(Node(node.rel, (fresh,) + node.entries[1:], node.opaque,
                                 node.upper_whiteout, node.data, node.upper_marker), rel)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        """``uid``/``gid`` as the kernel gives them (shown side, -1: unchanged)."""
        uid, gid = self.fs.ownership.chown_ids(uid, gid)  # EOVERFLOW before any copy-up
        entry = self._upper(rel)
        self.fs.ownership.chown(entry, uid, gid)

    def utimens(self, rel: str, times: tuple[int, int] | None) -> None:
        entry = self._upper(rel)
        entry.layer.do_utime(entry.rel, resolve_times(times, entry.st))

    @staticmethod
    def utime_fd(fd: int, times: tuple[int, int] | None) -> None:
        os.utime(fd, ns=resolve_times(times, os.fstat(fd)))

    def truncate(self, rel: str, length: int, seen: Seen | None = None) -> None:
        """truncate by path. ``seen``: ``rel`` as looked up in this lock hold (``handed``),
        used when it is an upper file holding its data (else looked up)."""
        node = None if seen is None else seen.node
        if node is not None and node.upper is not None and node.data is None \
                and seen.epoch == self.fs.lookup.epoch:
            entry = node.upper
        else:
            entry, node = self._upper(rel, data=True), None
        with self.fs.drop_extents(rel, node):
            entry.layer.do_truncate(entry.rel, length)
        self.fs.data_changed_by_path(rel, node)

    # -- xattrs ------------------------------------------------------------------------------------
    def _xattrs_allowed(self) -> None:
        if self.fs.config.noxattrs:
            raise OSError(errno.ENOTSUP, "extended attributes are off (noxattrs=1)")

    def getxattr(self, rel: str, name: str) -> bytes:
        if name == STATS_XATTR and not rel:
            return self.fs.stats_json()
        self._xattrs_allowed()
        node = self.fs.lookup.lookup(rel)
        top = node.top
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute", name)
        if top.lacks(name) and name.startswith(_LISTED):
            # the lookup listed the file's xattrs (names in these namespaces are listed
            # whenever they can be read)
            raise OSError(errno.ENODATA, "no such attribute", name)
        try:
            if top.dirfd is not None:  # one call through the fd the lookup holds
                return os.getxattr(f"/proc/self/fd/{top.dirfd.fd}", name)
            if top.parent is not None:  # (``entry_xattr_path``: never through a mount)
                path, follow, fd = top.layer.entry_xattr_path(top.parent.fd, top.name)
                try:
                    return os.getxattr(path, name, follow_symlinks=follow)
                finally:
                    if fd is not None:
                        os.close(fd)
            return top.layer.getxattr_strict(top.rel, name)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP and name in acl.NAMES:
                raise OSError(errno.ENODATA, "no POSIX ACL on this layer", name) from None
            raise

    def listxattr(self, rel: str) -> list[str]:
        self._xattrs_allowed()
        top = self.fs.lookup.lookup(rel).top
        return [n for n in top.layer.listxattr(top.rel) if not is_private_xattr(n)]

    def setxattr(self, rel: str, name: str, value: bytes, flags: int,
                 check: "Callable[[int], None] | None" = None) -> None:
        """``check``: as ``copy_up_for_setattr``'s."""
        self._xattrs_allowed()
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "overlay-private attribute", name)
        # (None on a read-only mount: EROFS below)
        copy = self.copy_up_for_xattr(rel, name, check=check)
        entry = self._after(rel, copy)
        entry.layer.do_setxattr(entry.rel, name, value, flags)
        self._privs_may_grow(entry)

    def removexattr(self, rel: str, name: str,
                    check: "Callable[[int], None] | None" = None) -> None:
        self._xattrs_allowed()
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "overlay-private attribute", name)
        copy = self.copy_up_for_xattr(rel, name, removed=True, check=check)  # (ENODATA before it)
        if copy is None:
            top = self.fs.lookup.lookup(rel).top
            top.layer.getxattr_strict(top.rel, name)  # ENODATA
        entry = self._after(rel, copy)
        entry.layer.do_removexattr(entry.rel, name)

    # -- filesystem ------------------------------------------------------------------------------
    def statfs(self) -> dict:
        layer = self.fs.stack.upper or self.fs.stack.lowers[0]
        sv = layer.statvfs()
        return {
            "f_bsize": sv.f_bsize, "f_frsize": sv.f_frsize, "f_blocks": sv.f_blocks,
            "f_bfree": sv.f_bfree, "f_bavail": sv.f_bavail, "f_files": sv.f_files,
            "f_ffree": sv.f_ffree, "f_favail": sv.f_favail, "f_namemax": 255,
        }

    def access(self, rel: str, mode: int) -> None:
        node = self.fs.lookup.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file or directory", rel)
        if mode & os.W_OK and not self.fs.writable:
            raise OSError(errno.EROFS, "read-only overlay")
