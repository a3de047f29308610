"""Merged directory listings.

Owns: ``merged_listing`` — the union of a merged directory's layers, top first, with
no duplicates, no whiteout entries and no OCI marker names. A whiteout (or OCI
``.wh.NAME``) in one layer hides NAME only in the layers *below* it. Each entry carries
``st_mode`` and ``st_ino``: with ``use_ino`` libfuse needs both (DESIGN.md §6 trap 3).
"""
from __future__ import annotations

import stat
from dataclasses import dataclass

from . import whiteout
from .inumbers import InodeNumbers
from .layer import join
from .lookup import Entry, Node


@dataclass(frozen=True)
class DirEntry:
    name: str
    mode: int
    ino: int


def merged_listing(node: Node, inos: InodeNumbers, xattr_prefix: str) -> list[DirEntry]:
    tops: dict[str, Entry] = {}
    lower_dirs: dict[str, Entry] = {}
    hidden: set[str] = set()
    for parent in node.entries:
        layer = parent.layer
        hides: set[str] = set()
        for name, st in layer.listdir(parent.rel):
            if name in hidden:
                continue
            if not layer.writable and whiteout.is_oci_name(name):
                if name != whiteout.OCI_OPAQUE:
                    hides.add(name[len(whiteout.OCI_PREFIX):])
                continue
            if whiteout.is_whiteout(st):
                hides.add(name)
                continue
            top = tops.get(name)
            if top is None:
                tops[name] = Entry(layer, join(parent.rel, name), st)
            elif top.is_dir and stat.S_ISDIR(st.st_mode) and name not in lower_dirs and not layer.writable:
                lower_dirs[name] = Entry(layer, join(parent.rel, name), st)
        hidden |= hides
    out = []
    for name, entry in tops.items():
        if whiteout.is_oci_name(name):
            continue  # an upper never shows OCI names either; they cannot be created
        lower = lower_dirs.get(name)
        if lower is not None and whiteout.is_opaque(entry.layer, entry.rel, xattr_prefix, oci=False):
            lower = None  # an opaque upper dir merges nothing: it keeps its own number
        ino = inos.ino_of(Node(join(node.rel, name), (entry,)), lower)
        out.append(DirEntry(name, stat.S_IFMT(entry.st.st_mode), ino))
    return out
