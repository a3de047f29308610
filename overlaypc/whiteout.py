"""The on-disk formats of deletions and opaque directories, in one place.

Kernel format (what overlaypc writes, and reads in every layer):
  * whiteout: a character device 0/0 at the deleted name;
  * opaque dir: xattr ``trusted.overlay.opaque = "y"`` (``user.overlay.opaque`` under
    ``-o userxattr``, as the kernel does).
OCI image format, also what fuse-overlayfs writes where it lacks privileges (read in
every layer, the upper too):
  * ``.wh.NAME`` deletes NAME from the layers below;
  * ``.wh..wh..opq`` inside a directory makes it opaque; so does
    ``user.fuseoverlayfs.opaque = "y"``.
Names starting ``.wh.`` are never listed through the mount and cannot be created.

``Format`` is what one mount writes, chosen at mount by probing the workdir:
``trusted.overlay.*`` unless that cannot be set (a user namespace: EPERM), then
``user.overlay.*`` as if ``userxattr`` had been given; whiteouts as 0/0 devices unless
``mknod`` of one is refused (at mount, or later), then as ``.wh.NAME`` files
(``make_marker``), as fuse-overlayfs does. A ``.wh.NAME`` file in the upper is a whiteout only while NAME
itself is absent from the upper: creating NAME there makes the marker inert (it is
removed right after), so every step order below leaves a consistent view after a crash.
"""
from __future__ import annotations

import errno
import os
import stat

from . import faults, logs
from .layer import DirFd, Layer, join, split
from .records import field, record

log = logs.get("overlaypc.whiteout")

OCI_PREFIX = ".wh."
OCI_OPAQUE = ".wh..wh..opq"
WHITEOUT_MODE = stat.S_IFCHR  # mode 0000, device 0/0, as the kernel makes them
#: fuse-overlayfs's own markers (written where trusted.* xattrs cannot be set)
FOO_PREFIX = "user.fuseoverlayfs."
FOO_OPAQUE = FOO_PREFIX + "opaque"
FOO_ORIGIN = FOO_PREFIX + "origin"
MARKER_MODE = 0o600


@record
class Format:
    """What this mount writes: the xattr namespace of its marks and the form of its
    whiteouts (``devices``: 0/0 character devices; else ``.wh.NAME`` files)."""
    prefix: str = "trusted.overlay."
    devices: bool = True
    #: why the probes chose a fallback, for the daemon's log
    notes: list[str] = field(default_factory=list)

    @property
    def userxattr(self) -> bool:
        return self.prefix == "user.overlay."

    def no_devices(self, where: str, why: str) -> None:
        if self.devices:
            self.devices = False
            note = (f"cannot make 0/0 whiteout devices in {where} ({why}): deletions are "
                    f"recorded as .wh.NAME files, as fuse-overlayfs does")
            self.notes.append(note)  # logged at mount (logging is set up after the probes)
            log.info("%s", note)  # a refusal met later


class WhiteoutRefused(OSError):
    """``mknod`` of a 0/0 device was refused (EPERM, ENOTSUP): nothing was changed."""


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def xattr_prefix(userxattr: bool) -> str:
    return "user.overlay." if userxattr else "trusted.overlay."


def own_xattr(prefix: str, name: str) -> str:
    """overlaypc's own xattrs live *inside* the kernel's private namespace
    (``trusted.overlay.overlaypc.NAME``), so the kernel's overlay hides them too."""
    return f"{prefix}overlaypc.{name}"


def is_oci_name(name: str) -> bool:
    return name.startswith(OCI_PREFIX)


def oci_whiteout_for(rel: str) -> str:
    parent, name = split(rel)
    return join(parent, OCI_PREFIX + name)


def has_oci_whiteout(layer: Layer, rel: str) -> bool:
    marker = oci_whiteout_for(rel)
    if len(os.fsencode(split(marker)[1])) > 255:
        return False  # a name of 252+ bytes cannot have a .wh. marker
    return layer.lstat(marker) is not None


def is_opaque(layer: Layer, rel: str, prefix: str) -> bool:
    """Whether directory ``rel`` of ``layer`` is opaque, in any of the formats read."""
    if layer.getxattr(rel, prefix + "opaque") == b"y" or layer.getxattr(rel, FOO_OPAQUE) == b"y":
        return True
    return layer.lstat(join(rel, OCI_OPAQUE)) is not None


def is_opaque_at(layer: Layer, parent: DirFd, name: str, prefix: str) -> bool:
    """``is_opaque`` of directory ``name`` in the open directory ``parent`` (no path walk:
    right while a directory above is renamed); False when it is gone."""
    dirfd = layer.dir_at(parent, name)
    if dirfd is None:
        return False
    if layer.getxattr_at(dirfd, prefix + "opaque") == b"y" or layer.getxattr_at(dirfd, FOO_OPAQUE) == b"y":
        return True
    return layer.stat_at(dirfd, OCI_OPAQUE) is not None


def make_whiteout(layer: Layer, rel: str) -> None:
    """A 0/0 character device at ``rel`` (the kernel's whiteout); ``WhiteoutRefused``
    where the kernel or the filesystem refuses to make one."""
    try:
        faults.hit("whiteout.mknod", rel)
        layer.do_mknod(rel, WHITEOUT_MODE, os.makedev(0, 0))
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP):
            raise WhiteoutRefused(e.errno, e.strerror, layer.path) from None
        raise


def make_marker(layer: Layer, rel: str) -> bool:
    """An empty ``.wh.NAME`` file beside ``rel`` (the whiteout of a mount whose ``mknod``
    of 0/0 devices is refused). Returns False when it was there already."""
    try:
        os.close(layer.do_create(oci_whiteout_for(rel), os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC,
                                 MARKER_MODE))
    except FileExistsError:
        return False
    return True


def clear_marker(layer: Layer, rel: str) -> None:
    """Remove the ``.wh.NAME`` file beside ``rel``, if any (NAME exists in ``layer`` now,
    or the operation that made the marker failed)."""
    marker = oci_whiteout_for(rel)
    if len(os.fsencode(split(marker)[1])) > 255:
        return
    try:
        layer.do_unlink(marker)
    except FileNotFoundError:
        pass


def set_opaque(layer: Layer, rel: str, prefix: str) -> None:
    """Mark directory ``rel`` opaque; where the filesystem takes no such xattr, with a
    ``.wh..wh..opq`` file inside it (as fuse-overlayfs does)."""
    try:
        layer.do_setxattr(rel, prefix + "opaque", b"y")
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        os.close(layer.do_create(join(rel, OCI_OPAQUE), os.O_WRONLY | os.O_CLOEXEC, MARKER_MODE))


PROBE_XATTR = "trusted.overlay.overlaypc.probe"
PROBE_NAME = "#ovlpc-probe"


def probe_xattrs(work: Layer | None, *, userxattr: bool) -> Format:
    """The xattr namespace this mount writes: ``trusted.overlay.*`` unless this process may
    not set trusted.* xattrs (unprivileged, or in a user namespace), then
    ``user.overlay.*``, as if ``userxattr`` had been given. Writes nothing: a replace of a
    missing attribute fails with EPERM at the permission check, else ENODATA. Read-only
    mounts write nothing at all: the kernel's formats then."""
    fmt = Format(xattr_prefix(userxattr))
    if work is None or userxattr:
        return fmt
    try:
        work.do_setxattr("", PROBE_XATTR, b"", os.XATTR_REPLACE)
    except OSError as e:
        if e.errno == errno.EPERM:
            fmt.prefix = xattr_prefix(True)
            fmt.notes.append(f"cannot set trusted.* xattrs in {work.path} ({e.strerror}; not "
                             f"privileged, or in a user namespace): writing user.overlay.* "
                             f"xattrs, as with -o userxattr")
        # ENODATA: allowed; ENOTSUP: no xattrs there at all, the first mark will say so
    else:
        work.do_removexattr("", PROBE_XATTR)  # it existed: a leftover of something else
    return fmt


def probe_devices(fmt: Format, work: Layer, work_dir: str) -> None:
    """Whether 0/0 whiteout devices can be made (old kernels refuse the unprivileged,
    some filesystems everyone): try one in ``work_dir`` of the locked workdir."""
    tmp = join(work_dir, f"{PROBE_NAME}-{os.getpid()}")
    work.do_remove_tree(tmp)  # a leftover of a probe that was killed
    try:
        make_whiteout(work, tmp)
    except WhiteoutRefused as e:
        fmt.no_devices(work.path, e.strerror)
        return
    work.do_unlink(tmp)
