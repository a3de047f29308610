"""``index=on``: which upper and lower layers an index belongs to, checked at mount.

Owns: the kernel's two stack-identity xattrs (its ``ovl_get_indexdir``): the upper root's
``<prefix>origin``, the file handle of the top lower layer's root, and the index dir's
``<prefix>upper``, the upper root's handle (flagged as an upper one). Index entries are
named by lower file handles and are hard links of upper files, so an upper used over other
lowers, or a workdir used with another upper, would serve wrong links: such a mount is
refused (ESTALE, as the kernel's "failed to verify upper root origin" / "failed to verify
index dir 'upper' xattr"), and absent values are written, so a stack first mounted by
overlaypc is checked by the kernel and the other way round. Stored values are judged as
the kernel's ``ovl_get_fh``/``ovl_verify_fh`` judge them: the whole ``ovl_fb`` is
compared; a value the kernel reads as "origin unknown" (empty, a newer version, unknown
flags, the other byte order) is overwritten as if absent, and so is a malformed one, with a
warning (the kernel's "invalid origin").

Order: ``verify`` runs before the mount writes anything, so a refused stack is left as it
was (the kernel writes the upper root's origin before it checks the index dir; an accepted
mount ends the same); ``RootCheck.record`` writes once the index dir exists. The caller
holds the upper and workdir locks across both.

``without_handles``: a layer whose filesystem cannot encode file handles (a kernel overlay
without ``nfs_export``, ...) makes the kernel fall back to ``index=off`` with a warning;
overlaypc does the same (OverlayFS), with no index dir and nothing written.

Caveats: a kernel mounted with ``uuid=off`` records a null filesystem UUID; overlaypc
(like the kernel's default) then sees another origin and refuses. The kernel's legacy
index-dir ``origin`` (an upper handle older kernels stored there) is only logged when it
differs, as the kernel only logs it. Two lower filesystems with one UUID (the kernel then
also turns index off) are not detected.
"""
from __future__ import annotations

import errno
import sys

from . import logs, sysapi
from .layer import Layer
from .records import field, record
from .stack import LayerStack

log = logs.get("overlaypc.index")

INDEX_DIR = "index"  # (index.INDEX_DIR; not imported: index.py is the copy-up's side)

_FB_HEADER = 21  # sizeof(struct ovl_fb) before the fid
_FB_MAGIC = 0xFB
_FB_FLAGS = (sysapi.OVL_FH_FLAG_BIG_ENDIAN | sysapi.OVL_FH_FLAG_ANY_ENDIAN
             | sysapi.OVL_FH_FLAG_PATH_UPPER)
_CPU_BIG = sysapi.OVL_FH_FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0

ABSENT, MATCH, OTHER, MALFORMED = "absent", "match", "other", "malformed"


def judge(stored: bytes | None, wanted: bytes) -> str:
    """How the kernel reads a stored handle against the one it wants: ABSENT (none, or
    one it treats as unknown), MALFORMED (warned about), both overwritten; MATCH; or OTHER
    (refused: ESTALE)."""
    if not stored:
        return ABSENT
    if len(stored) < _FB_HEADER or len(stored) < stored[2] or stored[1] != _FB_MAGIC:
        return MALFORMED
    flags = stored[3]
    if stored[0] > 0 or flags & ~_FB_FLAGS:
        return ABSENT
    if not flags & sysapi.OVL_FH_FLAG_ANY_ENDIAN and (flags & sysapi.OVL_FH_FLAG_BIG_ENDIAN) != _CPU_BIG:
        return ABSENT
    size = stored[2]
    return MATCH if size == len(wanted) and stored[:size] == wanted else OTHER


def root_handle(layer: Layer, *, upper: bool = False) -> bytes | None:
    """The kernel's encoding of the layer root's file handle; None where its filesystem
    cannot encode one."""
    return sysapi.ovl_origin_xattr(layer.mount_fd, layer.uuid, upper=upper)


def _what(layer: Layer) -> str:
    return f"{'upperdir' if layer.name == 'upper' else 'lowerdir'} {layer.path}"


def without_handles(stack: LayerStack) -> str | None:
    """The first layer (as ``upperdir PATH`` / ``lowerdir PATH``) whose filesystem cannot
    encode file handles, which index=on needs on every layer; None when all can."""
    for layer in ([stack.upper] if stack.upper is not None else []) + stack.lowers:
        if root_handle(layer) is None:
            return _what(layer)
    return None


@record
class Pending:
    """An absent identity xattr, written by ``RootCheck.record``."""
    layer: Layer
    rel: str
    name: str
    value: bytes


@record
class RootCheck:
    """What ``verify`` found missing; ``record`` writes it once the index dir exists."""
    pending: list[Pending] = field(default_factory=list)

    def record(self) -> None:
        for p in self.pending:
            p.layer.do_setxattr(p.rel, p.name, p.value)
        self.pending.clear()


def verify(stack: LayerStack, prefix: str) -> RootCheck:
    """Check the upper root's origin and the index dir's upper handle against this stack;
    raise OSError (ESTALE) with a message naming the option and the directories when
    either is another stack's. Writes nothing."""
    upper, work, lower = stack.upper, stack.work, stack.lowers[0]
    assert upper is not None and work is not None
    origin_name, upper_name = prefix + "origin", prefix + "upper"
    wanted_origin = root_handle(lower)
    wanted_upper = root_handle(upper, upper=True)
    if wanted_origin is None or wanted_upper is None:  # (without_handles turned index off)
        raise OSError(errno.EOPNOTSUPP, "index=on needs file handles on every layer")
    check = RootCheck()

    state = judge(upper.getxattr("", origin_name), wanted_origin)
    if state == OTHER:
        raise OSError(errno.ESTALE,
                      f"index=on: upperdir {upper.path} was used over another lower layer than "
                      f"lowerdir {lower.path} (the {origin_name} of its root names another "
                      f"directory); mount it over the lower layers it was made with, or with "
                      f"index=off")
    if state == MALFORMED:
        log.warning("index=on: the %s of upperdir %s is not an overlay file handle; "
                    "overwritten, as the kernel does", origin_name, upper.path)
    if state in (ABSENT, MALFORMED):
        check.pending.append(Pending(upper, "", origin_name, wanted_origin))

    index_path = f"{work.path}/{INDEX_DIR}"
    if work.lstat(INDEX_DIR) is None:
        check.pending.append(Pending(work, INDEX_DIR, upper_name, wanted_upper))
        return check
    state = judge(work.getxattr(INDEX_DIR, upper_name), wanted_upper)
    if state == OTHER:
        raise OSError(errno.ESTALE,
                      f"index=on: workdir {work.path} was used with another upperdir than "
                      f"{upper.path} (the {upper_name} of {index_path} names another "
                      f"directory); use it with its own upperdir, or remove {index_path}, or "
                      f"mount with index=off")
    if state == MALFORMED:
        log.warning("index=on: the %s of %s is not an overlay file handle; overwritten, as "
                    "the kernel does", upper_name, index_path)
    if state in (ABSENT, MALFORMED):
        check.pending.append(Pending(work, INDEX_DIR, upper_name, wanted_upper))
    legacy = work.getxattr(INDEX_DIR, origin_name)
    if legacy is not None and judge(legacy, wanted_upper) != MATCH:
        # the kernel reports this ("failed to verify index dir 'origin' xattr") and goes on
        log.warning("index=on: the %s of %s (written by an older kernel) is not the handle "
                    "of upperdir %s", origin_name, index_path, upper.path)
    return check
