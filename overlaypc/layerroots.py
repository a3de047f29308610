"""Opening layer roots on a private copy of their mount.

Owns: the root fds a ``Layer`` starts from. A layer root is held beneath a detached,
non-recursive clone of its mount (``sysapi.clone_tree``), as the kernel's overlay holds a
private clone of each layer's mount: a mount made on a name inside a layer (a bind mount of
``/etc`` on ``lower/d/x``) is not in the clone, so every ``*at`` call on a name beneath
the root (``fstatat``, ``getxattr``, ``readlink``, ``fchmodat2``...) sees the object the
mount covers, as the kernel's overlay shows it, and can never reach the mount's source.
The clone is made once per layer group at mount; lookups cost nothing more.

Upper and workdir are opened beneath ONE clone, of the deepest directory above both (a
rename from ``work`` to upper across two mounts is EXDEV, even on one filesystem), and so
are, where they can be, all the layers on one filesystem (``open_roots``).

Caveats: the clone needs CAP_SYS_ADMIN over the mount namespace (root, and root of a
user namespace that owns its mount namespace, as rootless podman's); where it is refused
(a plain user, a mount with locked mounts beneath it, an old kernel) the roots are opened
on the real mounts as before (``RootFds.cloned`` False; logged at debug level), and a name
that is a mount point then counts as absent to every read and change by name, where the
clone would show the object it covers (``Layer``'s docstring: checked per call there). A path
that crosses a mount between the common directory and a layer root (an upper on another
mount than its workdir's parent) cannot be reached in the clone: detected by the mount ID
of each root's real fd (the common directory's mount, or not cloned with it: a mount of the
same directory on itself shows the same object in the clone, without that mount's flags)
and by comparing the objects, and those roots are split by mount, else opened on the real
mounts too. The real mount's unmount no
longer waits for the daemon (the clone holds the filesystem), as with the kernel's overlay.
"""
from __future__ import annotations

import errno
import os

from . import logs, sysapi
from .idmap import mount_id
from .layer import same_file
from .records import record

log = logs.get("overlaypc.layer")

_ROOT_OPEN = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: why a clone is not made: no privilege, locked mounts beneath, no ``open_tree``
_DECLINED = (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS)


@record
class RootFds:
    """``O_PATH`` fds of one set of layer roots, in the order asked; the caller owns them."""
    fds: list[int]
    #: whether they are beneath a clone (else on the real mounts)
    cloned: bool


def open_roots(sets: list[list[str]]) -> list[RootFds]:
    """Each set of roots (absolute directories: upper and workdir together, a lower alone)
    opened beneath a clone of its mount, each fd of the object its path names now (device
    and inode). The sets on one filesystem share one clone, of their deepest common
    directory (a clone costs ~50 us: a stack of 100 lowers under containers/storage's
    ``overlay/`` makes one; and older kernels' ``FICLONE`` refuses files on two mounts, a
    copy-up's reflink from a lower to the upper; 6.18 takes them). Where a root is not
    found in that clone, the sets are split by real mount, then taken one by one; where a
    set cannot be cloned, it is opened on the real mounts."""
    real: list[list[int]] = []
    out: list[RootFds | None] = [None] * len(sets)
    try:
        for paths in sets:
            real.append([])
            for path in paths:
                real[-1].append(os.open(path, _ROOT_OPEN))
        by_dev: dict[int, list[int]] = {}
        for i, fds in enumerate(real):
            by_dev.setdefault(os.fstat(fds[0]).st_dev, []).append(i)
        # (a group whose clone misses a root is split: by real mount, then one set each)
        queue = [(members, 0) for members in by_dev.values()]
        while queue:
            members, stage = queue.pop()
            done = _clone_sets(sets, real, members, out)
            if done is False:
                break  # no privilege: none will be cloned
            if done is None and len(members) > 1 and stage < 2:
                queue.extend((sub, stage + 1) for sub in _split(real, members, stage + 1))
    except BaseException:
        for fds in real + [o.fds for o in out if o is not None]:
            for fd in fds:
                os.close(fd)
        raise
    for i, o in enumerate(out):
        if o is not None:
            for fd in real[i]:
                os.close(fd)
    return [o if o is not None else RootFds(real[i], False) for i, o in enumerate(out)]


def _split(real: list[list[int]], members: list[int], stage: int) -> list[list[int]]:
    """``members`` by the real mount of their first root (stage 1), or one each."""
    if stage > 1:
        return [[i] for i in members]
    by_mount: dict[int | None, list[int]] = {}
    for i in members:
        by_mount.setdefault(mount_id(real[i][0]), []).append(i)
    return list(by_mount.values())


def _clone_sets(sets: list[list[str]], real: list[list[int]], members: list[int],
                out: list[RootFds | None]) -> bool | None:
    """The sets ``members`` beneath one clone, into ``out``: True; None when a root is not
    in it (nothing kept); False when no clone can be made (no privilege, no ``open_tree``)."""
    paths = [p for i in members for p in sets[i]]
    fds = _beneath_clone(paths, [fd for i in members for fd in real[i]])
    if not isinstance(fds, list):
        return fds
    for i in members:
        out[i] = RootFds(fds[:len(sets[i])], True)
        del fds[:len(sets[i])]
    return True


def _beneath_clone(paths: list[str], real: list[int]) -> list[int] | bool | None:
    """Fds of ``paths`` resolved beneath a clone of their common directory, each checked
    to be the object of its ``real`` fd; None (logged) when a root is not found in it or
    the mount cannot be cloned (EINVAL: locked mounts beneath), False when no mount can be
    (EPERM, ENOSYS)."""
    top = os.path.commonpath(paths)
    try:
        top_fd = real[0] if top == paths[0] else os.open(top, _ROOT_OPEN)
    except OSError as e:
        log.debug("layer roots %s: cannot open %s (%s)", ", ".join(paths), top, e.strerror)
        return None
    try:
        # each root on the mount of ``top`` itself: a root on another mount of the same
        # directory (``mount --bind x x``, then ``remount,bind,rw`` inside a read-only
        # mount, or idmapped) is the same object in the clone, but not with its mount's
        # flags (review27)
        top_mount = mount_id(top_fd)
        other = next((p for p, fd in zip(paths, real) if mount_id(fd) != top_mount), None)
        if other is not None:
            log.debug("layer root %s: on another mount than %s", other, top)
            return None
        clone = sysapi.clone_tree(top_fd)
    except OSError as e:
        if e.errno not in _DECLINED:
            raise
        log.debug("layer roots %s: no private clone (%s)", ", ".join(paths), e.strerror)
        return False if e.errno in (errno.EPERM, errno.ENOSYS) else None
    finally:
        if top != paths[0]:
            os.close(top_fd)
    fds: list[int] = []
    try:  # (the fds beneath the clone keep it; its own fd goes)
        for path, fd in zip(paths, real):
            rel = os.path.relpath(path, top)
            mine = sysapi.openat2(clone, rel, _ROOT_OPEN)
            fds.append(mine)
            if not same_file(os.fstat(mine), os.fstat(fd)):
                # a mount between ``top`` and ``path``: the clone shows what it covers
                raise OSError(errno.EXDEV, "another mount lies between it and " + top)
    except OSError as e:  # (ELOOP: a symlink on the way, for a path not canonical)
        log.debug("layer root %s: not found in the clone of %s (%s)", path, top, e.strerror)
        for mine in fds:
            os.close(mine)
        return None
    except BaseException:
        for mine in fds:
            os.close(mine)
        raise
    finally:
        os.close(clone)
    log.debug("layer roots %s beneath a private clone of the mount at %s", ", ".join(paths), top)
    return fds
