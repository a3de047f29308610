"""POSIX ACLs: the xattr format, what a new object inherits from its parent, and whom an
access ACL lets do what (``permits``: the kernel checks access itself; the daemon asks only
where a request does not say, an empty SETATTR's, see ``OverlayOps._chown_unchanged``).

Owns ``inherit``, the creation rule of Linux (``posix_acl_create``): under a parent with a
default ACL the caller's umask is *not* applied; the new object's access ACL is the
default ACL masked by the requested mode (and dropped when the result says no more than
the mode does), a new directory also takes the default ACL as its own, and the mode
is masked by the ACL. Without a default ACL the mode loses the umask bits. Symlinks
take neither.

The kernel applies this rule itself for objects made directly in their upper
directory; overlaypc applies it by hand only for objects built in ``workdir/work``
(over a whiteout), whose temporary parent is not the real one.

Caveat: ``system.posix_acl_*`` values carry numeric ids of the daemon's user namespace
(the initial one), copied verbatim between layers, as the kernel's copy-up does.
"""
from __future__ import annotations

import errno
import stat
import _struct as struct  # (struct.py only re-exports _struct: ~0.15 ms of a start)

from .records import record
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@record
class AclEntry:
    tag: int
    perm: int
    id: int


def from_xattr(value: bytes) -> list[AclEntry]:
    """The entries of a ``system.posix_acl_*`` value; EIO if it is malformed."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size \
            or _HEADER.unpack_from(value)[0] != _VERSION:
        raise OSError(errno.EIO, "malformed POSIX ACL xattr")
    return [AclEntry(*_ENTRY.unpack_from(value, off))
            for off in range(_HEADER.size, len(value), _ENTRY.size)]


def to_xattr(entries: list[AclEntry]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in entries)


@record(frozen=True)
class NewObject:
    """What a new object gets: its mode, and the ACL xattrs to set (None: none)."""
    mode: int
    access: bytes | None = None
    default: bytes | None = None


def inherit(parent_default: bytes | None, mode: int, umask: int) -> NewObject:
    """The mode and ACLs of a new object of ``mode`` (type bits included) created by a
    caller with ``umask`` in a directory whose default ACL is ``parent_default``."""
    if stat.S_ISLNK(mode):
        return NewObject(mode)
    if parent_default is None:
        return NewObject(mode & ~(umask & 0o777))
    entries = from_xattr(parent_default)
    mode, extended = _create_masq(entries, mode)
    return NewObject(mode, to_xattr(entries) if extended else None,
                     parent_default if stat.S_ISDIR(mode) else None)


def _create_masq(entries: list[AclEntry], mode: int) -> tuple[int, bool]:
    """Mask ``entries`` (in place) and ``mode`` by each other, as ``posix_acl_create_masq``
    does; also say whether the ACL holds more than the mode can (named entries or a mask)."""
    group_obj = mask = None
    extended = False
    for e in entries:
        if e.tag == USER_OBJ:
            e.perm &= (mode >> 6) & 0o7
            mode &= (e.perm << 6) | ~0o700
        elif e.tag in (USER, GROUP):
            extended = True
        elif e.tag == GROUP_OBJ:
            group_obj = e
        elif e.tag == OTHER:
            e.perm &= mode & 0o7
            mode &= e.perm | ~0o007
        elif e.tag == MASK:
            mask, extended = e, True
    limiter = mask if mask is not None else group_obj
    if limiter is None:
        raise OSError(errno.EIO, "POSIX ACL without a group or mask entry")
    limiter.perm &= (mode >> 3) & 0o7
    mode &= (limiter.perm << 3) | ~0o070
    return mode, extended


def permits(value: bytes, uid: int, file_uid: int, file_gid: int,
            in_group: "Callable[[int], bool]", want: int) -> bool:
    """Whether access ACL ``value`` of a file of ``file_uid``, ``file_gid`` grants ``want``
    (rwx bits, 0o2 for write) to a caller of ``uid`` in the groups ``in_group`` says,
    as ``posix_acl_permission`` decides it (no capability counts; EIO if malformed)."""
    entries = from_xattr(value)
    mask = next((e.perm for e in entries if e.tag == MASK), 0o7)
    group_found = False
    for e in entries:
        if e.tag == USER_OBJ and uid == file_uid:
            return e.perm & want == want
        if e.tag == USER and uid == e.id:
            return e.perm & mask & want == want
        if e.tag in (GROUP_OBJ, GROUP) and in_group(file_gid if e.tag == GROUP_OBJ else e.id):
            group_found = True
            if e.perm & want == want:
                return e.perm & mask & want == want
        if e.tag == OTHER:
            return not group_found and e.perm & want == want
    return False
