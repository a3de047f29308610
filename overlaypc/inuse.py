"""``index=on``: the kernel's exclusive upperdir protection, as userspace can see it.

Owns: whether a live kernel overlay mount holds this stack's upperdir, workdir or a
lowerdir. The kernel marks both roots of each of its mounts in use and refuses an
``index=on`` mount with any of them as its upperdir, workdir or a lowerdir (EBUSY, "mount
with '-o index=off' to override exclusive upperdir protection"; with ``index=off`` it only
warns; ``ovl_report_in_use``). overlaypc's flock (``LayerStack.lock``) keeps out a second
overlaypc, which the kernel's mark cannot see, and the kernel's mark keeps out nothing of
ours: without this, an index=on mount checked, and removed, the index entries of a live
kernel mount (``indexclean``) and emptied its workdir/work. Read from
``/proc/self/mountinfo``: each ``overlay`` mount's ``upperdir=``/``workdir=`` (octal
escapes undone), compared by device and inode with ours.

Caveats: a kernel mount not in this mount namespace, or whose paths do not resolve here
(relative, another root), is not seen; a kernel mount made after ours is not refused (it
cannot see our flock either).
"""
from __future__ import annotations

import errno
import os

from .config import unescape_mountinfo
from .stack import LayerStack

MOUNTINFO = "/proc/self/mountinfo"


def refuse_held(stack: LayerStack, mountinfo: str = MOUNTINFO) -> None:
    """Raise OSError (EBUSY) when a kernel overlay mount uses this stack's upperdir,
    workdir or a lowerdir as its own upperdir or workdir."""
    ours = {(layer.dev, layer.root_ino): (what, layer.path)
            for what, layer in (("upperdir", stack.upper), ("workdir", stack.work),
                                *(("lowerdir", lower) for lower in stack.lowers))
            if layer is not None}
    for mnt, path in _kernel_dirs(mountinfo):
        try:
            st = os.stat(path)
        except OSError:
            continue
        found = ours.get((st.st_dev, st.st_ino))
        if found is not None:
            raise OSError(errno.EBUSY, f"index=on: {found[0]} {found[1]} is in use by the "
                          f"kernel overlay mounted on {mnt}, as the kernel refuses it (mount "
                          f"with index=off to override exclusive upperdir protection)")


def _kernel_dirs(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, directory) of each ``upperdir``/``workdir`` of an overlay mount."""
    out = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = right.split()
        if len(fields) < 3 or fields[0] != "overlay":
            continue
        mnt = unescape_mountinfo(left.split()[4])
        for option in fields[2].split(","):  # (a comma in a path is escaped: \054)
            name, _, value = option.partition("=")
            if name in ("upperdir", "workdir") and value:
                out.append((mnt, unescape_mountinfo(value)))
    return out
