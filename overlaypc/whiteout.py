"""The on-disk formats of deletions and opaque directories, in one place.

Kernel format (what overlaypc writes, and reads in every layer):
  * whiteout: a character device 0/0 at the deleted name;
  * opaque dir: xattr ``trusted.overlay.opaque = "y"`` (``user.overlay.opaque`` under
    ``-o userxattr``, as the kernel does).
OCI image format (read in lower layers only, never written):
  * ``.wh.NAME`` deletes NAME from the layers below;
  * ``.wh..wh..opq`` inside a directory makes it opaque.
Names starting ``.wh.`` are never listed through the mount and cannot be created.
"""
from __future__ import annotations

import os
import stat

from .layer import Layer, join, split

OCI_PREFIX = ".wh."
OCI_OPAQUE = ".wh..wh..opq"
WHITEOUT_MODE = stat.S_IFCHR  # mode 0000, device 0/0, as the kernel makes them


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


def is_opaque(layer: Layer, rel: str, prefix: str, *, oci: bool) -> bool:
    if layer.getxattr(rel, prefix + "opaque") == b"y":
        return True
    return oci and layer.lstat(join(rel, OCI_OPAQUE)) is not None


def make_whiteout(layer: Layer, rel: str) -> None:
    layer.do_mknod(rel, WHITEOUT_MODE, os.makedev(0, 0))


def set_opaque(layer: Layer, rel: str, prefix: str) -> None:
    layer.do_setxattr(rel, prefix + "opaque", b"y")
