"""``index=on``: the kernel's exclusive upperdir protection, as userspace can see it.

Owns: whether a live kernel overlay mount holds this stack's upperdir, workdir or a
lowerdir. The kernel marks both roots of each of its mounts in use and refuses an
``index=on`` mount with any of them as its upperdir, workdir or a lowerdir, or above one
of those on its filesystem (``ovl_check_layer`` walks each layer's ancestors; EBUSY, "mount
with '-o index=off' to override exclusive upperdir protection"; with ``index=off`` it only
warns; ``ovl_report_in_use``). overlaypc's flock (``LayerStack.lock``) keeps out a second
overlaypc, which the kernel's mark cannot see, and the kernel's mark keeps out nothing of
ours: without this, an index=on mount checked, and removed, the index entries of a live
kernel mount (``indexclean``) and emptied its workdir/work. Read from
``/proc/self/mountinfo``: each ``overlay`` mount's ``upperdir=``/``workdir=`` (octal
escapes undone), compared by device and inode with ours and the directories above them by
path, on the same filesystem.

Caveats: a kernel mount not in this mount namespace, or whose paths do not resolve here
(relative, another root), is not seen; a kernel mount made after ours is not refused (it
cannot see our flock either); the walk up is by path, so a layer below a bind mount sees
the directories above that mount's path, not those above its root on its filesystem.
"""
from __future__ import annotations

import errno
import os

from .config import unescape_mountinfo
from .stack import LayerStack

MOUNTINFO = "/proc/self/mountinfo"


def refuse_held(stack: LayerStack, mountinfo: str = MOUNTINFO) -> None:
    """Raise OSError (EBUSY) when a kernel overlay mount uses this stack's upperdir,
    workdir or a lowerdir, or a directory above one on its filesystem, as its own
    upperdir or workdir."""
    held: dict[tuple[int, int], str] = {}
    for mnt, path in _kernel_dirs(mountinfo):
        try:
            st = os.stat(path)
        except OSError:
            continue
        held.setdefault((st.st_dev, st.st_ino), mnt)
    if not held:
        return
    for what, layer in (("upperdir", stack.upper), ("workdir", stack.work),
                        *(("lowerdir", lower) for lower in stack.lowers)):
        if layer is None:
            continue
        for where, ident in _up_from(layer.path, (layer.dev, layer.root_ino)):
            mnt = held.get(ident)
            if mnt is not None:
                within = "" if where == layer.path else f", in {where},"
                raise OSError(errno.EBUSY, f"index=on: {what} {layer.path}{within} is in use "
                              f"by the kernel overlay mounted on {mnt}, as the kernel refuses "
                              f"it (mount with index=off to override exclusive upperdir "
                              f"protection)")


def _up_from(path: str, ident: tuple[int, int]):
    """(path, (device, inode)) of directory ``path`` (``ident``) and of each directory
    above it on the same filesystem, as the kernel's ``ovl_check_layer`` walks them."""
    yield path, ident
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return
        try:
            st = os.stat(parent)
        except OSError:
            return
        if st.st_dev != ident[0]:
            return
        path = parent
        yield path, (st.st_dev, st.st_ino)


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
