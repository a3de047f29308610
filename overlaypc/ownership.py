"""Owner and mode: what the layers store, what the mount shows, and how changes are written.

Owns ``Ownership``, the one place for fuse-overlayfs's ownership options, kept out of the
FUSE adapter so any front end reuses it (the adapter only passes the caller's IDs on):

* **Stored owner and mode** (``stored``): a layer's real ``st_uid``/``st_gid``/mode, or,
  for directories and regular files in an *override layer*, the values in its override
  xattr ``uid:gid:octal-mode[:type]`` (decimal IDs, octal permission bits; a 4th field, the
  object type containers/storage adds, is ignored: the real type is shown). Names, first
  found wins: the one this mount writes (``xattr_permissions=1``:
  ``security.fuseoverlayfs.override_stat``, ``=2``: ``user.fuseoverlayfs.override_stat``),
  then ``user.containers.override_stat`` (containers/storage's ``force_mask``), then the
  other fuse-overlayfs name. Override layers: every layer under ``xattr_permissions``, else
  the layers whose root directory carries one of these xattrs (fuse-overlayfs decides per
  layer the same way), so other mounts pay nothing. An upper whose root carries one is
  written through it even without ``xattr_permissions`` (else a chmod would change the
  real mode while the xattr goes on deciding the view). A malformed value is logged once
  and the real values stand.
* **Shown** (``show``): stored IDs through ``uidmapping``/``gidmapping`` (``idmap``), then
  ``squash_to_uid``/``squash_to_gid``/``squash_to_root``; directories show ``st_nlink`` 1
  under ``static_nlink``.
* **Idmapped layers**: a lower layer whose directory is on a kernel idmapped mount
  (``idmap.on_idmapped_mount``, decided once at mount) stats with IDs the kernel has mapped
  already, host-side: its real owners are shown as they are (``Stored.shown``), never
  through the mapping a second time; its override xattrs hold container-side IDs as in any
  layer (the kernel maps no xattr value but ACLs'), so they are mapped as usual. A copy-up
  from it stores container-side IDs (``on_disk``: the mapping backwards; a host ID outside
  it is stored as the overflow ID, as a new object's caller is). Its ACL entries are read
  as the kernel shows them through that mount (host IDs) and copied as read, like any
  layer's. The upper is never treated so: its IDs are container-side.
* **Written**: IDs from the kernel (a chown's, a caller's) are shown-side; they are mapped
  back before they reach a layer. A chown to an ID outside the mapping answers EOVERFLOW
  (as the kernel's idmapped mounts); a *new* object of a caller outside it is stored as
  the overflow ID, as fuse-overlayfs does (host root writing into a user-namespaced
  container's tree must keep working). Under ``xattr_permissions`` the owner and mode of
  directories and regular files in the upper live in the override xattr only: chmod,
  chown, creation and copy-up write it, the real object stays owned by the daemon, and
  its real mode keeps the permission bits without setuid, setgid or sticky (a setuid file
  of the container must not be a setuid-root file on the host).

Squashing changes what is shown, never what is written. POSIX ACL entries and the rootid
of ``security.capability`` v3 are not mapped: they are stored and shown as they are.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from . import logs
from .idmap import IdMap, idmapped_mount_ids, on_idmapped_mount
from .records import record
from .typing_lite import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .attrs import Attr
    from .config import MountConfig
    from .layer import Layer
    from .lookup import Entry

log = logs.get("overlaypc.ownership")

OVERRIDE_PRIVILEGED = "security.fuseoverlayfs.override_stat"
OVERRIDE_USER = "user.fuseoverlayfs.override_stat"
OVERRIDE_CONTAINERS = "user.containers.override_stat"
OVERRIDE_NAMES = (OVERRIDE_CONTAINERS, OVERRIDE_PRIVILEGED, OVERRIDE_USER)
#: the name ``xattr_permissions=N`` writes
WRITTEN_NAME = {1: OVERRIDE_PRIVILEGED, 2: OVERRIDE_USER}


#: (``Caller`` lives here, not in ``namespace`` whose changes take it: every mount's
#: start-up imports it, and ``namespace`` is imported at the first change)
@record(frozen=True)
class Caller:
    """Who asks: uid/gid of the process behind a FUSE request, and its umask (for
    creations; the kernel does not apply it, see ``acl``)."""
    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


ROOT = Caller()


def is_override_xattr(name: str) -> bool:
    """Override xattrs are private: never listed, read, set or copied through the mount."""
    return name in OVERRIDE_NAMES


class Stored(NamedTuple):
    """Owner and mode of an object as the layers hold them: container-side IDs, or, with
    ``shown`` (a layer on an idmapped mount), IDs that the kernel already mapped."""
    uid: int
    gid: int
    mode: int  # st_mode, type bits included
    shown: bool = False


def parse_override(value: bytes) -> tuple[int, int, int] | None:
    """``uid:gid:mode[:type]`` -> (uid, gid, permission bits); None if malformed."""
    fields = value.rstrip(b"\0").decode("ascii", "replace").split(":")
    if len(fields) not in (3, 4) or not all(f.isdigit() for f in fields[:3]):
        return None
    try:
        return int(fields[0]), int(fields[1]), int(fields[2], 8) & 0o7777
    except ValueError:  # an 8 or 9 in the mode
        return None


def format_override(uid: int, gid: int, mode: int) -> bytes:
    return f"{uid}:{gid}:{stat.S_IMODE(mode):o}".encode()


def _root_override(layer: "Layer") -> str | None:
    """The first override xattr the layer's root directory carries, if any."""
    return next((name for name in OVERRIDE_NAMES if layer.getxattr("", name) is not None), None)


def _idmapped_lower(layer: "Layer", idmapped: frozenset[int]) -> bool:
    """Whether ``layer`` is a lower on an idmapped mount (one of ``idmapped``: logged, one
    line per layer). An upper or workdir on one is only warned about: IDs written through
    it are mapped by the kernel too, which this mount does not model."""
    if layer.index < 0 or not idmapped or not _on_idmapped(layer, idmapped):
        return False
    if layer.writable:
        log.warning("%s %s is on an idmapped mount: the kernel maps the IDs written there "
                    "as well as uidmapping/gidmapping", layer.name, layer.path)
        return False
    log.info("%s %s is on an idmapped mount: its owners are shown as the kernel maps them, "
             "without uidmapping/gidmapping, and stored mapped back on copy-up",
             layer.name, layer.path)
    return True


def _on_idmapped(layer: "Layer", idmapped: frozenset[int]) -> bool:
    """``on_idmapped_mount`` of the layer's real mount: a root held beneath a private clone
    (``layerroots``) is on a detached mount the mount table does not list (it carries the
    same idmapping), so its path is opened again, and used only if it is still the root."""
    if not layer.cloned:
        return on_idmapped_mount(layer.root_fd, idmapped)
    try:
        fd = os.open(layer.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        a, b = os.fstat(fd), os.fstat(layer.root_fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and on_idmapped_mount(fd, idmapped)
    finally:
        os.close(fd)


def _kill_suid(mode: int) -> int:
    """The mode after a chown of a non-directory, as Linux leaves it."""
    if stat.S_ISDIR(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


@record
class Ownership:
    uids: IdMap | None = None
    gids: IdMap | None = None
    squash_uid: int | None = None
    squash_gid: int | None = None
    static_nlink: bool = False
    #: the override xattr this mount writes in the upper (xattr_permissions), or None
    written: str | None = None
    #: indices of the layers whose objects may carry override xattrs
    override_layers: frozenset[int] = frozenset()
    #: indices of the lower layers on idmapped mounts (their real IDs are shown-side)
    idmapped_layers: frozenset[int] = frozenset()

    @classmethod
    def for_mount(cls, config: "MountConfig", layers: list["Layer"]) -> "Ownership":
        written = WRITTEN_NAME.get(config.xattr_permissions)
        found = {layer.index: _root_override(layer) for layer in layers if layer.index >= 0}
        override = {index for index, name in found.items() if written or name}
        if written is None and found.get(0) is not None and layers[0].writable:
            # an upper whose root carries an override xattr keeps using it: otherwise a
            # chmod would change the real mode while the xattr goes on deciding the view
            written = found[0]
        if 0 in override:
            override.add(-1)  # the workdir builds upper objects (creation, copy-up, index)
        root = 0 if config.squash_to_root else None
        ids = idmapped_mount_ids() if any(layer.index >= 0 for layer in layers) else frozenset()
        idmapped = frozenset(layer.index for layer in layers if _idmapped_lower(layer, ids))
        return cls(config.uidmapping, config.gidmapping,
                   config.squash_to_uid if config.squash_to_uid is not None else root,
                   config.squash_to_gid if config.squash_to_gid is not None else root,
                   config.static_nlink, written, frozenset(override), idmapped)

    def __post_init__(self) -> None:
        self.order = ((self.written,) if self.written else ()) + \
            tuple(n for n in OVERRIDE_NAMES if n != self.written)
        #: False: every stat is shown as the layers hold it (no work per stat)
        self.active = bool(self.uids or self.gids or self.squash_uid is not None
                           or self.squash_gid is not None or self.static_nlink
                           or self.override_layers)
        self._warned: set[bytes] = set()

    # -- stored --------------------------------------------------------------------------------
    def _overrides(self, layer: "Layer", st: os.stat_result) -> bool:
        return layer.index in self.override_layers and \
            (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode))

    def _read(self, path: str, follow: bool) -> tuple[int, int, int] | None:
        """The override xattr of the object at ``path``: ``/proc/self/fd/N`` (followed: the
        magic link to an open object) or ``/proc/self/fd/N/NAME`` (entry NAME of an open
        directory, not followed)."""
        for name in self.order:
            try:
                value = os.getxattr(path, name, follow_symlinks=follow)
            except OSError as e:
                if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.ENOENT):
                    continue
                raise
            parsed = parse_override(value)
            if parsed is None:
                if value not in self._warned and len(self._warned) < 64:
                    self._warned.add(value)
                    log.warning("ignoring malformed %s value %r", name, value)
                continue
            return parsed
        return None

    def _stored(self, layer: "Layer", st: os.stat_result,
                where: Callable[[], tuple[str, bool, int | None]]) -> Stored:
        """``where()`` -> (path, follow, fd to close afterwards), called only if needed."""
        if self._overrides(layer, st):
            path, follow, fd = where()
            try:
                found = self._read(path, follow)
            finally:
                if fd is not None:
                    os.close(fd)
            if found is not None:
                uid, gid, perm = found
                return Stored(uid, gid, stat.S_IFMT(st.st_mode) | perm)
        return Stored(st.st_uid, st.st_gid, st.st_mode, layer.index in self.idmapped_layers)

    def stored_entry(self, entry: "Entry") -> Stored:
        """Owner and mode the layers hold for a looked-up entry."""
        def where() -> tuple[str, bool, int | None]:
            if entry.dirfd is not None:
                return f"/proc/self/fd/{entry.dirfd.fd}", True, None
            fd = entry.layer.path_fd(entry.rel)
            return f"/proc/self/fd/{fd}", True, fd
        return self._stored(entry.layer, entry.st, where)

    def stored_at(self, layer: "Layer", st: os.stat_result, dirfd: int, name: str) -> Stored:
        """... for entry ``name`` of an open directory of ``layer``."""
        return self._stored(layer, st, lambda: layer.entry_xattr_path(dirfd, name))

    def stored_fd(self, layer: "Layer", st: os.stat_result, fd: int) -> Stored:
        """... for an open file (possibly one without a name left)."""
        return self._stored(layer, st, lambda: (f"/proc/self/fd/{fd}", True, None))

    # -- shown -----------------------------------------------------------------------------------
    def show(self, attr: "Attr", stored: Stored) -> "Attr":
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids and not stored.shown:
            uid = self.uids.to_shown(stored.uid)
        else:
            uid = stored.uid
        gid = self.shown_gid(stored)
        nlink = 1 if self.static_nlink and stat.S_ISDIR(stored.mode) else attr.nlink
        return attr._replace(uid=uid, gid=gid, mode=stored.mode, nlink=nlink)

    def shown_gid(self, stored: Stored) -> int:
        """The group shown for ``stored`` (the one the kernel's group checks use)."""
        if self.squash_gid is not None:
            return self.squash_gid
        return self.gids.to_shown(stored.gid) if self.gids and not stored.shown else stored.gid

    def show_entry(self, attr: "Attr", entry: "Entry") -> "Attr":
        return self.show(attr, self.stored_entry(entry)) if self.active else attr

    # -- written ---------------------------------------------------------------------------------
    def on_disk(self, stored: Stored) -> Stored:
        """``stored`` with container-side IDs, as the upper holds them: IDs of an idmapped
        layer mapped back (one outside the mapping as the overflow ID); others unchanged."""
        if not stored.shown:
            return stored
        uid, gid = self.new_owner(stored.uid, stored.gid)
        return Stored(uid, gid, stored.mode)

    def new_owner(self, uid: int, gid: int) -> tuple[int, int]:
        """Stored IDs for a new object of a caller with (shown-side) ``uid``/``gid``."""
        if self.uids is not None:
            uid = self.uids.to_disk(uid)
            uid = self.uids.overflow if uid is None else uid
        if self.gids is not None:
            gid = self.gids.to_disk(gid)
            gid = self.gids.overflow if gid is None else gid
        return uid, gid

    def chown_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """Stored IDs for a chown to shown-side ``uid``/``gid`` (-1: unchanged); EOVERFLOW
        for an ID the mapping cannot store."""
        out = []
        for value, mapping, what in ((uid, self.uids, "uid"), (gid, self.gids, "gid")):
            if value != -1 and mapping is not None:
                stored = mapping.to_disk(value)
                if stored is None:
                    raise OSError(errno.EOVERFLOW, f"{what} {value} is outside {what}mapping={mapping}")
                value = stored
            out.append(value)
        return out[0], out[1]

    def writes_override(self, layer: "Layer", mode: int) -> bool:
        """Whether owner and mode of an object of ``mode`` in ``layer`` go to the xattr."""
        return self.written is not None and layer.writable and layer.index in self.override_layers \
            and (stat.S_ISDIR(mode) or stat.S_ISREG(mode))

    def set_override(self, layer: "Layer", rel: str, uid: int, gid: int, mode: int) -> None:
        """Record owner and mode of ``rel`` in its override xattr; the real mode loses the
        special bits (the real object belongs to the daemon)."""
        assert self.written is not None
        layer.do_setxattr(rel, self.written, format_override(uid, gid, mode))
        real = layer.lstat(rel)
        if real is not None and stat.S_IMODE(real.st_mode) & 0o7000:
            layer.do_chmod(rel, stat.S_IMODE(real.st_mode) & 0o777)

    def set_override_fd(self, layer: "Layer", fd: int, uid: int, gid: int, mode: int) -> None:
        """``set_override`` of the file open as ``fd`` (one with no name: ``O_TMPFILE``)."""
        assert self.written is not None
        layer.do_fsetxattr(fd, "", self.written, format_override(uid, gid, mode))
        real = os.fstat(fd)
        if stat.S_IMODE(real.st_mode) & 0o7000:
            os.chmod(fd, stat.S_IMODE(real.st_mode) & 0o777)

    def chown(self, entry: "Entry", uid: int, gid: int) -> None:
        """chown of the upper ``entry`` to stored IDs (-1: unchanged)."""
        layer, rel = entry.layer, entry.rel
        if not self.writes_override(layer, entry.st.st_mode):
            layer.do_chown(rel, uid, gid)
            return
        now = self.stored_entry(entry)
        self.set_override(layer, rel, now.uid if uid == -1 else uid, now.gid if gid == -1 else gid,
                          _kill_suid(now.mode))

    def chmod(self, entry: "Entry", mode: int) -> None:
        layer, rel = entry.layer, entry.rel
        if not self.writes_override(layer, entry.st.st_mode):
            layer.do_chmod(rel, stat.S_IMODE(mode))
            return
        now = self.stored_entry(entry)
        self.set_override(layer, rel, now.uid, now.gid, stat.S_IMODE(mode))

    def chown_fd(self, layer: "Layer", fd: int, uid: int, gid: int) -> None:
        """chown of an open file without a name left (``fd`` a normal fd of it)."""
        st = os.fstat(fd)
        if not self.writes_override(layer, st.st_mode):
            os.chown(fd, uid, gid)
            return
        now = self.stored_fd(layer, st, fd)
        os.setxattr(fd, self.written, format_override(now.uid if uid == -1 else uid,
                                                      now.gid if gid == -1 else gid,
                                                      _kill_suid(now.mode)))

    def chmod_fd(self, layer: "Layer", fd: int, mode: int) -> None:
        st = os.fstat(fd)
        if not self.writes_override(layer, st.st_mode):
            os.chmod(fd, stat.S_IMODE(mode))
            return
        now = self.stored_fd(layer, st, fd)
        os.setxattr(fd, self.written, format_override(now.uid, now.gid, mode))
