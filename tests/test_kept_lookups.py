"""A read-only open reuses the file the kernel's last LOOKUP, GETATTR or READDIRPLUS found
(``Lookup.recent``) only while no change of the namespace ran since: each test keeps a name
(a lookup or a listing), changes what the name resolves to in some way, and checks that the
open reads what the name shows now. Driven on a real ``OverlayFS`` over plain directories
(no FUSE), so each step runs exactly when the test says; one test through a mount."""
from __future__ import annotations

import gc
import os
import stat
import threading
from pathlib import Path

import pytest

from overlaypc import lookup as lookup_mod
from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS


@pytest.fixture
def fs_factory(tmp_path: Path):
    made = []

    def make(lower: dict[str, bytes], *, upper: dict[str, bytes] | None = None, **options) -> OverlayFS:
        root = tmp_path / f"m{len(made)}"
        for layer, files in (("lower", lower), ("upper", upper or {})):
            (root / layer).mkdir(parents=True)
            for rel, data in files.items():
                path = root / layer / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        for name in ("work", "mnt"):
            (root / name).mkdir()
        cfg = MountConfig(lowers=[str(root / "lower")], upper=str(root / "upper"),
                          work=str(root / "work"), mountpoint=str(root / "mnt"), **options)
        validate(cfg)
        fs = OverlayFS(cfg)
        fs.start()
        made.append(fs)
        fs.root = root  # type: ignore[attr-defined]
        return fs

    old = os.umask(0)
    yield make
    for fs in made:
        fs.close()
    os.umask(old)


def read_all(fs: OverlayFS, rel: str) -> bytes:
    fh = fs.open(rel, os.O_RDONLY).fh
    try:
        return fs.read(fh, 1 << 16, 0)
    finally:
        fs.release(fh)


def write_new(fs: OverlayFS, rel: str, data: bytes) -> None:
    fh = fs.create(rel, os.O_WRONLY | os.O_CREAT, 0o644)
    fs.write(fh.fh, data, 0)
    fs.release(fh.fh)


def write_then_read(fs: OverlayFS, rel: str, reader: int) -> bytes:
    """Write b"new\\n" through a write open of ``rel``, then read through ``reader`` (an
    open handle, released after)."""
    writer = fs.open(rel, os.O_RDWR).fh
    fs.write(writer, b"new\n", 0)
    fs.release(writer)
    try:
        return fs.read(reader, 100, 0)
    finally:
        fs.release(reader)


def counting_lookups(fs: OverlayFS, monkeypatch) -> list[str]:
    """The merged paths ``Lookup._lookup_in`` is asked about from now on."""
    seen: list[str] = []
    real = fs.lookup._lookup_in

    def spy(parent, rel):
        seen.append(rel)
        return real(parent, rel)

    monkeypatch.setattr(fs.lookup, "_lookup_in", spy)
    return seen


KEEPERS = {
    "lookup": lambda fs, rel: fs.lookup.lookup(rel),
    "getattr": lambda fs, rel: fs.getattr(rel),
    "listing": lambda fs, rel: fs.readdir(rel.rpartition("/")[0], plus=True),
}


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_a_lookup_or_listing_does_not_look_up_again(fs_factory, monkeypatch, keep):
    fs = fs_factory({"d/x": b"lower x\n"})
    KEEPERS[keep](fs, "d/x")
    seen = counting_lookups(fs, monkeypatch)
    assert read_all(fs, "d/x") == b"lower x\n"
    assert "d/x" not in seen


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_copy_up_by_a_write_open(fs_factory, keep):
    fs = fs_factory({"d/x": b"old\n"})
    write_new(fs, "d/other", b"")  # d in the upper already: only the file is copied up
    KEEPERS[keep](fs, "d/x")
    fh = fs.open("d/x", os.O_RDWR).fh
    fs.write(fh, b"new\n", 0)
    fs.release(fh)
    assert read_all(fs, "d/x") == b"new\n"


@pytest.mark.parametrize("keep", KEEPERS)
def test_handle_opened_after_a_chmod_copy_up_sees_later_writes(fs_factory, keep):
    """A chmod copies the file up and looks it up no more: a read-only open after it must
    be of the upper copy (the inode a later write open gets), never the lower file."""
    fs = fs_factory({"d/x": b"old\n"})
    write_new(fs, "d/other", b"")
    KEEPERS[keep](fs, "d/x")
    fs.chmod("d/x", 0o600)
    reader = fs.open("d/x", os.O_RDONLY).fh
    assert write_then_read(fs, "d/x", reader) == b"new\n"


def test_handle_opened_after_a_copy_up_that_failed_late_sees_later_writes(fs_factory, monkeypatch):
    """A copy-up whose copy is in place when a later step fails (the parent's fsync): the
    name shows the copy, so what was kept before is not opened either."""
    fs = fs_factory({"d/x": b"old\n"})
    write_new(fs, "d/other", b"")
    fs.getattr("d/x")

    real = os.fsync

    def failing(fd):  # (the parent's, through its readable fd kept: copyup49)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "injected: fsync of the parent failed")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        fs.chmod("d/x", 0o600)
    monkeypatch.undo()
    assert (fs.root / "upper/d/x").exists()  # in place (no lookup here: it would keep it)
    reader = fs.open("d/x", os.O_RDONLY).fh
    assert write_then_read(fs, "d/x", reader) == b"new\n"


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_copy_up_of_another_name_of_a_hard_link(fs_factory, keep):
    """index=on: two names of a lower hard link are one inode; writing one copies it up to
    the index, which the other name shows from then on."""
    fs = fs_factory({"d/a": b"old\n"}, index=True)
    os.link(fs.root / "lower/d/a", fs.root / "lower/d/b")
    write_new(fs, "d/other", b"")
    KEEPERS[keep](fs, "d/b")
    KEEPERS[keep](fs, "d/a")
    fh = fs.open("d/a", os.O_RDWR).fh
    fs.write(fh, b"new\n", 0)
    fs.release(fh)
    assert read_all(fs, "d/b") == b"new\n"


def test_open_after_a_hard_link_is_broken_by_copy_up(fs_factory):
    """index off: the written name leaves the link, the other keeps the lower data."""
    fs = fs_factory({"d/a": b"old\n"})
    os.link(fs.root / "lower/d/a", fs.root / "lower/d/b")
    write_new(fs, "d/other", b"")
    for rel in ("d/a", "d/b"):
        fs.getattr(rel)
    fh = fs.open("d/a", os.O_RDWR).fh
    fs.write(fh, b"new\n", 0)
    fs.release(fh)
    assert read_all(fs, "d/a") == b"new\n"
    assert read_all(fs, "d/b") == b"old\n"


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_rename_over_it(fs_factory, keep):
    fs = fs_factory({"d/x": b"old\n"})
    write_new(fs, "d/y", b"new\n")
    KEEPERS[keep](fs, "d/x")
    fs.rename("d/y", "d/x")
    assert read_all(fs, "d/x") == b"new\n"


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_rename_of_its_directory(fs_factory, keep):
    """A moved directory: the old path names another directory's file afterwards."""
    fs = fs_factory({}, upper={"d/x": b"first\n", "e/x": b"second\n"})
    KEEPERS[keep](fs, "d/x")
    fs.rename("d", "f")
    fs.rename("e", "d")
    assert read_all(fs, "d/x") == b"second\n"


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_unlink_and_create_of_the_name(fs_factory, keep):
    fs = fs_factory({"d/x": b"old\n"})
    KEEPERS[keep](fs, "d/x")
    fs.unlink("d/x")
    with pytest.raises(FileNotFoundError):
        fs.open("d/x", os.O_RDONLY)
    KEEPERS[keep](fs, "d/z") if keep == "listing" else None
    write_new(fs, "d/x", b"new\n")
    assert read_all(fs, "d/x") == b"new\n"


@pytest.mark.parametrize("keep", KEEPERS)
def test_open_after_unlink_of_an_upper_file(fs_factory, keep):
    fs = fs_factory({}, upper={"d/x": b"upper\n", "d/z": b""})
    KEEPERS[keep](fs, "d/x")
    fs.unlink("d/x")
    with pytest.raises(FileNotFoundError):
        fs.open("d/x", os.O_RDONLY)


def test_listed_metacopy_file_reads_the_lower_data(fs_factory):
    """metacopy=on: a chmod copies metadata only; the upper file is sparse and its data is
    below. A listing cannot tell (no xattrs read): the open must."""
    data = b"lower data\n" * 100
    fs = fs_factory({"d/x": data, "d/y": data}, metacopy=True)
    fs.chmod("d/x", 0o600)
    fs.readdir("d", plus=True)
    assert read_all(fs, "d/x") == data
    fs.getattr("d/y")  # kept as the lower file; then a metadata copy-up, and its data one
    fs.chmod("d/y", 0o600)
    assert read_all(fs, "d/y") == data
    fh = fs.open("d/y", os.O_RDWR).fh
    fs.write(fh, b"new", 0)
    fs.release(fh)
    fs.getattr("d/y")
    assert read_all(fs, "d/y") == b"new" + data[3:]


def test_listed_metacopy_file_without_metacopy_on_is_refused(fs_factory):
    """An upper file marked metacopy in a mount without metacopy=on: its lookup refuses it
    (EPERM); an open of it as listed must too, never read the sparse copy."""
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/x": b""})
    os.truncate(fs.root / "upper/d/x", 6)
    os.setxattr(fs.root / "upper/d/x", "trusted.overlay.metacopy", b"")
    fs.readdir("d", plus=True)
    with pytest.raises(PermissionError):
        fs.open("d/x", os.O_RDONLY)


def test_a_change_during_the_lookup_voids_what_it_found(fs_factory, monkeypatch):
    """Another thread renames over the name while a lookup of it runs (after the lookup
    read the layers): what that lookup found is not reused."""
    fs = fs_factory({"d/x": b"old\n"})
    write_new(fs, "d/y", b"new\n")
    real = fs.lookup._lookup_in
    raced = []

    def racing(parent, rel):
        node = real(parent, rel)
        if rel == "d/x" and not raced:  # (once: the rename looks the name up too)
            raced.append(True)
            other = threading.Thread(target=fs.rename, args=("d/y", "d/x"))
            other.start()
            other.join()
        return node

    monkeypatch.setattr(fs.lookup, "_lookup_in", racing)
    assert fs.lookup.lookup("d/x").top.layer is fs.stack.lowers[0]  # found before the rename
    assert raced
    monkeypatch.setattr(fs.lookup, "_lookup_in", real)
    assert read_all(fs, "d/x") == b"new\n"


def test_a_change_during_a_listing_voids_it(fs_factory, monkeypatch):
    fs = fs_factory({"d/x": b"old\n"})
    write_new(fs, "d/y", b"new\n")
    import overlaypc.core as core_mod
    real = core_mod.merged_listing

    def racing(*args, **kw):
        out = real(*args, **kw)
        other = threading.Thread(target=fs.rename, args=("d/y", "d/x"))
        other.start()
        other.join()
        return out

    monkeypatch.setattr(core_mod, "merged_listing", racing)
    fs.readdir("d", plus=True)
    monkeypatch.setattr(core_mod, "merged_listing", real)
    assert read_all(fs, "d/x") == b"new\n"
    fs.readdir("d", plus=True)  # (a listing with no change during it is kept)
    assert fs.lookup.recent("d/x") is not None


def test_a_file_replaced_behind_the_mounts_back_is_looked_up_again(fs_factory):
    """The open checks it opened the kept object; a new file there is found afresh."""
    fs = fs_factory({}, upper={"d/x": b"old\n"})
    fs.getattr("d/x")
    os.rename(fs.root / "upper/d/x", fs.root / "upper/d/gone")
    (fs.root / "upper/d/x").write_bytes(b"new\n")
    assert read_all(fs, "d/x") == b"new\n"


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_kept_files_hold_no_fds(fs_factory):
    """Files kept in 50 directories: once the directory cache lets its fds go (out of fds),
    none stays open for them."""
    fs = fs_factory({f"d{i}/x": b"x" for i in range(50)})
    before = open_fds()
    for i in range(50):
        fs.getattr(f"d{i}/x")
    assert open_fds() >= before + 50  # the directory cache holds each d<i>
    fs.lookup.shed_fds()
    assert open_fds() == before
    assert read_all(fs, "d7/x") == b"x"


def test_kept_files_memory_at_the_bound(fs_factory):
    """The README's bound: ``RECENT_MAX`` files, measured with tracemalloc (each with its
    own stat, as lookups keep them; 20-byte names in 100-file directories)."""
    import tracemalloc

    fs = fs_factory({"d/x": b""})
    st = os.stat(fs.root / "lower/d/x")
    layer = fs.stack.lowers[0]
    epoch = fs.lookup.epoch
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(lookup_mod.RECENT_MAX // 100 + 1):
        parent = f"some/directory/{i:05d}"
        files = {}
        for j in range(100):
            name = f"file-name-{i:05d}-{j:04d}"
            files[name] = (layer, parent, os.stat_result(tuple(st)[:10] + (
                0.5, 0.5, 0.5, 10**18 + j, 10**18 + j, 10**18 + j)))
        fs.lookup.keep_listing(parent, epoch, files)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert fs.lookup._recent_count <= lookup_mod.RECENT_MAX
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert used < 2.5 * 2**20, used  # README: 2.2 MiB at the bound


def test_kept_files_are_bounded(fs_factory, monkeypatch):
    monkeypatch.setattr(lookup_mod, "RECENT_MAX", 10)
    fs = fs_factory({f"d{i}/f{j}": b"" for i in range(3) for j in range(8)})
    for i in range(3):
        fs.readdir(f"d{i}", plus=True)
        for j in range(8):
            fs.getattr(f"d{i}/f{j}")
            held = fs.lookup._recent
            assert fs.lookup._recent_count == sum(len(v) for v in held.values()) <= 10
    assert read_all(fs, "d0/f0") == b""


def test_open_after_rename_through_a_mount(layers_factory, overlay_mount):
    """Through FUSE: the kernel lists (READDIRPLUS) and stats, a file is renamed over a
    listed name, and reads through the name show the new file, from two threads."""
    layers = layers_factory({"low": {f"d/f{i}": f"old {i}\n" for i in range(20)}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers['low']},upperdir={upper},workdir={work}")
    d = Path(m.path) / "d"
    for e in os.scandir(d):
        e.stat()
    errors: list[str] = []

    def replace(i: int) -> None:
        try:
            (d / f"n{i}").write_text(f"new {i}\n")
            os.rename(d / f"n{i}", d / f"f{i}")
        except OSError as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    workers = [threading.Thread(target=replace, args=(i,)) for i in range(0, 20, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for i in range(20):
        assert (d / f"f{i}").read_text() == (f"new {i}\n" if i % 2 == 0 else f"old {i}\n")


# -- xattr names of lower files (``xattrnames.LowerXattrs``) --------------------------------
def counting_listings(fs: OverlayFS, monkeypatch) -> list[str]:
    """The names ``Layer.xattr_names_at`` lists from now on (any layer)."""
    seen: list[str] = []
    for layer in fs.stack.layers:
        real = layer.xattr_names_at

        def spy(parent, name, real=real):
            seen.append(name)
            return real(parent, name)

        monkeypatch.setattr(layer, "xattr_names_at", spy)
    return seen


def test_a_lower_files_xattr_names_are_listed_once(fs_factory, monkeypatch):
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/u": b"upper\n"})
    seen = counting_listings(fs, monkeypatch)
    for _ in range(3):
        fs.getattr("d/x")
        fs.getattr("d/u")
    assert seen.count("x") == 1
    assert seen.count("u") == 3  # the upper changes through the mount: listed every time
    assert len(fs.lookup.xattr_names) == 1


def test_a_lower_file_changed_behind_the_mounts_back_is_listed_again(fs_factory):
    """A new xattr moves the file's ctime: the kept names are not used for it."""
    fs = fs_factory({"d/x": b"lower\n"})
    with pytest.raises(OSError):
        fs.getxattr("d/x", "user.added")  # listed: absent
    os.setxattr(fs.root / "lower/d/x", "user.added", b"1")
    assert fs.getxattr("d/x", "user.added") == b"1"


def test_lower_xattr_names_are_bounded(tmp_path):
    """The README's bound: ``MAX_FILES`` files, least recently used dropped, and their
    memory at the bound (tracemalloc)."""
    import tracemalloc

    from overlaypc.layer import Layer
    from overlaypc.xattrnames import MAX_FILES, LowerXattrs

    (tmp_path / "x").write_bytes(b"")
    layer = Layer(str(tmp_path), 1, writable=False, name="lower0")
    try:
        names = LowerXattrs()
        st = os.stat(tmp_path / "x")
        fake = [os.stat_result((st.st_mode, i, st.st_dev, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                10**18 + i, 10**18 + i, 10**18 + i)) for i in range(MAX_FILES + 100)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for one in fake:
            assert names.of(layer, layer.root, "x", one) is not None
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        assert len(names) == MAX_FILES
        used = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert used < 2.5 * 2**20, used  # README: 2.3 MiB at the bound
    finally:
        layer.close()
