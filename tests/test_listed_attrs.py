"""READDIRPLUS attributes of a listing served in several chunks, without FUSE.

A listing is read once, by the request for its first chunk (offset 0), and the later chunks
are served from it (its snapshot, ``listings``). The kernel
takes an entry's attributes as current unless a change of its own came after it *sent* the
request (``fuse_change_attributes``' attr_version check): a stat read by an earlier request
is older than that. So a later chunk gives each entry attributes read in its own request;
a stale size, for one, becomes the kernel's ``i_size`` for the attribute timeout, and reads
then stop at it.
"""
from __future__ import annotations

import os

import pytest

from overlaypc.engine import protocol as p
from overlaypc.engine.ops import ConnInfo
from overlaypc.engine.protocol import SetAttr
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, look, make_ops, stack  # noqa: F401 (a fixture)


@pytest.fixture(params=["not-offered", "zero-opendir"])
def ops(stack, request):  # noqa: F811
    ops, close = make_ops(stack)
    ops.init(ConnInfo(7, 45, p.NO_OPENDIR_SUPPORT if request.param == "zero-opendir" else 0))
    yield ops
    close()


def _first_chunk(ops) -> tuple[int, int]:
    """(handle, cookie after ".."): a listing of the root read by its first chunk's request,
    which ended before the files (none of its entries taken)."""
    fh = ops.opendir(REQ, ROOT_ID).fh   # (0 either way: ``listings``)
    items = list(ops.readdir(REQ, ROOT_ID, fh, 0, True))
    assert [i.name for i in items[:2]] == [b".", b".."]
    return fh, items[1].offset


def _next_chunk(ops, fh: int, offset: int, name: bytes):
    (item,) = [i for i in ops.readdir(REQ, ROOT_ID, fh, offset, True) if i.name == name]
    (entry,) = ops.take_entries(REQ, ROOT_ID, [item])
    return entry


def test_a_held_name_written_between_two_chunks_gets_its_new_size(ops):
    """The kernel holds "f"; between two chunks it grows through the mount (the kernel saw
    the write): the next chunk must not give the size the listing read."""
    f = look(ops, "f")
    fh, offset = _first_chunk(ops)
    opened = ops.open(REQ, f, os.O_WRONLY)
    ops.write(REQ, f, opened.fh, memoryview(b"and more\n"), 8, 0)
    ops.release(REQ, f, opened.fh)
    entry = _next_chunk(ops, fh, offset, b"f")
    # no attributes (the kernel keeps its own, which saw the write) or the fresh ones
    assert entry is None or (entry.nodeid == f and entry.attr.size == 17
                             and entry.attr == ops.getattr(REQ, f).attr), entry


def test_a_name_chmodded_between_two_chunks_gets_its_new_mode(ops):
    """An upper file changes mode between two chunks (no namespace change: no epoch moves)
    and the kernel forgot it meanwhile: the next chunk gives the new mode."""
    entry, opened = ops.create(REQ, ROOT_ID, b"u", os.O_WRONLY, 0o644)
    ops.release(REQ, entry.nodeid, opened.fh)
    ops.forget(entry.nodeid, 1)
    fh, offset = _first_chunk(ops)
    u = look(ops, "u")
    ops.setattr(REQ, u, SetAttr(p.FATTR_MODE, None, 0, None, None, 0o100600, 0, 0))
    ops.forget(u, 1)
    got = _next_chunk(ops, fh, offset, b"u")
    assert got.attr.mode & 0o7777 == 0o600 and got.attr == ops.getattr(REQ, got.nodeid).attr


def test_a_name_truncated_by_open_between_two_chunks_gets_its_new_size(ops):
    """An upper file is emptied by an open with O_TRUNC (no namespace change, no SETATTR)
    between two chunks, the kernel not holding it after: the next chunk gives size 0."""
    entry, opened = ops.create(REQ, ROOT_ID, b"u", os.O_WRONLY, 0o644)
    ops.write(REQ, entry.nodeid, opened.fh, memoryview(b"content"), 0, 0)
    ops.release(REQ, entry.nodeid, opened.fh, os.O_WRONLY)
    ops.forget(entry.nodeid, 1)
    fh, offset = _first_chunk(ops)
    u = look(ops, "u")
    opened = ops.open(REQ, u, os.O_WRONLY | os.O_TRUNC)
    ops.release(REQ, u, opened.fh)  # (as a read-only release would count: flags 0)
    ops.forget(u, 1)
    got = _next_chunk(ops, fh, offset, b"u")
    assert got is not None and got.attr.size == 0, got


def test_a_name_stripped_by_a_truncating_open_between_two_chunks_gets_its_new_mode(
        ops, monkeypatch):
    """A read-only open with O_TRUNC by a caller without CAP_FSETID truncates, then strips
    the setuid bit (OPEN_KILL_SUIDGID); the listing is read between the two, and the
    kernel forgets the file after its close (a read-only release counts nothing): the next
    chunk must give the mode without setuid. Before: the change was counted after the
    truncate only, so the listing's 0o4755 came back as current."""
    entry, opened = ops.create(REQ, ROOT_ID, b"u", os.O_WRONLY, 0o644)
    ops.write(REQ, entry.nodeid, opened.fh, memoryview(b"content"), 0, 0)
    ops.setattr(REQ, entry.nodeid, SetAttr(p.FATTR_MODE, None, 0, None, None, 0o104755, 0, 0))
    ops.release(REQ, entry.nodeid, opened.fh, os.O_WRONLY)
    ops.forget(entry.nodeid, 1)
    u = look(ops, "u")
    chunk = []
    real = ops._kill_privs

    def listed_first(*args, **kwargs):  # the listing read right before the strip
        if not chunk:
            chunk.append(_first_chunk(ops))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_kill_privs", listed_first)
    opened = ops.open(REQ, u, os.O_RDONLY | os.O_TRUNC, p.OPEN_KILL_SUIDGID)
    monkeypatch.undo()
    ops.release(REQ, u, opened.fh, os.O_RDONLY)
    ops.forget(u, 1)
    (fh, offset), = chunk
    got = _next_chunk(ops, fh, offset, b"u")
    assert got is not None and got.attr.mode & 0o7777 == 0o755, got
    assert got.attr.size == 0


def test_a_later_chunk_with_nothing_changed_gives_the_listed_entries(ops):
    """Nothing changed since the listing: a later chunk's names the kernel does not hold
    come with their attributes (no LOOKUP round trip each), those it holds without."""
    f = look(ops, "f")
    fh, offset = _first_chunk(ops)
    held = _next_chunk(ops, fh, offset, b"f")
    assert held is None
    names = [i.name for i in ops.readdir(REQ, ROOT_ID, fh, offset, True)]
    other = b"d"
    assert other in names
    got = _next_chunk(ops, fh, offset, other)
    assert got is not None and got.nodeid and got.nodeid != f
    assert got.attr == ops.getattr(REQ, got.nodeid).attr


# -- through a real mount --------------------------------------------------------------------
NAMES = [f"file-{i:04d}-{'x' * 40}" for i in range(3000)]  # many READDIRPLUS chunks


@pytest.mark.mount
@pytest.mark.parametrize("opts", ["", ",cache=shared"])
def test_a_file_written_while_its_directory_is_listed_reads_whole(layers_factory, overlay_mount,
                                                                  opts):
    """``ls -l`` runs while a file of the directory grows: the listing's later chunk must
    not give the kernel the size read at the listing's start (which then keeps it as the
    file's size for the attribute timeout: stat shows it and reads stop at it)."""
    layers = layers_factory({"low": {"big": {}}})
    upper = layers_factory.empty_dir("upper")
    (upper / "big").mkdir()
    for name in NAMES:
        (upper / "big" / name).write_bytes(b"")
    target = os.listdir(upper / "big")[-1]  # (the upper's own order: listed last)
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}{opts}")
    big = m.path / "big"
    with os.scandir(big) as it:
        next(it)  # the first chunk: the listing is read
        with open(big / target, "ab") as f:
            f.write(b"grown\n")
        rest = [e.name for e in it]
    assert target in rest
    assert os.stat(big / target).st_size == 6
    assert (big / target).read_bytes() == b"grown\n"
