"""Merged directory listings.

Owns: ``merged_listing`` — the union of a merged directory's layers, top first, with
no duplicates, no whiteout entries and no OCI marker names. A whiteout (or OCI
``.wh.NAME``, in any layer) in one layer hides NAME only in the layers *below* it. Each entry carries
``st_mode`` and ``st_ino``: every READDIR entry carries both (glibc drops an entry whose d_ino is 0).
"""
from __future__ import annotations

import stat

from . import whiteout
from .attrs import Attr
from .inumbers import InodeNumbers
from .layer import DirFd, Listed, join
from .lookup import Entry, Kept, Node
from .records import record
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .dirnames import LowerNames
    from .ownership import Ownership


_S_IFREG = stat.S_IFREG


@record(frozen=True)
class DirEntry:
    name: str
    mode: int
    ino: int
    #: full attributes (``plus`` listings), as ``stat`` of the entry would show them
    attr: "Attr | None" = None


def merged_listing(node: Node, inos: InodeNumbers, xattr_prefix: str, *,
                   plus: bool = False, ownership: "Ownership | None" = None,
                   names: "LowerNames | None" = None,
                   files: "dict[str, Kept] | None" = None) -> list[DirEntry]:
    """The merged entries of directory ``node``: lower entries cost no stat (``d_type``
    and ``d_ino`` suffice); upper ones are stat'ed, as a copied-up object shows the
    inode number it recorded. ``plus`` (READDIRPLUS) stats every entry and returns its
    attributes too, so the kernel needs no LOOKUP round trip per name; ``ownership``
    then turns their owner and mode into what ``getattr`` shows. ``names``: where the
    names of the lower layers' directories, read here anyway, are kept for lookups.
    ``files`` (with ``plus``) gets each shown regular file with one link, by name, as
    ``lookup.Kept`` (a listing's): the whole merged object at its name unless it has a metacopy
    mark (a hard link may have an index entry), for ``Lookup.keep_listing``."""
    tops: dict[str, tuple[Entry, Listed, DirFd]] = {}
    lower_dir_ino: dict[str, int] = {}
    hidden: set[str] = set()
    for parent in node.entries:
        layer = parent.layer
        dirfd = parent.dirfd or layer.dir_fd(parent.rel)
        if dirfd is None:
            continue  # removed underneath us
        hides: set[str] = set()
        items = layer.scandir(dirfd, stat_all=plus or layer.writable)
        if names is not None and not layer.writable:
            names.offer(layer, parent.rel, [item.name for item in items])
        for item in items:
            name = item.name
            if name in hidden:
                continue
            if whiteout.is_oci_name(name):  # any layer: the upper may hold them too
                if name != whiteout.OCI_OPAQUE:
                    hides.add(name[len(whiteout.OCI_PREFIX):])
                continue
            if item.fmt == stat.S_IFCHR and item.st is not None and whiteout.is_whiteout(item.st):
                hides.add(name)
                continue
            top = tops.get(name)
            if top is None:
                tops[name] = (parent, item, dirfd)
            elif (top[1].fmt == stat.S_IFDIR and item.fmt == stat.S_IFDIR and not layer.writable
                  and name not in lower_dir_ino):
                lower_dir_ino[name] = inos.xino.ino(layer.dev, item.ino)
        hidden |= hides
    def attr(layer, item: Listed, dirfd: DirFd, ino: int) -> Attr:
        shown = Attr(item.st, ino)
        if ownership is None:
            return shown
        return ownership.show(shown, ownership.stored_at(layer, item.st, dirfd.fd, item.name))

    out = []
    for name, (parent, item, dirfd) in tops.items():
        if whiteout.is_oci_name(name):
            continue  # an upper never shows OCI names either; they cannot be created
        layer = parent.layer
        st = item.st
        if files is not None and item.fmt == _S_IFREG and st is not None and st.st_nlink == 1:
            files[name] = (layer, parent.rel, st)
        if not layer.writable:  # a lower entry: its own number
            ino = inos.xino.ino(layer.dev, item.ino)
            out.append(DirEntry(name, item.fmt, ino, attr(layer, item, dirfd, ino) if item.st else None))
            continue
        assert item.st is not None
        entry = Entry(layer, join(parent.rel, name), item.st)
        recorded = inos.recorded(entry)
        if recorded is not None:
            ino = recorded
        elif name in lower_dir_ino and not whiteout.is_opaque(layer, entry.rel, xattr_prefix):
            ino = lower_dir_ino[name]  # a merged dir shows its topmost lower's number
        else:
            ino = inos.of_entry(entry)
        out.append(DirEntry(name, item.fmt, ino, attr(layer, item, dirfd, ino) if plus else None))
    return out
