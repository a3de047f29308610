"""Namespace changes: create, mknod, mkdir, symlink, link, unlink, rmdir, rename.

Owns: the on-disk result of each change, in the kernel's format (``dir.c``):
  * a name that still exists in a lower layer is deleted with a whiteout (a 0/0
    character device), put in place atomically (rename over the upper object, or
    ``RENAME_WHITEOUT``); where such devices cannot be made (``whiteout.Format``), a
    ``.wh.NAME`` file made *before* the upper object goes, which it then hides
    (fuse-overlayfs's format); such a marker is removed once NAME exists again;
  * a new object over a whiteout is made in ``workdir/work`` and renamed over it; a
    directory made there is opaque, so an emptied merged dir recreated stays empty; so is
    one whose owner or special bits differ from what the daemon's own creation gives
    (another user's), so that a kill -9 never leaves it the daemon's;
  * a directory made in a merged parent is opaque too where the options forbid offline
    changes of the lower layers (``config.allows_offline_changes``), as the kernel's
    ``ovl_create_upper`` makes it ("just an optimization": best effort, a failure to mark
    it is ignored); so is an upper-only directory moved into a merged parent, whatever the
    options (``ovl_rename``; EXDEV where the mark cannot be written);
  * rename of a directory that exists in a lower layer gives EXDEV (the kernel's
    default without ``redirect_dir``; ``mv`` then copies), and so does a move or link
    whose redirect cannot be written (``ovl_set_redirect``); ``RENAME_EXCHANGE`` is
    refused with EINVAL (never run as a plain rename), ``RENAME_NOREPLACE`` is honoured.
New objects belong to the caller (FUSE request context), with setgid-directory
inheritance, and get the mode and POSIX ACLs Linux gives them (``acl.inherit``): the
kernel leaves the umask to us (``FUSE_CAP_DONT_MASK``), and it applies only where the
parent has no default ACL. The upper filesystem does the inheritance itself for objects
made in place; objects built in ``workdir/work`` get their ACLs set by hand.

Locking: copy-ups run first, without the namespace lock (they take it only for their
final rename); the change itself then runs under the namespace lock and re-looks-up
what it acts on. That lookup under the lock is the one that decides; the checks before
the copy-up only keep a doomed change (EEXIST, ENOENT...) from copying up the parent, so
they are skipped when the parent has its upper copy already (one lookup fewer per
request). The objects a change acts on, as looked up under the lock, are returned to the
adapter (a removed node's link count, a created file's node built from its own fd), so
it need not look them up again.
"""
from __future__ import annotations

import errno
import functools
import itertools
import os
import stat
from collections.abc import Callable

from . import acl, faults, impure, logs, protattr, sysapi, whiteout
from .config import allows_offline_changes
from .copyup import WORK_DIR
from .inodes import OPEN_FLAGS
from .layer import Layer, do_link, do_rename, join, split
from .lookup import Entry, Node, check_name, redirect_target
from .ownership import Caller
from .readdir import merged_listing
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeVar

    from .core import OverlayFS

    T = TypeVar("T")


log = logs.get("overlaypc.namespace")


@functools.lru_cache(maxsize=1)
def redirect_max() -> int:
    """The longest redirect the kernel's overlay writes and reads (its ``redirect_max``
    module parameter, 256 by default): longer ones would make the upper unreadable there."""
    try:
        with open("/sys/module/overlay/parameters/redirect_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 256


def _cleanup(call, *args: object, what: str) -> None:
    """Run ``call(*args)``, cleanup after a change that is done and visible: a failure is
    logged ("cannot WHAT"), never answered (the kernel's ``ovl_cleanup`` only warns too;
    what is left in ``workdir/work`` goes at the next mount, ``clean_workdir``)."""
    try:
        call(*args)
    except OSError as e:
        log.warning("cannot %s: %s", what, e)


class _Changing:
    """``Namespace._changing``'s context manager."""
    __slots__ = ("fs",)

    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs

    def __enter__(self) -> None:
        fs = self.fs
        fs.ns_lock.acquire()
        try:
            fs.paths.check()  # (before any change: PathsMoved leaves nothing done)
        except BaseException:
            fs.ns_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.fs.lookup.changed()
        finally:
            self.fs.ns_lock.release()


class Namespace:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs
        self._names = itertools.count()
        #: the daemon's own (effective) user and group, what a new object is made with:
        #: read once (two system calls per creation otherwise; nothing in the daemon
        #: changes its IDs, and a fork keeps them)
        self._own_ids = (os.geteuid(), os.getegid())
        #: a directory made in a merged parent is made opaque (the kernel's, where the
        #: lower layers may not change offline: ``ovl_create_upper``)
        self._opaque_made_dirs = not allows_offline_changes(fs.config)

    # -- helpers ------------------------------------------------------------------------------
    def _tmp(self) -> str:
        return join(WORK_DIR, f"#ovlpc-new-{os.getpid()}-{next(self._names)}")

    def _check_new_name(self, rel: str) -> None:
        check_name(rel)
        if whiteout.is_oci_name(split(rel)[1]):
            raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts", rel)

    def _owner(self, rel: str, caller: Caller, mode: int) -> tuple[int, int, int, bytes | None]:
        """(uid, gid, mode, default ACL) for a new object in the parent of ``rel``, as
        stored: the caller's IDs mapped back (``ownership``), the group of a setgid parent,
        the parent's default ACL (the upper parent's, read through the fd the lookup holds)."""
        return self._owner_in(split(rel)[0], caller, mode)

    def _owner_in(self, parent_rel: str, caller: Caller, mode: int,
                  dnode: Node | None = None) -> tuple[int, int, int, bytes | None]:
        """``_owner`` of a new object in the directory ``parent_rel`` (``dnode``: its node,
        if looked up in this lock hold already)."""
        top = (self.fs.lookup.directory(parent_rel) if dnode is None else dnode).top
        upper = self.fs.stack.upper
        assert upper is not None
        if top.layer is upper and top.dirfd is not None:
            default = upper.getxattr_at(top.dirfd, acl.DEFAULT)
        else:
            default = upper.getxattr(parent_rel, acl.DEFAULT)
        # fresh: the cached lookup keeps a directory's structure, not its attributes,
        # which a chmod or chown of the parent may just have changed
        parent = os.fstat(top.dirfd.fd) if top.dirfd is not None else top.st
        owner = self.fs.ownership
        stored = owner.stored_entry(Entry(top.layer, top.rel, parent, top.dirfd))
        uid, gid = owner.new_owner(caller.uid, caller.gid)
        if stored.mode & stat.S_ISGID:
            gid = stored.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return uid, gid, mode, default

    def lower_exists(self, rel: str) -> bool:
        """Whether a lower layer shows something at ``rel`` (below whatever upper has)."""
        return self.fs.lookup.lower_exists(rel)

    def _parent_in_upper(self, rel: str, check: "Callable[[int, str], None] | None" = None) -> bool:
        """Whether the parent of ``rel`` has its upper copy (from the lookup's cache of
        directories; ENOENT/ENOTDIR when it is not a directory): then a change in it copies
        nothing up, and the lookup under the namespace lock is the only check needed.
        ``check(the parent's immutable/append-only flags, its path)`` first (``protattr``:
        EPERM before anything is copied up, as the kernel overlay's VFS refuses)."""
        parent = split(rel)[0]
        if check is None and not parent:
            return True
        dnode = self.fs.lookup.directory(parent)
        if check is not None:
            flags = self.fs.protection.of_node(dnode)
            if flags:
                check(flags, parent)
        return not parent or dnode.upper is not None

    def _check_protected(self, node: Node) -> None:
        """EPERM for a change of ``node`` itself (its removal, a rename or hard link of it)
        when it is immutable or append-only."""
        flags = self.fs.protection.of_node(node)
        if flags:
            protattr.check_changed(flags, node.rel)

    def _prepare_new(self, rel: str, *, check: bool = False) -> None:
        """Checks for a new name; copies up the parent (an existing name fails first).
        ``check``: look the name up even when the parent has its upper copy, for a change
        that copies something else up before it takes the lock (link: its source)."""
        self.fs.require_writable()
        self._check_new_name(rel)
        if self._parent_in_upper(rel, protattr.check_dir_add) and not check:
            return  # _place_new's lookup under the lock decides
        node = self.fs.lookup.lookup(rel)
        if node.exists:
            raise OSError(errno.EEXIST, "file exists", rel)
        self.fs.copyup.ensure_parent(rel)

    def _place_new(self, rel: str, make, caller: Caller | None, mode: int,
                   then: "Callable[[os.stat_result | None], T]", *, is_dir: bool = False) -> "T":
        """Run ``make(layer, where, mode)`` to create the object at ``rel``, owned by
        ``caller`` (None: keep the owner and mode, for hard links); then ``then(its stat
        when the last step read it after every change — made in place, owner and mode
        right as made — else None)``, what the request answers (``_named``).

        The name's lookup is the kernel's LOOKUP's when it found the name absent and no
        change ran since (``Lookup.absent``); the object is then made in the upper by a call
        that fails EEXIST if the name is taken there (made behind the mount's back
        meanwhile), and that failure is decided again on a fresh lookup."""
        upper, work = self.fs.stack.upper, self.fs.stack.work
        assert upper is not None and work is not None
        new = owner = None
        opaque = False
        if caller is not None:
            parent_rel = split(rel)[0]
            dnode = self.fs.lookup.directory(parent_rel)
            uid, gid, mode, default = self._owner_in(parent_rel, caller, mode, dnode)
            new = acl.inherit(default, mode, caller.umask)
            owner = (uid, gid, new.mode)
            mode = new.mode
            # (``dnode.merged_dir``: the kernel's ``ovl_type_merge`` of the parent, which
            # has its upper part here: ``_prepare_new``)
            opaque = is_dir and self._opaque_made_dirs and dnode.merged_dir
        node = self.fs.lookup.absent(rel)
        if node is not None:
            try:
                return self._place(rel, make, mode, then, is_dir, new, owner, node, opaque)
            except FileExistsError:
                pass  # taken behind the mount's back: as a fresh lookup decides
        node = self.fs.lookup.lookup(rel)
        if node.exists:
            raise OSError(errno.EEXIST, "file exists", rel)
        return self._place(rel, make, mode, then, is_dir, new, owner, node, opaque)

    def _place(self, rel: str, make, mode: int, then: "Callable[[os.stat_result | None], T]",
               is_dir: bool, new: "acl.NewObject | None", owner: tuple[int, int, int] | None,
               node: Node, opaque: bool = False) -> "T":
        """``_place_new`` once the name is known to be free (``node``: its lookup);
        ``opaque``: a directory made opaque (``_opaque_made_dirs``; over a whiteout one is
        made opaque anyway)."""
        upper, work = self.fs.stack.upper, self.fs.stack.work
        over_whiteout = node.upper_whiteout and not (node.upper_marker and not is_dir)
        opaque = opaque and not over_whiteout
        if not over_whiteout and not self._owned_after(upper, owner):
            make(upper, rel, mode)  # in its real parent: the filesystem applies the default ACL
            made = None
            try:
                if opaque:  # (before the owner's steps: the stat they read follows it)
                    self._mark_made_opaque(upper, rel)
                if owner:
                    made = self._set_owner(upper, rel, *owner)
            except BaseException:
                self._unmake(upper, rel, is_dir)  # a failed operation leaves no trace
                raise
            if node.upper_marker:
                self._drop_marker(rel)
            return self._named(rel, made, node, then)
        tmp = self._tmp()
        try:
            make(work, tmp, mode)
            if new is not None:
                self._set_acls(work, tmp, new)
            if owner:
                self._set_owner(work, tmp, *owner)
            if not over_whiteout:  # the name is free in the upper
                if opaque:
                    self._mark_made_opaque(work, tmp)
                do_rename(work, tmp, upper, rel, sysapi.RENAME_NOREPLACE)
                if node.upper_marker:
                    self._drop_marker(rel)
            elif is_dir:
                whiteout.set_opaque(work, tmp, self.fs.prefix)
                if node.upper_marker:  # the name is free: the opaque dir hides the lowers
                    do_rename(work, tmp, upper, rel, sysapi.RENAME_NOREPLACE)
                    self._drop_marker(rel)
                else:
                    do_rename(work, tmp, upper, rel, sysapi.RENAME_EXCHANGE)  # whiteout lands at tmp
            else:
                do_rename(work, tmp, upper, rel)
        finally:
            self._discard(tmp)  # the displaced whiteout, or a failed attempt
        return self._named(rel, None, node, then)

    def _merged(self, dir_rel: str) -> bool:
        """Whether the directory ``dir_rel`` (with its upper part: after ``ensure_parent``)
        is merged, an upper part over a lower one (the kernel's ``ovl_type_merge``)."""
        return self.fs.lookup.directory(dir_rel).merged_dir

    def _mark_made_opaque(self, layer: Layer, rel: str) -> None:
        """Mark the directory just made at ``rel`` opaque (``_opaque_made_dirs``). Best
        effort, as the kernel's: the mark only spares lookups below (nothing below the new
        name exists), so a failure is logged and the creation goes on."""
        try:
            layer.do_setxattr_entry(rel, self.fs.prefix + "opaque", b"y")
        except OSError as e:
            log.debug("not marking %s/%s opaque: %s", layer.path, rel, e.strerror)

    def _named(self, rel: str, made: os.stat_result | None, before: Node,
               then: "Callable[[os.stat_result | None], T]") -> "T":
        """``then(made)`` once the new object has its name ``rel`` (``before``: the lookup
        of ``rel`` before it was made), in the creation's lock hold: what the request
        answers (the object's node, the adapter's entry). If it fails, the object goes
        again (``_unmake_new``) and the error is answered: a creation answers an error only
        when nothing was made (a client that is told nothing was made retries, and got
        EEXIST; the kernel's overlay removes an object it cannot set up, too)."""
        try:
            return then(made)
        except BaseException:
            self._unmake_new(rel, made, hides=before.upper_whiteout)
            raise

    def _unmake_new(self, rel: str, made: os.stat_result | None, *, hides: bool) -> None:
        """Remove the object a creation just named ``rel`` after a failure that followed,
        in the same namespace lock hold, only if ``rel`` still names it (``made``: its
        stat, when read; else the lock hold is the check: every change through the mount
        takes it). ``hides``: the name hid a lower object (a whiteout was there), so a
        whiteout takes it back (``_remove``). A failure here is logged; the creation's own
        error is raised."""
        upper = self.fs.stack.upper
        assert upper is not None
        try:
            st = self._lstat(upper, rel)
            if st is None or made is not None and (st.st_dev, st.st_ino) != (made.st_dev, made.st_ino):
                log.error("not removing %s/%s after a failed creation: it is not the object "
                          "made", upper.path, rel)
                return
            node = Node(rel, (Entry(upper, rel, st),))
            try:
                self._remove(node, hides or self.lower_exists(rel))
            finally:
                if node.is_dir:
                    self._done(rel)
        except OSError as e:
            log.error("cannot remove %s/%s after a failed creation: %s", upper.path, rel, e)

    def _owned_after(self, upper, owner: tuple[int, int, int] | None) -> bool:
        """Whether a new object's owner, special mode bits or override xattr would be set
        after it is made (a caller other than the daemon's user, a setgid parent, setuid
        bits...). Such an object is built in ``workdir/work`` and renamed into place: made
        in place, a kill -9 before those steps would leave it the daemon's (hunt8c; the
        kernel makes it with the caller's fsuid at once)."""
        if owner is None:
            return False
        uid, gid, mode = owner
        return (uid, gid) != self._own_ids or bool(mode & 0o7000) \
            or self.fs.ownership.writes_override(upper, mode)

    def _unmake(self, layer, rel: str, is_dir: bool) -> None:
        """Remove the object a failed creation made at ``rel`` (under the namespace lock, so
        it is still ours); a failure here is logged, the operation's own error is raised."""
        try:
            if is_dir:
                layer.do_rmdir(rel)
            else:
                layer.do_unlink(rel)
        except OSError as e:
            log.error("cannot remove %s/%s after a failed creation: %s", layer.path, rel, e)

    def _drop_marker(self, rel: str) -> None:
        """Remove the ``.wh.`` marker of ``rel`` after a change put an object at ``rel`` in
        the upper: the marker is inert from then on, so this is cleanup (``_cleanup``)."""
        upper = self.fs.stack.upper
        assert upper is not None
        _cleanup(whiteout.clear_marker, upper, rel,
                 what=f"remove the whiteout marker of {upper.path}/{rel}")

    def _index_before_removal(self, rel: str) -> None:
        """index=on, before a name of a lower hard link goes (unlink, a rename over it):
        copy it up (link it up, if another name was), as the kernel's ``ovl_nlink_start``,
        so that the index entry exists to count the name that goes (``_count_link``).
        Without it the other names would go on showing the lower file's ``st_nlink``. And
        what goes is then an upper name, whose removal moves the index inode's links with
        the count: the kernel's relative count holds at once, so a kill -9 before
        ``_count_link`` leaves it right (a whiteout over a lower name moves no link)."""
        index = self.fs.index
        if index is None:
            return
        node = self.fs.lookup.lookup(rel)
        if node.exists and node.upper is None and (node.index is not None or index.eligible(node.top)):
            # (metadata only under metacopy=on, as the kernel's: the name goes anyway)
            self.fs.copyup.ensure_upper(rel, metadata_only=True)

    def _count_link(self, shared: Entry, delta: int, links: int | None = None) -> None:
        """index=on: record on the index entry ``shared`` that a name came or went, after
        the change is done. A failure is logged, never raised: the name did change, and the
        kernel's own count is relative to the index inode's links, which the change itself
        kept right for an upper name; only ours (and the kernel's, for a lower name) is off
        by one until the next change."""
        _cleanup(self.fs.adjust_nlink, shared, delta, links, what=f"record the link count of {shared.rel}")

    def _drop_index_entry(self, shared: Entry, key: object) -> None:
        """index=on: the name that just went was the last of the indexed file ``shared``
        (its count 0, no upper name): its index entry goes too, as the kernel's
        ``ovl_cleanup_index``. Not while the file is open (``key``'s live inode: its
        handles may still reach the entry by path); the next mount's check removes it
        then (``indexclean``). Cleanup: logged, never raised."""
        if self.fs.inodes.get(key) is None:
            _cleanup(self.fs.index.drop_orphan, shared.rel,
                     what=f"remove the index entry {shared.rel} of a file with no name left")

    @staticmethod
    def _set_acls(layer, rel: str, new: acl.NewObject) -> None:
        """The inherited ACLs of an object built outside its parent (in workdir/work, whose
        own ACLs were removed at mount). Setting the access ACL also sets the permission
        bits from it, to the ones ``new.mode`` already has."""
        for name, value in ((acl.ACCESS, new.access), (acl.DEFAULT, new.default)):
            if value is not None:
                layer.do_setxattr(rel, name, value)

    def _set_owner(self, layer, rel: str, uid: int, gid: int, mode: int) -> os.stat_result | None:
        """Owner and special mode bits of the object just made at ``rel``; its stat when
        nothing needed changing (the stat read to decide is then current), else None."""
        if self.fs.ownership.writes_override(layer, mode):
            self.fs.ownership.set_override(layer, rel, uid, gid, mode)  # xattr_permissions
            return None
        st = self._lstat(layer, rel)
        if st is None:
            return None
        current: os.stat_result | None = st
        if (st.st_uid, st.st_gid) != (uid, gid):
            layer.do_chown(rel, uid, gid, by_name=True)  # (made just now: ``Layer.do_chown``)
            current = None
            if mode & 0o7000:
                st = layer.lstat(rel) or st  # chown cleared setuid/setgid
        # mkdir ignores S_ISGID and chown clears it: put the special bits back, and only
        # them. The permission bits are right already, and may hold an ACL mask, which a
        # chmod to other bits would rewrite.
        if not stat.S_ISLNK(mode) and st.st_mode & 0o7000 != mode & 0o7000:
            layer.do_chmod(rel, stat.S_IMODE(st.st_mode) & 0o777 | mode & 0o7000,
                           by_name=True)
            current = None
        return current

    def _own_fd(self, layer, fd: int, rel: str, uid: int, gid: int,
                mode: int) -> os.stat_result | None:
        """``_set_owner`` of the unnamed file open as ``fd`` (``tmpfile``; ``rel``: where it
        was made, for the debug log), through its fd; its stat when nothing needed changing."""
        own = self.fs.ownership
        if own.writes_override(layer, mode):
            own.set_override_fd(layer, fd, uid, gid, mode)  # xattr_permissions
            return None
        st = os.fstat(fd)
        current: os.stat_result | None = st
        if (st.st_uid, st.st_gid) != (uid, gid):
            layer.do_fchown(fd, rel, uid, gid)
            current = None
            if mode & 0o7000:
                st = os.fstat(fd)  # chown cleared setuid/setgid
        if st.st_mode & 0o7000 != mode & 0o7000:  # (as ``_set_owner``: the special bits only)
            layer.do_fchmod(fd, rel, stat.S_IMODE(st.st_mode) & 0o777 | mode & 0o7000)
            current = None
        return current

    @staticmethod
    def _lstat(layer, rel: str):
        """``lstat`` of an object this change just made: one ``fstatat`` through the fd
        the lookup holds of its parent in ``layer``, else a walk from the layer's root."""
        head, name = split(rel)
        parent = layer.held_dir(head) if name else None
        return layer.lstat(rel) if parent is None else layer.stat_at(parent, name)

    def _changing(self) -> "_Changing":
        """The namespace lock, held for a change; at its end (even a failed one: a step may
        be done) ``Lookup.changed``, so no file found before the change is opened as kept.
        (A plain object, not a generator's context manager: one per UNLINK of an ``rm -rf``.)"""
        if faults.armed:
            faults.hit("namespace.changing")  # test-only (faults.py)
        return _Changing(self.fs)

    def _done(self, *dirs: str) -> None:
        """After a change: forget the cached structure of the directories it touched (and
        their subtrees). Creating or removing a non-directory changes no cached directory."""
        for rel in dirs:
            self.fs.lookup.invalidate(rel)

    def _made_node(self, rel: str, st: os.stat_result | None) -> Node:
        """The merged node of the non-directory or directory just made at ``rel``, for the
        reply (its attributes and identity), as a lookup under the same lock hold would
        find it: the upper object alone (a new object hides whatever is below: made over a
        whiteout, a directory is opaque), with ``st`` (read after every change made to it)
        or one ``fstatat`` now. It has no copy-up origin (``InodeNumbers.made``)."""
        upper = self.fs.stack.upper
        assert upper is not None
        if st is None:
            st = self._lstat(upper, rel)
            if st is None:
                raise OSError(errno.ENOENT, "vanished while it was made", rel)
        self.fs.inos.made(st)
        return Node(rel, (Entry(upper, rel, st, None, upper.held_dir(split(rel)[0])),))

    def _created(self, rel: str, fd: int, st: os.stat_result | None = None) -> Node:
        """The merged node of the regular file just made at ``rel``, as a lookup under the
        same namespace lock hold would find it: the upper file alone (a new non-directory
        hides whatever is below; it has no metacopy mark nor index entry), with the stat
        and xattr names of the file itself, read through ``fd`` after every change made
        to it (owner, ACLs, override xattrs); ``st``: its stat read after them already."""
        upper = self.fs.stack.upper
        assert upper is not None
        if st is None:
            st = os.fstat(fd)
        try:
            names: frozenset[str] | None = frozenset(os.listxattr(fd))
        except OSError as e:
            names = frozenset() if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) else None
        return Node(rel, (Entry(upper, rel, st, None, upper.held_dir(split(rel)[0]), names),))

    # -- creation -----------------------------------------------------------------------------
    # Each creation answers ``then(its node)``, run in the lock hold that made the object,
    # after every change; if ``then`` fails, the object goes again (``_named``).
    def create(self, rel: str, flags: int, mode: int, caller: Caller,
               then: "Callable[[int, Node], T]") -> "T":
        """Create a regular file; answer ``then(an fd on it opened with flags, its node)``.
        ``then`` owns the fd: it closes it if it fails."""
        self._prepare_new(rel)
        fds: list[int] = []
        access = flags & OPEN_FLAGS & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)  # (no O_APPEND)

        def make(layer, where: str, mode: int) -> None:
            fds.append(layer.do_create(where, access | os.O_EXCL, stat.S_IMODE(mode)))

        def made(st: os.stat_result | None) -> "T":
            fd = fds.pop()  # (``then``'s from here on)
            try:
                node = self._created(rel, fd, st)
            except BaseException:
                os.close(fd)
                raise
            return then(fd, node)

        with self._changing():
            try:
                return self._place_new(rel, make, caller, stat.S_IFREG | stat.S_IMODE(mode), made)
            finally:
                for fd in fds:  # a failed creation's (the object is gone again)
                    os.close(fd)

    def tmpfile(self, rel: str, flags: int, mode: int, caller: Caller,
                then: "Callable[[int, Node], T]") -> "T":
        """An unnamed regular file in the directory ``rel`` (``O_TMPFILE``); answer
        ``then(an fd on it opened with flags, its node)``, which owns the fd. Made in the
        upper directory itself (copied up first, as for any creation: the kernel
        overlay's ``ovl_tmpfile``), so the upper filesystem applies the parent's default
        ACL; owner and special bits go on through the fd before ``then``: the file has no
        name anyone could find it by meanwhile, and a kill -9 leaves nothing (no
        ``workdir/work`` detour, as other users' objects take). ``O_EXCL`` reaches the
        upper filesystem: such a file can never be linked. The node's path is where a
        name would be (``#`` and its inode number, the kernel's ``d_path`` of it): no
        lookup of the merged view gives it."""
        fs = self.fs
        fs.require_writable()
        check_name(rel, last_only=True)
        dnode = fs.lookup.directory(rel)  # (ENOENT/ENOTDIR for no directory)
        protattr.check_dir_add(fs.protection.of_node(dnode), rel)
        if dnode.upper is None:
            del dnode
            fs.copyup.ensure_upper(rel)
        else:
            del dnode
        upper = fs.stack.upper
        assert upper is not None
        access = flags & OPEN_FLAGS & ~(os.O_CREAT | os.O_TRUNC | os.O_TMPFILE | os.O_NOCTTY
                                        | os.O_NOFOLLOW | os.O_PATH)
        with self._changing():
            if fs.lookup.directory(rel).upper is None:
                raise OSError(errno.ENOENT, "directory changed during O_TMPFILE", rel)
            uid, gid, mode, default = self._owner_in(rel, caller, stat.S_IFREG | stat.S_IMODE(mode))
            new = acl.inherit(default, mode, caller.umask)
            fd = upper.do_tmpfile(rel, access, stat.S_IMODE(new.mode))
            try:
                st = self._own_fd(upper, fd, rel, uid, gid, new.mode)
                if st is None:
                    st = os.fstat(fd)
                fs.inos.made(st)  # (no origin: nothing read by a path it has not)
                node = self._created(join(rel, f"#{st.st_ino}"), fd, st)
            except BaseException:
                os.close(fd)  # (the file goes with it)
                raise
            return then(fd, node)

    def link_open(self, fd: int, dst_rel: str,
                  then: "Callable[[Node], T] | None" = None) -> "T | None":
        """A name for the open upper file ``fd`` that has none the mount knows
        (``tmpfile``'s, or one whose names went): ``linkat`` of the fd
        (``Layer.do_link_fd``), in any directory of the mount (copied up first) and over a
        whiteout, as any new name; ``then(the node of the new name)``. ENOENT (the upper
        filesystem's) for a file that cannot be linked: made with ``O_EXCL``, or its last
        name gone. index=on: an index entry, or an upper link of one, moves the shared
        count as ``link`` does; one whose count is 0 (every name gone) answers ENOENT, as
        the kernel's link of a file with no link left (the index keeps its entry
        linked). EPERM for an immutable or append-only one (its ``protattr``), as ``link``."""
        self.fs.require_writable()
        upper = self.fs.stack.upper
        assert upper is not None
        # its own flags (a chattr through the fd of a file with no name sets them:
        # ``protattr`` on the file), before the new name's parent is copied up: the kernel's
        # ``vfs_link`` refuses (EPERM) before its overlay copies anything; ``link`` checks
        # its source's first too
        protattr.check_changed(self.fs.protection.of_upper_fd(upper, fd), dst_rel)
        self._prepare_new(dst_rel)
        with self._changing():
            st = os.fstat(fd)
            # index=on: the entry is read before the link, so that a failed read leaves
            # nothing linked
            shared = None
            if self.fs.index is not None:
                shared = self.fs.index.of_upper(Entry(upper, dst_rel, st), fd)
                if shared is not None and self.fs.index.nlink(shared) <= 0:
                    raise OSError(errno.ENOENT, "no link left", dst_rel)
            if upper.getxattr_fd(fd, self.fs.prefix + impure.ORIGIN) is not None:
                impure.mark(upper, split(dst_rel)[0], self.fs.prefix)  # (as ``link``)

            return self._place_new(dst_rel, lambda layer, where, mode: layer.do_link_fd(fd, where),
                                   None, st.st_mode, self._then_linked(dst_rel, shared, then))

    def _then_linked(self, dst_rel: str, shared: Entry | None,
                     then: "Callable[[Node], T] | None"):
        """The ``then`` of a new link's ``_place_new``: index=on's shared count moved up (back
        down if ``then`` fails: the upper name goes again, the inode's links too), then
        ``then(the node of the new name)``."""
        def linked(st: os.stat_result | None):
            if shared is not None:
                self._count_link(shared, +1)
            try:
                return None if then is None else then(self._linked_node(dst_rel))
            except BaseException:
                if shared is not None:
                    self._count_link(shared, -1, -1)
                raise
        return linked

    def _linked_node(self, rel: str) -> Node:
        """The node of the name a link just made (looked up in the link's lock hold)."""
        node = self.fs.lookup.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "vanished while it was linked", rel)
        return node

    def _then_made(self, rel: str, then: "Callable[[Node], T] | None"):
        """``_place_new``'s ``then`` for mkdir, mknod and symlink."""
        if then is None:
            return lambda st: None
        return lambda st: then(self._made_node(rel, st))

    def mknod(self, rel: str, mode: int, device: int, caller: Caller,
              then: "Callable[[Node], T] | None" = None) -> "T | None":
        if stat.S_ISCHR(mode) and device == 0:  # a whiteout: the name would vanish
            raise OSError(errno.EPERM, "a 0/0 character device is a whiteout", rel)
        self._prepare_new(rel)
        if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
            mode = stat.S_IFREG | stat.S_IMODE(mode)
        with self._changing():
            return self._place_new(rel, lambda layer, where, mode: layer.do_mknod(where, mode, device),
                                   caller, mode, self._then_made(rel, then))

    def mkdir(self, rel: str, mode: int, caller: Caller,
              then: "Callable[[Node], T] | None" = None) -> "T | None":
        self._prepare_new(rel)
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        with self._changing():
            return self._place_new(rel, lambda layer, where, mode: layer.do_mkdir(where, stat.S_IMODE(mode)),
                                   caller, mode, self._then_made_dir(rel, then), is_dir=True)

    def _then_made_dir(self, rel: str, then: "Callable[[Node], T] | None"):
        """``_then_made`` of mkdir: the new directory cached as the first lookup below it
        would cache it (``Lookup.made_dir``), before ``then`` (if that fails, the
        directory's removal drops it again: ``_unmake_new``)."""
        def made(st: os.stat_result | None) -> "T | None":
            node = self._made_node(rel, st)
            self.fs.lookup.made_dir(rel, node.st)
            return None if then is None else then(node)
        return made

    def symlink(self, target: str, rel: str, caller: Caller,
                then: "Callable[[Node], T] | None" = None) -> "T | None":
        self._prepare_new(rel)
        with self._changing():
            return self._place_new(rel, lambda layer, where, mode: layer.do_symlink(target, where),
                                   caller, stat.S_IFLNK | 0o777, self._then_made(rel, then))

    def link(self, src_rel: str, dst_rel: str,
             then: "Callable[[Node], T] | None" = None) -> "T | None":
        """A hard link; ``then(the node of the new name)``, after index=on's count moved
        (the reply's link count reads it)."""
        self.fs.require_writable()
        src = self.fs.lookup.lookup(src_rel)
        if not src.exists:
            raise OSError(errno.ENOENT, "no such file", src_rel)
        if src.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory", src_rel)
        self._check_protected(src)  # (after the new name's parent: EPERM either way)
        # (looked up again under the lock: not held while the new name's lookup and the
        # copy-ups, which may wait for fds, run; its parent's fd may be what the thread whose
        # turn it is needs: limits23)
        del src
        self._prepare_new(dst_rel, check=True)  # a doomed link copies no source up
        # a regular file: metadata only under metacopy=on, as the kernel's ``ovl_link``; its
        # data stays below, found from every name by the absolute redirect set below
        self.fs.copyup.ensure_upper(src_rel, metadata_only=True)
        upper = self.fs.stack.upper
        assert upper is not None
        with self._changing():
            src = self.fs.lookup.lookup(src_rel)
            if src.upper is None:
                raise OSError(errno.ENOENT, "source changed during link", src_rel)
            if src.data is not None:
                self._set_link_redirect(src)
            # index=on: the entry is read before the link (the link changes no xattr of the
            # source), so that a failed read leaves nothing linked
            shared = self.fs.index_of(src)
            if impure.has_origin(upper, src_rel, self.fs.prefix):  # (the kernel's, ``impure``)
                impure.mark(upper, split(dst_rel)[0], self.fs.prefix)

            return self._place_new(dst_rel, lambda layer, where, mode: do_link(upper, src_rel, layer, where),
                                   None, src.st.st_mode, self._then_linked(dst_rel, shared, then))

    def _set_link_redirect(self, src: Node) -> None:
        """Before a link to the metacopy file ``src`` (data below): an absolute redirect to
        its data, as the kernel's ``ovl_set_link_redirect``, so that the new name, elsewhere,
        finds it too (one it has already stays). Not undone if the link then fails (nor is
        the kernel's): it names the same data from the old name. EXDEV past the kernel's
        ``redirect_max`` (``_redirect_value``), or where it cannot be written (``_set_mark``)."""
        upper = self.fs.stack.upper
        assert upper is not None and src.data is not None
        name = self.fs.prefix + "redirect"
        value = self._redirect_value(src, src.rel, src.data, absolute=True)
        if upper.getxattr(src.rel, name) != value:
            _set_mark(upper, src.rel, name, value, redirect=True)

    # -- removal ------------------------------------------------------------------------------
    @staticmethod
    def _check_unlink(node: Node) -> None:
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file", node.rel)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory", node.rel)

    def unlink(self, rel: str, then: Callable[[Node], None] | None = None) -> Node:
        """Remove the non-directory at ``rel``; return its node as it was just before.
        ``then(that node)``: after the removal, under the namespace lock hold that made it
        (the adapter's node table drops the name there, as ``rename``'s ``then``)."""
        self.fs.require_writable()
        if not self._parent_in_upper(rel, protattr.check_dir_remove):
            node = self.fs.lookup.lookup(rel)
            self._check_unlink(node)  # before copying the parent up
            self._check_protected(node)
            del node
            self.fs.copyup.ensure_parent(rel)
        self._index_before_removal(rel)
        with self._changing():
            node = self.fs.lookup.lookup(rel, keep=False)
            self._check_unlink(node)
            self._check_protected(node)
            shared = self.fs.index_of(node)
            key = self.fs.identity(node)  # before the name is gone
            # a lower entry in the node: a lower layer shows the name (no need to ask again);
            # counted (``pathguard``) until the table followed: a GETATTR or OPEN of the
            # node made its path before, and once the UNLINK replied a new object may take
            # the name
            with self.fs.paths.moving():
                self._remove(node, bool(node.lowers) or self.lower_exists(rel))
                if shared is not None:
                    # a lower name not linked up goes by a whiteout: the index inode keeps
                    # its links
                    self._count_link(shared, -1, -1 if node.upper is not None else 0)
                    self._drop_index_entry(shared, key)
                self.fs.unlinked(node, key)
                if then is not None:  # (after the count: ``then`` may read it)
                    then(node)
        return node

    @staticmethod
    def _check_rmdir(node: Node) -> None:
        if not node.exists:
            raise OSError(errno.ENOENT, "no such directory", node.rel)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", node.rel)

    def rmdir(self, rel: str, then: Callable[[Node], None] | None = None) -> None:
        """Remove the directory at ``rel``; ``then(its node)`` as ``unlink``'s."""
        self.fs.require_writable()
        if not rel:
            raise OSError(errno.EBUSY, "cannot remove the mount root")
        if not self._parent_in_upper(rel, protattr.check_dir_remove):
            node = self.fs.lookup.lookup(rel)
            self._check_rmdir(node)  # before copying the parent up
            self._check_protected(node)
            del node
            self.fs.copyup.ensure_parent(rel)
        with self._changing():
            node = self.fs.lookup.lookup(rel)
            self._check_rmdir(node)
            self._check_protected(node)
            with self.fs.paths.moving():  # (``pathguard``: as an unlink's)
                try:
                    lower_exists = bool(node.lowers) or self.lower_exists(rel)
                    if lower_exists or not self._rmdir_if_empty(node):
                        if merged_listing(node, self.fs.inos, self.fs.prefix):
                            raise OSError(errno.ENOTEMPTY, "directory not empty", rel)
                        self._remove(node, lower_exists)
                finally:
                    # even after a failure: a step may have moved the upper dir already, and
                    # the cache must never hold its fd under this name (changes act through it)
                    self._done(rel)
                self.fs.unlinked(node)
                if then is not None:
                    then(node)

    def _rmdir_if_empty(self, node: Node) -> bool:
        """rm -rf's common case, as the kernel's ``ovl_remove_upper``: a directory only the
        upper holds, with no lower name to hide, goes with one ``rmdir`` when it is empty.
        False (nothing changed) when it holds something (whiteouts, markers, or real
        entries: the caller lists it and decides)."""
        upper = self.fs.stack.upper
        assert upper is not None and node.upper is not None
        try:
            upper.do_rmdir(node.rel)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def _remove(self, node: Node, lower_exists: bool) -> None:
        """Remove the object at ``node`` from the merged view, leaving a whiteout if needed."""
        upper, work = self.fs.stack.upper, self.fs.stack.work
        assert upper is not None and work is not None
        if self.fs.format.devices:
            try:
                self._remove_with_device(node, lower_exists)
                return
            except whiteout.WhiteoutRefused as e:  # before any change
                self.fs.format.no_devices(upper.path, e.strerror)
        self._remove_with_marker(node, lower_exists)

    def _remove_with_device(self, node: Node, lower_exists: bool) -> None:
        upper, work = self.fs.stack.upper, self.fs.stack.work
        assert upper is not None and work is not None
        rel = node.rel
        if node.upper is None:
            whiteout.make_whiteout(upper, rel)  # lower-only: the name is free in upper
            return
        if node.is_dir:
            tmp = self._tmp()
            if lower_exists:
                whiteout.make_whiteout(work, tmp)
                do_rename(work, tmp, upper, rel, sysapi.RENAME_EXCHANGE)
            else:
                do_rename(upper, rel, work, tmp)
            self._discard(tmp)  # the old upper dir holds at most whiteouts
            return
        if lower_exists:
            tmp = self._tmp()
            whiteout.make_whiteout(work, tmp)
            do_rename(work, tmp, upper, rel)  # atomically replaces the upper file
        else:
            upper.do_unlink(rel)

    def _remove_with_marker(self, node: Node, lower_exists: bool) -> None:
        """``_remove`` where whiteouts are ``.wh.NAME`` files: the marker first (inert while
        the name exists in the upper), then the upper object goes, which makes it count."""
        upper, work = self.fs.stack.upper, self.fs.stack.work
        assert upper is not None and work is not None
        rel = node.rel
        made = False
        if lower_exists:
            made = whiteout.make_marker(upper, rel)
        if node.upper is None:
            return
        try:
            if node.is_dir:
                tmp = self._tmp()
                do_rename(upper, rel, work, tmp)
                self._discard(tmp)  # the old upper dir holds at most whiteouts
            else:
                upper.do_unlink(rel)
        except BaseException:
            if made and upper.lstat(rel) is not None:
                whiteout.clear_marker(upper, rel)  # not removed: leave no trace
            raise

    def _discard(self, tmp: str) -> None:
        """Remove what a completed removal (or creation) left in ``workdir/work`` (``tmp``);
        cleanup (``_cleanup``): the object is gone from the merged view already."""
        work = self.fs.stack.work
        assert work is not None
        _cleanup(work.do_remove_tree, tmp, what=f"remove {work.path}/{tmp}")

    # -- rename -------------------------------------------------------------------------------
    def rename(self, old: str, new: str, flags: int = 0,
               then: Callable[[Node | None], None] | None = None) -> Node | None:
        """Move ``old`` to ``new``; return the node that was at ``new`` just before (None
        when nothing was moved: the same name). ``then(that node)``: after a move, under
        the namespace lock hold that made it (the adapter's node table follows there, so
        no one holding the lock sees the move on disk but not in the table)."""
        self.fs.require_writable()
        if flags & ~sysapi.RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "rename flags other than RENAME_NOREPLACE are not supported")
        self._check_new_name(new)
        if old == new:
            return None
        if new.startswith(old + "/") or not old:
            raise OSError(errno.EINVAL, "cannot move a directory into itself", new)
        # (the old name's node without its fds while the new one is looked up: that lookup
        # may wait for fds, and a directory merged across many layers holds one in each,
        # which the thread whose turn it is may need: limits23)
        onode = self.fs.lookup.lookup(old).without_fds()
        if not onode.exists:
            raise OSError(errno.ENOENT, "no such file", old)
        nnode = self.fs.lookup.lookup(new)
        self._check_rename_protected(old, new, onode, nnode)
        if onode.is_dir and onode.lowers and not self.fs.config.redirect_dir == "on":
            raise OSError(errno.EXDEV, "directory exists in a lower layer (redirect_dir=off)", old)
        self._check_target(onode, nnode, flags)
        replaces_file = nnode.exists and not nnode.is_dir
        # (looked up again under the lock: not held while the copy-ups, whose lookups may
        # wait for fds at the limit, run; a merged directory holds an fd per layer: stall20)
        del onode, nnode
        # a regular file: metadata only under metacopy=on (its data stays below, found by
        # the redirect ``_mark_moved`` sets), as the kernel's ``ovl_rename`` (compat41)
        self.fs.copyup.ensure_upper(old, metadata_only=True)
        self.fs.copyup.ensure_parent(new)
        if replaces_file:
            self._index_before_removal(new)
        with self._changing():
            # (here too without its fds: under the lock nothing waits for them, the new
            # name's walk fails with EMFILE at once, and it fits the one walk the admitted
            # limit leaves room for only with the old name's fds let go: ``mount_needs``)
            onode = self.fs.lookup.lookup(old).without_fds()
            if onode.upper is None:
                raise OSError(errno.ENOENT, "source changed during rename", old)
            nnode = self.fs.lookup.lookup(new)
            self._check_target(onode, nnode, flags)
            # counted (``pathguard``) from before its first step until the adapter's table
            # followed: a directory's move makes the paths below it stale, any move the
            # path of the object renamed over (a GETATTR or OPEN of it holds no lock the
            # rename takes: its path would name the object that took its name)
            with self.fs.paths.moving():
                try:
                    self._rename_locked(old, new, onode, nnode)
                finally:
                    if onode.is_dir or nnode.is_dir:
                        # even after a failure: a step may have moved or emptied a directory
                        # already, and the cache must never hold a moved one's fd by its old
                        # name
                        self._done(old, new)
                if then is not None:
                    then(nnode)
        return nnode

    def _check_rename_protected(self, old: str, new: str, onode: Node, nnode: Node) -> None:
        """The immutable/append-only flags a rename meets, in the VFS's order (EPERM,
        before anything is copied up): the old name's directory and the object
        (``may_delete``), the new name's directory and any object there (``may_create``,
        ``may_delete``), a directory moved to another parent (its ``..``)."""
        self._parent_in_upper(old, protattr.check_dir_remove)
        self._check_protected(onode)
        if nnode.exists:
            self._parent_in_upper(new, protattr.check_dir_remove)
            self._check_protected(nnode)
        else:
            self._parent_in_upper(new, protattr.check_dir_add)
        if onode.is_dir and split(old)[0] != split(new)[0]:
            protattr.check_moved_dir(self.fs.protection.of_node(onode), old)

    def _rename_locked(self, old: str, new: str, onode: Node, nnode: Node) -> None:
        """The move itself, under the namespace lock (``rename`` checked the target)."""
        upper = self.fs.stack.upper
        assert upper is not None
        old_lower = self.lower_exists(old)
        new_lower = bool(nnode.lowers) or nnode.upper_whiteout or self.lower_exists(new)
        if split(old)[0] != split(new)[0] and impure.has_origin(upper, old, self.fs.prefix):
            # before the move, as the kernel (``impure``); left if the move then fails
            impure.mark(upper, split(new)[0], self.fs.prefix)
        mark = self._mark_moved(onode, new, new_lower)
        try:
            if nnode.upper is not None and nnode.is_dir:
                self._empty_target(new, hides_lowers=bool(nnode.lowers))
            replaced_shared = None if nnode.is_dir else self.fs.index_of(nnode)
            replaced = self.fs.identity(nnode) if nnode.exists else None  # before it goes
            if nnode.upper_whiteout and not nnode.upper_marker:
                # swap with the whiteout: it lands at the old name
                do_rename(upper, old, upper, new, sysapi.RENAME_EXCHANGE)
            else:
                self._move(old, new, old_lower, replace=nnode.upper is not None)
        except BaseException:
            self._unmark(old, mark)  # not moved: a failed rename leaves no mark
            raise
        # the move is done and visible: what follows is cleanup, logged, never answered
        if nnode.upper_marker:
            self._drop_marker(new)
        elif nnode.upper_whiteout and not old_lower:
            # the whiteout is needed only if a lower has the old name; one over no lower
            # name hides nothing
            _cleanup(upper.do_unlink, old, what=f"remove the whiteout {upper.path}/{old} after a rename")
        if replaced_shared is not None:
            self._count_link(replaced_shared, -1, -1 if nnode.upper is not None else 0)
            self._drop_index_entry(replaced_shared, replaced)
        if nnode.exists:
            self.fs.unlinked(nnode, replaced)
        self.fs.renamed(old, new)

    def _empty_target(self, rel: str, *, hides_lowers: bool) -> None:
        """Remove what the merged-empty upper directory ``rel`` holds (whiteouts), so a
        directory can be renamed over it (rename(2) replaces only an empty one). When they
        hide lower entries, the directory is made opaque first, so that a failure partway
        never shows those again (the kernel's ``ovl_clear_empty`` swaps in an opaque
        directory); the mark stays if the rename then fails: the target shows nothing
        either way. A ``.wh..wh..opq`` marker (no xattrs there) goes last."""
        upper = self.fs.stack.upper
        assert upper is not None
        if hides_lowers:
            whiteout.set_opaque(upper, rel, self.fs.prefix)
        for name, _ in upper.listdir(rel):
            if name != whiteout.OCI_OPAQUE:
                upper.do_remove_tree(join(rel, name))
        upper.do_remove_tree(join(rel, whiteout.OCI_OPAQUE))

    def _mark_moved(self, onode: Node, new: str, new_lower: bool) -> tuple[str, bytes | None] | None:
        """Before a move, set the xattr the object needs at its new name: a redirect (a
        directory with lower parts, whose contents stay where they are; a metacopy file,
        whose data must stay findable) or the opaque mark (an upper-only directory landing
        in a merged parent: over a lower one it must hide it; elsewhere there it spares
        lookups below, and the kernel's ``ovl_rename`` sets it all the same, within one
        parent too). Return (xattr, previous value) for ``_unmark``, or None (nothing
        written). EXDEV where the mark cannot be written (``_set_mark``)."""
        upper = self.fs.stack.upper
        assert upper is not None
        redirect, opaque = self.fs.prefix + "redirect", self.fs.prefix + "opaque"
        if onode.is_dir and onode.lowers:
            if self.fs.config.redirect_dir != "on":
                raise OSError(errno.EXDEV, "directory exists in a lower layer", onode.rel)
            name, value = redirect, self._redirect_value(onode, new, onode.lowers[0])
        elif onode.data is not None:
            first = onode.first_lower
            assert first is not None
            name, value = redirect, self._redirect_value(onode, new, first)
        elif onode.is_dir and not onode.opaque and (new_lower or self._merged(split(new)[0])):
            name, value = opaque, b"y"
        else:
            return None
        previous = upper.getxattr(onode.rel, name)
        if previous == value:
            return None  # (a redirect it has already stays: the kernel writes nothing)
        _set_mark(upper, onode.rel, name, value, redirect=name == redirect)
        return name, previous

    def _unmark(self, rel: str, mark: tuple[str, bytes | None] | None) -> None:
        """Undo ``_mark_moved`` on the object still at ``rel`` (its move failed)."""
        if mark is None:
            return
        upper = self.fs.stack.upper
        assert upper is not None
        name, previous = mark
        try:
            if previous is None:
                upper.do_removexattr(rel, name)
            else:
                upper.do_setxattr(rel, name, previous)
        except FileNotFoundError:
            pass  # it did move (a step after the rename failed): the mark is where it belongs
        except OSError as e:
            log.error("cannot restore %s of %s/%s after a failed rename: %s", name, upper.path, rel, e)

    def _redirect_value(self, onode: Node, new: str, lower: Entry, *, absolute: bool = False) -> bytes:
        """``trusted.overlay.redirect`` as the kernel (``ovl_set_redirect``,
        ``ovl_get_redirect``) writes it, for a directory and a metacopy file alike: the old
        name alone for a rename within one directory, else the old merged path with each
        upper ancestor's redirect in place of its name (up to an absolute one); a redirect
        the object has already stays where it serves (a relative one within one directory,
        an absolute one anywhere). Absolute for a lower hard link (``lower``, the file's
        first lower: its data, or a former upper's metacopy file above that) too
        (``ovl_need_absolute_redirect``: its other names, linked up later, share the xattr
        from other directories), and where ``absolute`` asks (a link's:
        ``_set_link_redirect``). The merged path, not ``lower``'s own: the
        lookup from the new name meets each layer's redirects on the way (a former upper's
        metacopy file renamed there: its old name in that layer may be a whiteout). EXDEV
        past the kernel's ``redirect_max``, which it could not read back (``mv`` copies)."""
        upper = self.fs.stack.upper
        assert upper is not None and onode.upper is not None
        existing = redirect_target(upper.getxattr(onode.rel, self.fs.prefix + "redirect"))
        hard_link = not onode.is_dir and lower.st.st_nlink > 1
        absolute = absolute or split(onode.rel)[0] != split(new)[0] or hard_link
        if existing is not None and (not absolute or existing.startswith("/")):
            value = existing
        elif not absolute:
            value = split(onode.rel)[1]
        else:
            parts, rel, target = [], onode.rel, existing
            while rel:
                if target is not None and target.startswith("/"):
                    parts.append(target.strip("/"))
                    break
                parts.append(target if target is not None else split(rel)[1])
                rel = split(rel)[0]
                target = redirect_target(upper.getxattr(rel, self.fs.prefix + "redirect")) if rel else None
            value = "/" + "/".join(reversed(parts))
        raw = os.fsencode(value)
        if len(raw) > redirect_max():
            # (a directory's, or a metacopy file's absolute one) the kernel refuses what it
            # could not read back (its redirect_max): EXDEV, and mv copies instead
            raise OSError(errno.EXDEV, f"redirect longer than {redirect_max()} bytes", onode.rel)
        return raw

    def _check_target(self, onode: Node, nnode: Node, flags: int) -> None:
        if not nnode.exists:
            return
        if flags & sysapi.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "target exists", nnode.rel)
        if onode.is_dir and not nnode.is_dir:
            raise OSError(errno.ENOTDIR, "target is not a directory", nnode.rel)
        if not onode.is_dir and nnode.is_dir:
            raise OSError(errno.EISDIR, "target is a directory", nnode.rel)
        if nnode.is_dir and merged_listing(nnode, self.fs.inos, self.fs.prefix):
            raise OSError(errno.ENOTEMPTY, "target directory not empty", nnode.rel)

    def _move(self, old: str, new: str, old_lower: bool, *, replace: bool) -> None:
        upper, work = self.fs.stack.upper, self.fs.stack.work
        assert upper is not None and work is not None
        flags = 0 if replace else sysapi.RENAME_NOREPLACE
        if old_lower and not self.fs.format.devices:
            # the marker first: inert until the rename frees the old name
            made = whiteout.make_marker(upper, old)
            try:
                do_rename(upper, old, upper, new, flags)
            except BaseException:
                if made:
                    whiteout.clear_marker(upper, old)
                raise
        elif old_lower:
            try:
                # test-only (faults.py): "eperm" stands for an upper without RENAME_WHITEOUT
                faults.hit("namespace.rename_whiteout", new)
                do_rename(upper, old, upper, new, flags | sysapi.RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
            # the whiteout first, in the workdir, so a refused mknod changes nothing
            tmp = self._tmp()
            try:
                whiteout.make_whiteout(work, tmp)
            except whiteout.WhiteoutRefused as e:
                self.fs.format.no_devices(upper.path, e.strerror)
                self._move(old, new, old_lower, replace=replace)
                return
            try:
                self._move_then_whiteout(old, new, tmp, replace=replace)
            finally:
                self._discard(tmp)  # what was replaced, or the whiteout of a failed move
        else:
            do_rename(upper, old, upper, new, flags)

    def _move_then_whiteout(self, old: str, new: str, tmp: str, *, replace: bool) -> None:
        """Move ``old`` to ``new`` leaving the whiteout ``workdir/work/tmp`` at ``old``,
        without RENAME_WHITEOUT, in two steps: the object goes to ``new`` (an exchange when
        it replaces something, which then waits at ``old``), then the whiteout to ``old``
        (what waited there goes to ``tmp``). A failure of the second step undoes the first.
        A crash between them loses nothing: the lower ``old`` (or the replaced object)
        shows at ``old`` and the object at ``new``. Putting the whiteout at ``new`` first
        would lose a replaced object to the next mount's workdir cleanup."""
        upper, work = self.fs.stack.upper, self.fs.stack.work
        assert upper is not None and work is not None
        if replace:
            do_rename(upper, old, upper, new, sysapi.RENAME_EXCHANGE)  # the move
        else:
            do_rename(upper, old, upper, new, sysapi.RENAME_NOREPLACE)
        try:
            faults.hit("namespace.place_whiteout", old)  # test-only (faults.py)
            do_rename(work, tmp, upper, old, sysapi.RENAME_EXCHANGE if replace else sysapi.RENAME_NOREPLACE)
        except BaseException:
            try:  # the object goes back to old (and a replaced one back to new)
                if replace:
                    do_rename(upper, new, upper, old, sysapi.RENAME_EXCHANGE)
                else:
                    do_rename(upper, new, upper, old, sysapi.RENAME_NOREPLACE)
            except OSError as e:
                log.error("cannot move %s/%s back to %s after a failed rename: %s",
                          upper.path, new, old, e)
            raise


def _set_mark(upper: Layer, rel: str, name: str, value: bytes, *, redirect: bool) -> None:
    """Set the redirect or opaque mark ``name`` of the upper object ``rel`` before a move or
    link, failing as the kernel's: a redirect that cannot be written, for any reason, is
    EXDEV (``ovl_set_redirect``: "failed to set redirect", so that ``mv`` copies instead);
    an opaque mark only where the upper takes no xattrs (``ovl_set_opaque_xerr``)."""
    try:
        upper.do_setxattr(rel, name, value)
    except OSError as e:
        if not redirect and e.errno != errno.EOPNOTSUPP:
            raise
        log.warning("failed to set %s of %s/%s: %s", name, upper.path, rel, e.strerror)
        raise OSError(errno.EXDEV, f"cannot set {name} ({e.strerror}): a move that needs it "
                      "fails, as the kernel's", rel) from e
