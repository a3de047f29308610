"""Privilege-clearing writes, as the kernel does them (``handle_killpriv_v2``).

Owns the rule for what a write, a truncate or an ``O_TRUNC`` open by an unprivileged writer
strips from a file, once the daemon has told the kernel (at INIT) that it does this itself:
``S_ISUID`` always; ``S_ISGID`` when group-exec is set (a setgid-without-group-exec file is
a mandatory-locking marker, kept) or when the writer is not in the file's group; and the
``security.capability`` xattr. The kernel sets the request's kill flag only when the writer
lacks ``CAP_FSETID``, so the flag already says "unprivileged", the owner included.

Also owns applying it (``kill_fd``) to an open backing file through ``ownership``, so an
override xattr (``xattr_permissions``) is what loses the bits where it holds the mode,
and the group test uses the file's *shown* group, the one the kernel compares.

When the kernel sets the flags (6.18, ``fs/fuse``): WRITE by a writer without
``CAP_FSETID``; SETATTR with a size (truncate) by such a writer, and *every* chown/chgrp
of a non-directory, whatever the caller's capabilities, so a chown reads the caller's
``CapEff`` too (``Writer.may_be_capable``); OPEN with ``O_TRUNC`` by such a writer.
CREATE sets it for ``O_TRUNC`` too, but a CREATE always makes a new file here (``O_EXCL``
on the layer), which keeps the mode it was created with, as on any local filesystem.
A ``chown(f, -1, -1)`` comes without the flag (nor anything else: the kernel sets it for a
chown only with an ID), though Linux strips then too: ``OverlayOps`` makes it a chown to
-1, -1 with the flag (``_chown_unchanged``).

Caveat: the FUSE protocol carries the writer's uid, gid and pid but not its supplementary
groups (nor its capabilities): they are read from ``/proc/PID/status`` of the requester.
If that process is gone (or the pid belongs to another pid namespace), only the primary
gid counts and no capability, which can only clear more, never less. A capability counts
only for a process in the daemon's user namespace (``has_capability``): the kernel counts
one of a process in a namespace below it over a file whose ids that namespace maps
(``capable_wrt_inode_uidgid``), not read here (more cleared, an EPERM more, never less).
"""
from __future__ import annotations

import errno
import os
import stat

from . import acl
from .records import field, record
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .layer import Layer
    from .ownership import Ownership

CAPABILITY_XATTR = "security.capability"
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_SETFCAP = 31
PRIVILEGED_BITS = stat.S_ISUID | stat.S_ISGID


def groups_of(pid: int, gid: int, proc: str = "/proc") -> frozenset[int]:
    """The primary and supplementary groups of process ``pid``."""
    groups = {gid}
    try:
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return frozenset(groups)


def killed_mode(mode: int, file_gid: int, writer_groups: frozenset[int]) -> int:
    """``mode`` with what an unprivileged write strips from it."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or file_gid not in writer_groups):
        mode &= ~stat.S_ISGID
    return mode


def has_capability(pid: int, cap: int, proc: str = "/proc") -> bool:
    """Whether process ``pid`` holds ``cap`` in its effective set, in the daemon's own user
    namespace (False if gone): ``CapEff`` says what a process may do in *its* namespace, and
    root of one an unprivileged user made has them all there, over nothing of ours."""
    if not same_user_ns(pid, proc):
        return False
    try:
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def same_user_ns(pid: int, proc: str = "/proc") -> bool:
    """Whether process ``pid`` is in the daemon's user namespace (False if gone)."""
    try:
        theirs, ours = os.stat(f"{proc}/{pid}/ns/user"), os.stat(f"{proc}/self/ns/user")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def has_fsetid(pid: int, proc: str = "/proc") -> bool:
    """Whether process ``pid`` holds ``CAP_FSETID`` in its effective set (False if gone)."""
    return has_capability(pid, CAP_FSETID, proc)


@record
class Writer:
    """Who writes, as a request names it. ``may_be_capable``: the kill flag does not
    already say "no CAP_FSETID" (chown), so the process's capabilities are read.
    /proc is read lazily, only for a setgid file without group-exec."""
    uid: int
    gid: int
    pid: int
    may_be_capable: bool = False
    _groups: frozenset[int] | None = field(default=None, repr=False)

    def in_group(self, file_gid: int) -> bool:
        if file_gid == self.gid:
            return True
        if self._groups is None:
            self._groups = groups_of(self.pid, self.gid)
        return file_gid in self._groups

    def keeps_sgid_of(self, file_gid: int) -> bool:
        """The kernel's ``in_group_or_capable``."""
        return self.in_group(file_gid) or (self.may_be_capable and has_fsetid(self.pid))

    def may_write(self, mode: int, uid: int, gid: int, access_acl: bytes | None) -> bool:
        """Whether this writer may write a file of ``mode``, ``uid``, ``gid`` (shown) whose
        access ACL is ``access_acl`` (None: none, the mode bits decide), capabilities aside."""
        if access_acl is not None:
            return acl.permits(access_acl, self.uid, uid, gid, self.in_group, 0o2)
        if self.uid == uid:
            return bool(mode & stat.S_IWUSR)
        return bool(mode & (stat.S_IWGRP if self.in_group(gid) else stat.S_IWOTH))


def stripped_mode(mode: int, file_gid: int, writer: Writer) -> int:
    """``mode`` (a regular file's, group ``file_gid`` as shown) after ``writer``'s kill."""
    groups = frozenset((file_gid,)) if writer.keeps_sgid_of(file_gid) else frozenset()
    return killed_mode(mode, file_gid, groups)


@record(frozen=True)
class Killed:
    """What ``kill_fd`` did: ``changed`` (a bit or the capability went), ``clean``
    (nothing is left that any later write could strip)."""
    changed: bool
    clean: bool


def kill_fd(ownership: "Ownership", layer: "Layer", fd: int, writer: Writer) -> Killed:
    """Strip from the open regular file ``fd`` of ``layer`` what ``writer``'s write strips."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return Killed(False, True)
    stored = ownership.stored_fd(layer, st, fd)
    mode, changed = stored.mode, False
    if mode & PRIVILEGED_BITS:
        new = stripped_mode(mode, ownership.shown_gid(stored), writer)
        if new != mode:
            ownership.chmod_fd(layer, fd, new)
            mode, changed = new, True
    try:
        os.getxattr(fd, CAPABILITY_XATTR)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
    else:
        os.removexattr(fd, CAPABILITY_XATTR)
        changed = True
    return Killed(changed, not mode & PRIVILEGED_BITS)
