"""``index=on``: the index dir's entries checked at mount, as the kernel's
``ovl_indexdir_cleanup`` / ``ovl_verify_index`` check them.

Owns: the verdict on each entry of ``workdir/index`` when a mount starts: ``scan`` reads
(nothing written, so a refused mount changes nothing), ``Scan.clean`` removes. As the
kernel:

- a ``#`` name (a leftover of an index entry being made or removed) goes;
- a whiteout stays (the kernel's mark of a file whose names all went, under ``nfs_export``),
  and so does a directory (verified only under ``nfs_export``, which overlaypc lacks);
- a name that is no overlay file handle, or an entry without a readable ``origin``, fails
  the mount (EINVAL, ENODATA: "failed to verify index"; the kernel aborts the mount rather
  than guess, and so does overlaypc);
- an ``origin`` other than the handle the name encodes: the entry is another file's
  (ESTALE): it goes, else a lower file would read another's data;
- an entry with no upper name left (one link, its own) goes when its origin no longer
  decodes in a lower layer, or decodes to another type (ESTALE: the lower file went), or
  when its overlay count (the kernel's ``nlink`` xattr, ``ovl_get_nlink``) is 0 or unknown
  (the lower file has one link left, the count is malformed or missing): an orphan, whose
  names all went (the kernel removes it at the last unlink; one left by a kill or an open
  file is removed here);
- a handle that fails to decode with another error than ESTALE fails the mount (the
  kernel's clean-up aborts on any error but ESTALE and an orphan: its exportfs answers
  only ENOMEM so; here also EMFILE, ENFILE...), except EPERM: a process without
  ``CAP_DAC_READ_SEARCH`` decodes no handle, and the kernel then has index off
  (``ovl_can_decode_fh``), which overlaypc does not follow: such an entry is kept.

One choice beyond the kernel: an entry without the kernel's count whose upper file has
overlaypc's own (``IndexDir.own_count``: only an overlaypc older than d5a0e4a wrote no
kernel count) is judged by that count, and the kernel's is written from it (``Scan.clean``),
so a kernel mounting the stack next keeps it too. The kernel takes the count as 0 and
removes the entry: the only copy of what the file's other names show, when an older
overlaypc removed the name it was written through.

Cost: a ``getxattr`` per entry, and an ``open_by_handle_at`` per entry with no upper name.
"""
from __future__ import annotations

import errno
import os
import stat

from . import faults, logs, sysapi, whiteout
from .index import INDEX_DIR, IndexDir
from .indexroots import MATCH, judge
from .layer import Layer
from .lookup import Entry
from .records import field, record
from .stack import LayerStack

log = logs.get("overlaypc.index")

_FB_HEADER = 21  # sizeof(struct ovl_fb): the shortest handle a name may encode


@record
class Doomed:
    """An entry to remove, and why (logged)."""
    name: str
    why: str


@record
class Counted:
    """An entry kept by overlaypc's own count, the kernel's missing: written as the
    kernel's too."""
    name: str
    count: int


@record
class Scan:
    """What ``scan`` found to remove, and to count; ``clean`` removes and writes it."""
    index: IndexDir
    doomed: list[Doomed] = field(default_factory=list)
    counted: list[Counted] = field(default_factory=list)

    def clean(self) -> None:
        work = self.index.work
        for d in self.doomed:
            log.warning("index=on: %s/%s/%s %s: removed, as the kernel does", work.path,
                        INDEX_DIR, d.name, d.why)
            work.do_remove_tree(f"{INDEX_DIR}/{d.name}")
        self.doomed.clear()
        for c in self.counted:
            log.warning("index=on: %s/%s/%s has overlaypc's count only (%d names): written "
                        "as the kernel's, which would remove it", work.path, INDEX_DIR,
                        c.name, c.count)
            self.index.set_nlink(f"{INDEX_DIR}/{c.name}", c.count)
        self.counted.clear()


def scan(stack: LayerStack, index: IndexDir) -> Scan:
    """The verdict on every entry of the index dir; raises OSError (EINVAL, ENODATA) naming
    the first entry the kernel would refuse to mount with. Writes nothing."""
    work = stack.work
    assert work is not None
    found = Scan(index)
    if work.lstat(INDEX_DIR) is None:
        return found
    for name, st in work.listdir(INDEX_DIR):
        if name.startswith("#"):
            found.doomed.append(Doomed(name, "is a leftover"))
            continue
        why = _verdict(stack, index, name, st, found)
        if why is not None:
            found.doomed.append(Doomed(name, why))
    return found


def _refuse(work: Layer, name: str, code: int, what: str) -> OSError:
    return OSError(code, f"index=on: {work.path}/{INDEX_DIR}/{name} {what}, as the kernel "
                   f"refuses it (remove it, or mount with index=off)")


def _verdict(stack: LayerStack, index: IndexDir, name: str, st: os.stat_result,
             found: Scan) -> str | None:
    """Why the entry ``name`` goes; None when it stays (one kept by overlaypc's own count
    is added to ``found.counted``); raises for one that fails the mount."""
    work = stack.work
    assert work is not None
    try:
        fh = _handle(bytes.fromhex(name))
    except ValueError:
        fh = None
    if fh is None:
        raise _refuse(work, name, errno.EINVAL, "is not named by an overlay file handle")
    if whiteout.is_whiteout(st) or stat.S_ISDIR(st.st_mode):
        return None
    rel = f"{INDEX_DIR}/{name}"
    origin = _handle(work.getxattr(rel, index.origin_xattr) or b"")
    if origin is None:
        raise _refuse(work, name, errno.ENODATA, f"has no readable {index.origin_xattr}")
    if origin != fh:
        return "is the copy of another file than its name says (origin)"
    if st.st_nlink != 1:
        return None  # (upper names are links of it: kept, as the kernel)
    try:
        lower = _decode(stack, origin, name)
    except OSError as e:
        if e.errno == errno.EPERM:
            return None  # (kept unjudged: without CAP_DAC_READ_SEARCH the kernel's is off)
        raise _refuse(work, name, e.errno, f"has an origin that fails to decode "
                      f"({os.strerror(e.errno)})") from e
    if lower is None:
        return "indexes a lower file that is gone"
    if stat.S_IFMT(lower.st_mode) != stat.S_IFMT(st.st_mode):
        return "indexes a lower file of another type"
    count, own = _count(index, Entry(work, rel, st), lower)
    if count <= 0:
        return "is an orphan (no name left)"
    if own:
        found.counted.append(Counted(name, count))
    return None


def _handle(raw: bytes) -> bytes | None:
    """The ``ovl_fb`` in ``raw`` (its own length, which ``raw`` may exceed), None where the
    kernel reads none: malformed, empty, another version or byte order, unknown flags."""
    if len(raw) < _FB_HEADER or raw[2] < _FB_HEADER:
        return None
    fb = raw[:raw[2]]
    return fb if judge(raw, fb) == MATCH else None


def _decode(stack: LayerStack, origin: bytes, name: str) -> os.stat_result | None:
    """``fstat`` of the lower object ``origin`` decodes to; None when no lower layer of its
    filesystem holds it any more (ESTALE); raises OSError for any other failure, at the
    first layer that gives one (the kernel's ``ovl_check_origin_fh`` stops there)."""
    parsed = sysapi.parse_ovl_origin(origin)
    if parsed is None:
        raise OSError(errno.EINVAL, "malformed origin")
    uuid, handle_type, fid = parsed
    for layer in stack.lowers:
        if layer.uuid != uuid:
            continue
        try:
            faults.hit("indexclean.decode", name)  # test-only (faults.py)
            fd = sysapi.open_by_handle(layer.mount_fd, handle_type, fid)
        except OSError as e:
            if e.errno != errno.ESTALE:
                raise
            continue
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    return None


def _count(index: IndexDir, entry: Entry, lower: os.stat_result) -> tuple[int, bool]:
    """The overlay count of an entry with no upper name, as the kernel's ``ovl_get_nlink``
    reads it at mount (0 where it cannot: a lower file with one link, no valid count), and
    whether overlaypc's own count stood in for the kernel's, which is missing."""
    if lower.st_nlink == 1:
        return 0, False
    raw = index.work.getxattr(entry.rel, index.kernel_nlink_xattr)
    if raw is None:
        own = index.own_count(entry.rel)
        return (int(own), True) if own is not None and own.isdigit() else (0, False)
    if raw[:1] not in (b"U", b"L") or raw[1:2] not in (b"+", b"-"):
        return 0, False
    try:
        delta = int(raw[1:])
    except ValueError:
        return 0, False
    return (entry.st.st_nlink if raw[:1] == b"U" else lower.st_nlink) + delta, False
