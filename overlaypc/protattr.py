"""File attribute flags the overlay enforces: immutable and append-only (pure logic).

Owns: the ``FS_*_FL`` flag values (``chattr``'s), the ``overlay.protattr`` xattr's value
(the kernel's ``ovl_check_protattr``/``ovl_set_protattr``: a string of the letters ``a``
and ``i``), and which changes those flags refuse (``EPERM``), as the VFS refuses them on
the kernel overlay's inode, which carries the real inode's flags (``ovl_copyflags``) or
the ones its upper's ``protattr`` names. No I/O here: ``protection`` reads the flags.

Why an xattr: a copy-up cannot put immutable/append-only on the real upper object (the
overlay could then neither name it nor set its xattrs), so the kernel keeps them in
``overlay.protattr`` of the upper and sets the other flags (sync, noatime...) on the
real upper object itself.

Caveats: a malformed value (empty, or another letter) counts as no flags, as the kernel
warns and ignores it; the flag values equal ``STATX_ATTR_IMMUTABLE``/``APPEND`` by design
(``statx(2)``), so a ``stx_attributes`` masks to the same bits.
"""
from __future__ import annotations

import errno
import os

FS_SYNC_FL = 0x00000008
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020
FS_NODUMP_FL = 0x00000040
FS_NOATIME_FL = 0x00000080
#: the flags the overlay enforces, kept in ``protattr`` (the kernel's OVL_PROT_FS_FLAGS_MASK)
PROTECTED = FS_IMMUTABLE_FL | FS_APPEND_FL
#: the flags a copy-up puts on the real upper copy (the kernel's OVL_COPY_FS_FLAGS_MASK;
#: not nodump, nor any other)
COPIED = FS_SYNC_FL | FS_NOATIME_FL
#: ``statx`` attribute bits of the same meaning (equal values, ``include/uapi/linux/stat.h``)
STATX_ATTR_IMMUTABLE = 0x00000010
STATX_ATTR_APPEND = 0x00000020

#: ``struct fsxattr``'s ``fsx_xflags`` bits of the same flags (FS_IOC_FSGETXATTR)
FS_XFLAG_IMMUTABLE = 0x00000008
FS_XFLAG_APPEND = 0x00000010
XFLAGS_PROTECTED = FS_XFLAG_IMMUTABLE | FS_XFLAG_APPEND

#: the xattr's name after the mount's prefix (``trusted.overlay.`` or ``user.overlay.``)
XATTR = "protattr"
#: the kernel reads at most this many bytes of it (OVL_PROTATTR_MAX)
MAX_LEN = 32


def parse(value: bytes | None) -> int | None:
    """The flags a ``protattr`` value names; None for a malformed one (empty, too long, or
    a letter other than ``a``/``i``: the kernel warns and ignores it). None in, 0 out."""
    if value is None:
        return 0
    if not value or len(value) > MAX_LEN:
        return None
    flags = 0
    for letter in value:
        if letter == 0x61:      # "a"
            flags |= FS_APPEND_FL
        elif letter == 0x69:    # "i"
            flags |= FS_IMMUTABLE_FL
        else:
            return None
    return flags


def value_of(flags: int) -> bytes:
    """The ``protattr`` value of ``flags`` (the kernel's order: ``a`` then ``i``); empty
    when neither is set (the xattr is removed then)."""
    return (b"a" if flags & FS_APPEND_FL else b"") + (b"i" if flags & FS_IMMUTABLE_FL else b"")


def from_statx(attributes: int) -> int:
    """The enforced flags a ``statx`` ``stx_attributes`` reports."""
    return attributes & (STATX_ATTR_IMMUTABLE | STATX_ATTR_APPEND)


def to_xflags(flags: int) -> int:
    """The ``fsx_xflags`` bits of the enforced ``flags``."""
    return (FS_XFLAG_IMMUTABLE if flags & FS_IMMUTABLE_FL else 0) \
        | (FS_XFLAG_APPEND if flags & FS_APPEND_FL else 0)


def from_xflags(xflags: int) -> int:
    """The enforced flags ``fsx_xflags`` names."""
    return (FS_IMMUTABLE_FL if xflags & FS_XFLAG_IMMUTABLE else 0) \
        | (FS_APPEND_FL if xflags & FS_XFLAG_APPEND else 0)


def _refuse(what: str, rel: str) -> OSError:
    return OSError(errno.EPERM, f"operation not permitted ({what})", rel)


def check_changed(flags: int, rel: str, what: str = "immutable or append-only") -> None:
    """A change of the object itself that both flags refuse: its xattrs, a hard link to
    it, its removal or a rename of it (``xattr_permission``, ``vfs_link``,
    ``may_delete``)."""
    if flags & PROTECTED:
        raise _refuse(what, rel)


def check_dir_add(flags: int, rel: str) -> None:
    """A new entry in directory ``rel`` (create, mkdir, link, rename into): refused in an
    immutable one (its MAY_WRITE permission); an append-only one takes new entries."""
    if flags & FS_IMMUTABLE_FL:
        raise _refuse("immutable directory", rel)


def check_dir_remove(flags: int, rel: str) -> None:
    """An entry leaving directory ``rel`` (unlink, rmdir, rename out of or over):
    refused in an immutable or append-only one (``may_delete``)."""
    if flags & PROTECTED:
        raise _refuse("immutable or append-only directory", rel)


def check_moved_dir(flags: int, rel: str) -> None:
    """A directory moved to another parent (its ``..`` changes: MAY_WRITE on it):
    refused when immutable."""
    if flags & FS_IMMUTABLE_FL:
        raise _refuse("immutable directory", rel)


def check_open(flags: int, open_flags: int, rel: str) -> None:
    """An open (``may_open``): for writing or with O_TRUNC, refused when immutable; when
    append-only, refused unless read-only or with O_APPEND, and refused with O_TRUNC."""
    if not flags & PROTECTED:
        return
    writes = open_flags & os.O_ACCMODE != os.O_RDONLY
    if flags & FS_IMMUTABLE_FL and (writes or open_flags & os.O_TRUNC):
        raise _refuse("immutable", rel)
    if flags & FS_APPEND_FL and (open_flags & os.O_TRUNC or writes and not open_flags & os.O_APPEND):
        raise _refuse("append-only", rel)


def check_setattr(flags: int, rel: str, *, owner_mode_or_times: bool, size: bool,
                  touch: bool, by_fd: bool = False) -> None:
    """A SETATTR (``notify_change``, truncate): mode, owner, explicit times
    (``owner_mode_or_times``) or a size refused by either flag; times set to now
    (``touch``: ``utimes(NULL)``) refused when immutable. ``by_fd``: a truncate through an
    open file (``ftruncate``: FUSE's FATTR_FH), which ``do_ftruncate`` refuses only when
    append-only; an fd open for writing before ``chattr +i`` truncates the file (neither
    ``notify_change`` nor the kernel overlay's ``ovl_setattr`` looks at immutable for a
    size, nor for the times a truncate sets)."""
    if not flags & PROTECTED:
        return
    if by_fd:
        if size and flags & FS_APPEND_FL:
            raise _refuse("append-only", rel)
        return
    if owner_mode_or_times or size:
        raise _refuse("immutable or append-only", rel)
    if touch and flags & FS_IMMUTABLE_FL:
        raise _refuse("immutable", rel)
