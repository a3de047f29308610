"""index45: ``index=on`` parity with the kernel's upper layout.

A copy-up of a lower name ``b`` of a hard-linked file whose index entry already exists
(``a`` written, or chmod'ed under ``metacopy=on``, first): the kernel links that name to
the index entry (``ovl_copy_up_one``: the inode's upper is the index entry, so only
``ovl_link_up`` runs) for an open for write, a truncate, a setattr, a rename and a link's
source; not for a setxattr (``ovl_xattr_set`` acts on the inode's upper, the index entry).
Checked: names, the overlay count the index records (``nlink`` "U%+d" with the link count
it is relative to), ``origin``, ``metacopy``, which names are links of the index entry;
and each side reads the other's upper.

Found: the names match where the daemon is told the name (RENAME, UNLINK). An OPEN,
SETATTR or LINK names a node, and ``a`` and ``b`` are one node (one overlay inode): the
daemon goes through its first name, ``a``, already linked, so ``b`` stays a lower name of
the indexed inode where the kernel links it (docs/ARCHITECTURE.md pitfall 7): the same
data, attributes, inode and overlay count, one upper link fewer, and either side mounts
the other's upper with the same view. No way to do better through FUSE: none of those
requests carries the name the caller used (a LOOKUP comes only for a name not cached).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import helpers
from features_support import KERNEL_INDEX, KERNEL_METACOPY, new_stack, ovl_xattr
from test_index import make_linked_lower

pytestmark = [pytest.mark.mount]

NEW = b"NEW data written through the first name, longer than the old\n" * 2
NAMES = ["a", "b", "sub/c"]


def _write(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(NEW)


#: what is done to ``b``, a lower name whose index entry exists (``a`` was written first)
OPS = {
    "write": lambda r: _write(r / "b"),
    "truncate": lambda r: os.truncate(r / "b", 5),
    "open_trunc": lambda r: open(r / "b", "wb").close(),
    "chmod": lambda r: os.chmod(r / "b", 0o600),
    "chown": lambda r: os.chown(r / "b", 1234, 5678),
    "utime": lambda r: os.utime(r / "b", ns=(10**18, 10**18)),
    "setxattr": lambda r: os.setxattr(r / "b", "user.k", b"v"),
    "rename": lambda r: os.rename(r / "b", r / "sub/b2"),
    "link": lambda r: os.link(r / "b", r / "sub/d"),
    "unlink": lambda r: os.unlink(r / "b"),
}

ALL = NAMES + ["sub/b2", "sub/d"]


def _observe(root: Path) -> dict:
    out = {}
    for name in ALL:
        p = root / name
        if not os.path.lexists(p):
            continue
        st = os.lstat(p)
        out[name] = (p.read_bytes(), st.st_nlink, st.st_mode & 0o7777, st.st_uid, st.st_mtime_ns == 10**18)
    inos = {os.lstat(root / n).st_ino for n in out}
    return {"names": out, "one_inode": len(inos) == 1}


def _count(p: Path, st: os.stat_result) -> int | None:
    """The overlay link count the kernel's ``trusted.overlay.nlink`` ("U%+d") records."""
    raw = ovl_xattr(p, "nlink")
    return st.st_nlink + int(raw[1:]) if raw and raw[:1] == b"U" else None


def _layout(upper: Path, work: Path) -> dict:
    """Upper names and index entries: type, the overlay count the index records, the
    defined overlay xattrs (``origin``, ``metacopy``), whether a name is a link of the
    index entry; and the raw link counts (``links``: upper inodes' own ``st_nlink``)."""
    index = {}
    for n in os.listdir(work / "index"):
        if not n.startswith("#"):
            p = work / "index" / n
            st = os.lstat(p)
            index[n] = (st.st_mode & 0o170000, _count(p, st), ovl_xattr(p, "origin"),
                        ovl_xattr(p, "metacopy"))
    inos = {(os.lstat(work / "index" / n).st_dev, os.lstat(work / "index" / n).st_ino)
            for n in index}
    names, links = {}, {}
    for dirpath, _dirs, files in os.walk(upper):
        for n in files:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(upper))
            if stat.S_ISCHR(st.st_mode):  # a whiteout (the kernel's may share one inode)
                names[rel] = "whiteout"
                continue
            names[rel] = ((st.st_dev, st.st_ino) in inos, _count(p, st), ovl_xattr(p, "origin"),
                          ovl_xattr(p, "metacopy"))
            links[rel] = st.st_nlink
    return {"upper": names, "index": index, "links": links}


def _both(op, tmp_base, layers_factory, overlay_mount, kernel_mount, opts=(), first=_write):
    lowers = make_linked_lower(layers_factory, tmp_base)
    ks, os_ = new_stack(lowers, tmp_base, "k"), new_stack(lowers, tmp_base, "o")
    seen = {}
    k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX + tuple(opts))
    first(k / "a")
    OPS[op](k)
    seen["kernel"] = _observe(k)
    helpers.force_unmount(k)
    extra = ",".join(("index=on",) + tuple(opts))
    m = overlay_mount(os_.options(extra))
    first(m.path / "a")
    OPS[op](m.path)
    seen["ours"] = _observe(m.path)
    m.unmount()
    return lowers, ks, os_, seen, extra


#: ops that name ``b`` to the daemon (RENAME, UNLINK: parent and name); the others arrive by
#: nodeid (OPEN, SETATTR, SETXATTR, LINK's source), and the node of ``a`` and ``b`` is one:
#: the daemon goes through its first name, ``a``, already linked (ARCHITECTURE pitfall 7)
BY_NAME = {"rename", "unlink"}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("meta", ["data", "metacopy"])
def test_copy_up_of_an_indexed_lower_name_as_the_kernel(op, meta, xfs_dir, layers_factory,
                                                        overlay_mount, kernel_mount):
    """``a`` written first (the index entry holds the data) or, with ``metacopy=on``, chmod'ed
    first (a metadata-only index entry), then ``op`` on ``b``."""
    if meta == "data":
        got = _both(op, xfs_dir, layers_factory, overlay_mount, kernel_mount)
    else:
        got = _both(op, xfs_dir, layers_factory, overlay_mount, kernel_mount, KERNEL_METACOPY,
                    first=lambda p: os.chmod(p, 0o640))
    lowers, ks, os_, seen, extra = got
    assert seen["ours"] == seen["kernel"]
    ours, theirs = _layout(os_.upper, os_.work), _layout(ks.upper, ks.work)
    if op not in BY_NAME and "b" in theirs["upper"] and "b" not in ours["upper"]:
        # the kernel linked the name the caller used; the daemon did not know it: the
        # same inode, data and overlay count, with one upper link fewer
        del theirs["upper"]["b"], theirs["links"]["b"]
        theirs["links"] = {n: v - 1 for n, v in theirs["links"].items()}
    assert ours == theirs
    # each side reads the other's upper
    k = kernel_mount(lowers, os_.upper, os_.work, KERNEL_INDEX + (KERNEL_METACOPY if meta != "data" else ()))
    assert _observe(k) == seen["kernel"]
    helpers.force_unmount(k)
    m = overlay_mount(ks.options(extra))
    assert _observe(m.path) == seen["kernel"]
