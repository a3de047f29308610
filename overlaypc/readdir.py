"""Merged directory listings.

Owns: ``merged_listing`` — the union of a merged directory's layers, top first, with
no duplicates, no whiteout entries and no OCI marker names. A whiteout (or OCI
``.wh.NAME``, in any layer) in one layer hides NAME only in the layers *below* it. Each entry carries
``st_mode`` and ``st_ino``: every READDIR entry carries both (glibc drops an entry whose d_ino is 0).
"""
from __future__ import annotations

import stat
from operator import itemgetter

from . import faults, whiteout
from .attrs import MERGED_DIR_NLINK, Attr
from .inumbers import InodeNumbers
from .layer import DirFd, Listed, join
from .lookup import Entry, Kept, ListedDir, Node
from .typing_lite import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .dirnames import LowerNames
    from .layer import Layer
    from .ownership import Ownership


_S_IFREG = stat.S_IFREG
_S_IFDIR = stat.S_IFDIR
_S_IFCHR = stat.S_IFCHR


class DirEntry(NamedTuple):
    """One merged entry (a named tuple: one is made per entry listed)."""
    name: str
    mode: int
    ino: int
    #: full attributes (``plus`` listings), as ``stat`` of the entry would show them
    attr: "Attr | None" = None


#: makes a named tuple from a tuple of its fields without its Python-level ``__new__``
_new_tuple = tuple.__new__
#: a ``Listed``'s name (``map``ped: no Python code per entry)
_first = itemgetter(0)


def merged_listing(node: Node, inos: InodeNumbers, xattr_prefix: str, *,
                   plus: bool = False, ownership: "Ownership | None" = None,
                   names: "LowerNames | None" = None,
                   files: "dict[str, Kept] | None" = None,
                   metacopy: bool = False) -> list[DirEntry]:
    """The merged entries of directory ``node``: lower entries cost no stat (``d_type``
    and ``d_ino`` suffice); upper ones are stat'ed, as a copied-up object shows the
    inode number it recorded. ``plus`` (READDIRPLUS) stats every entry and gives its
    attributes too where they are exactly what ``getattr`` shows, so the kernel needs no
    LOOKUP round trip per name: not for hard links (index-backed names and link-count
    bookkeeping need the full lookup) nor, with ``metacopy`` (the mount's option), for
    regular files (their blocks may come from below). ``ownership`` then turns their owner
    and mode into what ``getattr`` shows. ``names``: where the
    names of the lower layers' directories, read here anyway, are kept for lookups.
    ``files`` (with ``plus``) gets each shown regular file with one link, by name, as
    ``lookup.Kept`` (a listing's): the whole merged object at its name unless it has a metacopy
    mark (a hard link may have an index entry), for ``Lookup.keep_listing``.

    A directory's attributes show ``st_nlink`` 1 where it is merged (``Node.merged_dir``,
    the kernel's): a directory of its name in a layer below, and the top one not opaque.
    One with a ``redirect`` xattr (one the lookup may follow, or fail on: a malformed one,
    any under ``redirect_dir=nofollow``) instead comes without attributes: the kernel's
    LOOKUP decides (with them, the kernel makes its dentry without one)."""
    if plus and len(node.entries) == 1:
        one = _one_layer_plus(node, inos, xattr_prefix, ownership, names, files, metacopy)
        if one is not None:
            return one
    tops: dict[str, tuple[Entry, Listed, DirFd]] = {}
    #: each layer's directory as ``files``' kept entries name it (one per layer listed)
    wheres: dict[int, ListedDir] = {}  # (by layer index)
    lower_dir_ino: dict[str, int] = {}
    hidden: set[str] = set()
    oci_prefix = whiteout.OCI_PREFIX
    for parent in node.entries:
        layer = parent.layer
        dirfd = parent.dirfd or layer.dir_fd(parent.rel)
        if dirfd is None:
            continue  # removed underneath us
        if files is not None:
            wheres[layer.index] = ListedDir(layer, parent.rel, parent if dirfd is parent.dirfd else None)
        hides: set[str] = set()
        items = layer.scandir(dirfd, stat_all=plus or layer.writable)
        if names is not None and not layer.writable:
            names.offer(layer, parent.rel, [item.name for item in items])
        for item in items:
            name = item.name
            if name in hidden:
                continue
            if name.startswith(oci_prefix):  # any layer: the upper may hold them too
                if name != whiteout.OCI_OPAQUE:
                    hides.add(name[len(oci_prefix):])
                continue  # (an upper never shows OCI names either; they cannot be created)
            if item.fmt == _S_IFCHR and item.st is not None and whiteout.is_whiteout(item.st):
                hides.add(name)
                continue
            top = tops.get(name)
            if top is None:
                tops[name] = (parent, item, dirfd)
            elif top[1].fmt != _S_IFDIR or name in lower_dir_ino:
                pass
            elif item.fmt != _S_IFDIR:
                # a non-directory below a directory ends its lookup (``Lookup._lookup_in``,
                # the kernel's): a directory of the name further down is not merged with it
                hides.add(name)
            elif not layer.writable:
                lower_dir_ino[name] = inos.xino.ino(layer.dev, item.ino)
        hidden |= hides
    if faults.armed:
        faults.hit("readdir.scanned", node.rel)  # test-only (faults.py)

    out: list[DirEntry] = []
    append = out.append
    xino = inos.xino.ino
    xbits = inos.xino.bits  # (0: real numbers as they are, ``Xino.ino`` not called)
    for name, (parent, item, dirfd) in tops.items():
        layer = parent.layer
        st = item.st
        fmt = item.fmt
        if files is not None and fmt == _S_IFREG and st is not None and st.st_nlink == 1:
            files[name] = (wheres[layer.index], st)
        below = name in lower_dir_ino
        opaque: bool | None = None  # (read once, where needed)
        if not layer.writable:  # a lower entry: its own number
            ino = xino(layer.dev, item.ino) if xbits else item.ino
        else:
            assert st is not None
            # its xattrs through the listed directory's fd (one ``lgetxattr`` of dirfd/name
            # each), never by path: a directory above may be renamed meanwhile, and the
            # path then names another object (whose origin ``recorded`` would keep for
            # this one) or nothing
            entry = Entry(layer, join(parent.rel, name), st, None, dirfd)
            recorded = inos.recorded(entry)
            if recorded is not None:
                ino = recorded
            elif below and not (opaque := whiteout.is_opaque_at(layer, dirfd, name,
                                                                xattr_prefix)):
                ino = lower_dir_ino[name]  # a merged dir shows its topmost lower's number
            else:
                ino = inos.of_entry(entry)
        attr = None
        if plus and st is not None and (st.st_nlink == 1 or fmt == _S_IFDIR) \
                and not (metacopy and fmt == _S_IFREG):
            nlink = None
            if fmt == _S_IFDIR:
                merged = _merged_dir(layer, dirfd, name, below, opaque, inos, xattr_prefix)
                if merged is None:
                    append(_new_tuple(DirEntry, (name, fmt, ino, None)))
                    continue
                nlink = MERGED_DIR_NLINK if merged else None
            attr = _new_tuple(Attr, (st, ino, nlink, None, None, None, None))
            if ownership is not None:
                attr = ownership.show(attr, ownership.stored_at(layer, st, dirfd.fd, name))
        append(_new_tuple(DirEntry, (name, fmt, ino, attr)))
    return out


def _one_layer_plus(node: Node, inos: InodeNumbers, xattr_prefix: str,
                    ownership: "Ownership | None", names: "LowerNames | None",
                    files: "dict[str, Kept] | None", metacopy: bool) -> list[DirEntry] | None:
    """``merged_listing(plus=True)`` of a directory found in one layer only, in one pass
    over its entries: a lower one (a cold ``find`` of a lower tree lists nothing else) or
    an upper one (upper-only or opaque: what an untar made, listed twice per directory by
    an ``rm -rf``). Nothing above hides a name and no name repeats, so there is nothing to
    merge; whiteouts and OCI names are left out, no directory is merged (its ``st_nlink``
    as listed; one with a ``redirect`` xattr comes without attributes, ``_merged_dir``). A
    lower entry shows its own number (``d_ino``, through xino), an upper one its
    ``recorded`` number, else its own (``InodeNumbers.upper_listed``). The same entries in
    the same order as the general pass (``tests/test_listing_one_lower.py``; None would
    leave the listing to that pass)."""
    parent = node.entries[0]
    layer = parent.layer
    dirfd = parent.dirfd or layer.dir_fd(parent.rel)
    if dirfd is None:
        return []  # removed underneath us
    items = layer.scandir(dirfd, stat_all=True)
    rel = parent.rel
    upper = layer.writable
    if names is not None and not upper:
        names.offer(layer, rel, list(map(_first, items)))
    if faults.armed:
        faults.hit("readdir.scanned", node.rel)  # test-only (faults.py)
    where = None if files is None else \
        ListedDir(layer, rel, parent if dirfd is parent.dirfd else None)  # (its kept files')
    out: list[DirEntry] = []
    append = out.append
    oci_prefix = whiteout.OCI_PREFIX
    xino, dev = inos.xino.ino, layer.dev
    xbits = inos.xino.bits  # (0: real numbers as they are, ``Xino.ino`` not called)
    if upper:  # (each with the number it shows; none of the loop's own below)
        items = inos.upper_listed(layer, dirfd, rel, [
            item for item in items
            if not (item[0].startswith(oci_prefix) or item[1] == _S_IFCHR and item[3].st_rdev == 0)])
        xbits = 0
        # (an upper directory's redirect is read where a lower layer is below it)
        bottom = not inos.lowers
    else:
        # (a directory of the bottom layer is never merged: no redirect is read)
        bottom = not inos.lowers or layer is inos.lowers[-1]
    for name, fmt, ino, st in items:
        if name.startswith(oci_prefix) or fmt == _S_IFCHR and st.st_rdev == 0:
            continue  # (an OCI name, a whiteout: a 0/0 character device)
        if xbits:
            ino = xino(dev, ino)
        if fmt == _S_IFREG:
            if st.st_nlink != 1:  # (a hard link: a LOOKUP decides)
                append(_new_tuple(DirEntry, (name, fmt, ino, None)))
                continue
            if files is not None:
                files[name] = (where, st)
            if metacopy:
                append(_new_tuple(DirEntry, (name, fmt, ino, None)))
                continue
        elif fmt == _S_IFDIR:
            if not bottom and layer.getxattr_name(dirfd, name, xattr_prefix + "redirect") \
                    is not None:
                append(_new_tuple(DirEntry, (name, fmt, ino, None)))
                continue
        elif st.st_nlink != 1:
            append(_new_tuple(DirEntry, (name, fmt, ino, None)))
            continue
        attr = _new_tuple(Attr, (st, ino, None, None, None, None, None))
        if ownership is not None:
            attr = ownership.show(attr, ownership.stored_at(layer, st, dirfd.fd, name))
        append(_new_tuple(DirEntry, (name, fmt, ino, attr)))
    return out


def _merged_dir(layer: "Layer", dirfd: DirFd, name: str, below: bool, opaque: bool | None,
                inos: InodeNumbers, prefix: str) -> bool | None:
    """Whether the listed directory ``name`` (in ``layer``, listed through ``dirfd``) is
    merged, as its lookup would find it: ``below`` (a directory of its name in a lower
    layer below, not hidden) and it is not opaque (``opaque``: None if not read yet). None
    where it has a ``redirect`` xattr, a directory of its name below or not, an empty one
    too: its lookup follows the redirect, not the name, or fails (a malformed one, EINVAL;
    any one under ``redirect_dir=nofollow``, EPERM); only a LOOKUP tells. A directory of
    the bottom layer is never merged (its redirect is never read)."""
    if below:
        if opaque is None:
            opaque = whiteout.is_opaque_at(layer, dirfd, name, prefix)
        if opaque:
            return False
    elif not inos.lowers or layer is inos.lowers[-1]:
        return False
    if layer.getxattr_name(dirfd, name, prefix + "redirect") is not None:
        return None
    return below
