"""POSIX ACLs: the xattr format, and what a new object inherits from its parent.

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
import struct

from .records import record

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
