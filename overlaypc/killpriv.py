"""Privilege-clearing writes, as the kernel does them (``handle_killpriv_v2``).

Owns the rule for what a write, a truncate or an ``O_TRUNC`` open by an unprivileged writer
strips from a file, once the daemon has told the kernel (at INIT) that it does this itself:
``S_ISUID`` always; ``S_ISGID`` when group-exec is set (a setgid-without-group-exec file is
a mandatory-locking marker, kept) or when the writer is not in the file's group; and the
``security.capability`` xattr. The kernel sets the request's kill flag only when the writer
lacks ``CAP_FSETID``, so the flag already says "unprivileged", the owner included.

Caveat: the FUSE protocol carries the writer's uid, gid and pid but not its supplementary
groups: they are read from ``/proc/PID/status`` of the requester. If that process is gone
(or the pid belongs to another pid namespace), only the primary gid counts, which can only
clear more, never less.
"""
from __future__ import annotations

import stat

CAPABILITY_XATTR = "security.capability"


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
