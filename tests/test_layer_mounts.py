"""clone26: a mount on a name inside a layer, with the kernel's overlay as the oracle.

The kernel's overlay holds a private clone of each layer's mount and looks names up in the
layer filesystem's own tree: a bind mount on ``lower/d/x`` or ``upper/d/f`` is never
crossed, it shows the object the mount covers. overlaypc holds each layer root beneath a
private, non-recursive clone of its mount (``layerroots``) and answers alike.

Failed before (main at f4c9cfe2), every case. Same-filesystem source, lower or upper: the
lookup's ``fstatat`` through the held parent showed the source file's stat (``lstat f``: mode
0600, size 19, where the kernel shows 0644, 8) and its xattrs (``user.who`` b"source"), the
file could not be read or changed (EXDEV) and the directory ``d/x`` was absent (ENOENT) where
the kernel shows the covered one; tmpfs source: ``d/f`` and ``d/x`` both absent (ENOENT).
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import Dir, File, Symlink
from upper_support import stack_options

pytestmark = [pytest.mark.mount]

#: the layer whose names get mounts on them: ``d/f`` (a file) and ``d/x`` (a directory)
COVERED = {
    "d": Dir(children={
        "f": File("covered\n", mode=0o644, xattrs={"user.who": b"covered"}),
        "x": Dir(children={"inner": File("covered inner\n"), "link": Symlink("covered-target")},
                 mode=0o755, xattrs={"user.who": b"covered"}),
    }),
}
#: what is mounted on them (outside every layer)
SOURCE = {
    "sfile": File("source secret data\n", mode=0o600, xattrs={"user.who": b"source"}),
    "sdir": Dir(children={"secret": File("source secret\n"), "link": Symlink("/etc/passwd")},
                mode=0o700, xattrs={"user.who": b"source"}),
}
#: a lower file beside the mounted names, copied up by a write
BESIDE = {"d": {"beside": "beside\n", "below": "from the lower\n"}}


def _try(fn):
    """``fn()``'s result, or the name of the errno it raised."""
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _shown(st: os.stat_result, times: bool = False) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    out = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
           st.st_size if kind != stat.S_IFDIR else None,
           st.st_nlink if kind != stat.S_IFDIR else None)
    return out + (st.st_mtime_ns,) if times else out


def _read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def _user_xattrs(p: str) -> list[str]:
    return sorted(n for n in os.listxattr(p, follow_symlinks=False) if n.startswith("user."))


def _append(p: str) -> bytes:
    with open(p, "ab") as f:
        f.write(b"more\n")
    return _read(p)


def _scenario(mnt: str) -> dict:
    """Everything a mount shows of and does to the mounted names, in order: reads first,
    then changes, then removals (the names go)."""
    d, f, x = f"{mnt}/d", f"{mnt}/d/f", f"{mnt}/d/x"
    r: dict = {}
    r["lstat f"] = _try(lambda: _shown(os.lstat(f)))
    r["stat f"] = _try(lambda: _shown(os.stat(f)))
    r["lstat x"] = _try(lambda: _shown(os.lstat(x)))
    r["list d"] = _try(lambda: sorted(os.listdir(d)))
    r["list x"] = _try(lambda: sorted(os.listdir(x)))
    r["xattr f"] = _try(lambda: os.getxattr(f, "user.who", follow_symlinks=False))
    r["xattr x"] = _try(lambda: os.getxattr(x, "user.who", follow_symlinks=False))
    r["xattrs f"] = _try(lambda: _user_xattrs(f))
    r["xattrs x"] = _try(lambda: _user_xattrs(x))
    r["readlink x/link"] = _try(lambda: os.readlink(f"{x}/link"))
    r["read f"] = _try(lambda: _read(f))
    r["read x/inner"] = _try(lambda: _read(f"{x}/inner"))
    r["append beside"] = _try(lambda: _append(f"{d}/beside"))
    for name, p in (("f", f), ("x", x)):
        r[f"chmod {name}"] = _try(lambda: os.chmod(p, 0o750))
        r[f"chown {name}"] = _try(lambda: os.chown(p, 1234, 1234, follow_symlinks=False))
        r[f"utime {name}"] = _try(lambda: os.utime(p, ns=(10**18, 10**18), follow_symlinks=False))
        r[f"setxattr {name}"] = _try(lambda: os.setxattr(p, "user.new", b"v", follow_symlinks=False))
        r[f"after {name}"] = _try(lambda: _shown(os.lstat(p), times=True))
        r[f"xattrs after {name}"] = _try(lambda: _user_xattrs(p))
    r["append f"] = _try(lambda: _append(f))
    r["rename f"] = _try(lambda: os.rename(f, f"{d}/g"))
    r["unlink f"] = _try(lambda: os.unlink(f))
    r["rename x"] = _try(lambda: os.rename(x, f"{d}/y"))
    r["list d at end"] = _try(lambda: sorted(os.listdir(d)))
    return r


def _source_state(root: Path) -> dict:
    """Everything a change through a mount could alter in the mounts' sources."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            content = _read(p) if stat.S_ISREG(st.st_mode) else None
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False)
                      for n in os.listxattr(p, follow_symlinks=False)}
            out[p] = (_shown(st, times=True), content, xattrs)
    return out


def _bind(src: Path, dst: Path, made: list[Path]) -> None:
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, capture_output=True)
    made.append(dst)


def _run_side(side: str, base: Path, where: str, source_base: Path, overlay_mount,
              kernel_mount) -> dict:
    """The scenario on one overlay (``side``) whose layer ``where`` has the source's file and
    directory bind-mounted on ``d/f`` and ``d/x``."""
    lower = helpers.build_layer(base / "lower", BESIDE)
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    helpers.build_layer(lower if where == "lower" else upper, COVERED)
    held = lower if where == "lower" else upper
    source = helpers.build_layer(source_base / side, SOURCE)
    before = _source_state(source)
    made: list[Path] = []
    try:
        _bind(source / "sfile", held / "d" / "f", made)
        _bind(source / "sdir", held / "d" / "x", made)
        if side == "kernel":
            mnt = kernel_mount([lower], upper, work, ["redirect_dir=on"])
            result = _scenario(str(mnt))
            helpers.force_unmount(mnt)
        else:
            m = overlay_mount(stack_options([lower], upper, work, "redirect_dir=on"))
            result = _scenario(str(m.mountpoint))
            m.unmount()
        assert _source_state(source) == before, f"{side}: a change reached the mount's source"
        return result
    finally:
        for dst in reversed(made):
            helpers.force_unmount(dst)


@pytest.mark.parametrize("source_fs", ["samefs", "tmpfs"])
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_a_mount_on_a_layer_name_shows_what_it_covers(where, source_fs, tmp_path,
                                                      overlay_mount, kernel_mount,
                                                      tmpfs_factory):
    helpers.require("root")
    source_base = tmpfs_factory() if source_fs == "tmpfs" else tmp_path / "sources"
    kernel = _run_side("kernel", tmp_path / "kernel", where, source_base, overlay_mount,
                       kernel_mount)
    # (the oracle shows the covered objects: the test compares something)
    assert kernel["read f"] == b"covered\n"
    assert kernel["list x"] == ["inner", "link"]
    assert kernel["readlink x/link"] == "covered-target"
    ours = _run_side("ours", tmp_path / "ours", where, source_base, overlay_mount, kernel_mount)
    differ = {k: (kernel[k], ours[k]) for k in kernel if kernel[k] != ours[k]}
    assert not differ, f"(kernel, overlaypc) differ: {differ}"


# -- the roots themselves (in process, real mounts) ---------------------------------------
@pytest.fixture
def binds():
    """``binds(src, dst, *options)``: a bind mount, unmounted in teardown."""
    made: list[Path] = []

    def bind(src: Path, dst: Path, *options: str) -> None:
        helpers.require("root")
        _bind(src, dst, made)
        if options:
            subprocess.run(["mount", "-o", ",".join(("remount", "bind", *options)), str(dst)],
                           check=True, capture_output=True)

    yield bind
    for dst in reversed(made):
        helpers.force_unmount(dst)


def _stack_over_bound_upper(tmp_path: Path, binds):
    """(lower, upper, work, outside) with ``outside/secret`` bind-mounted on ``upper/f``."""
    lower, upper, work, outside = (tmp_path / n for n in ("lower", "upper", "work", "outside"))
    for p in (lower, upper, work, outside):
        p.mkdir()
    (outside / "secret").write_bytes(b"source secret data\n")
    os.chmod(outside / "secret", 0o600)
    (upper / "f").write_bytes(b"covered\n")
    binds(outside / "secret", upper / "f")
    return lower, upper, work, outside


def test_upper_and_work_beneath_one_clone(tmp_path, binds):
    """Upper and workdir roots (and the lower's, on the same filesystem) are beneath one
    private clone: a rename from work to upper
    works (two clones would make it EXDEV), and a name in the upper that is a mount point
    is the covered file to stat and to chmod."""
    from overlaypc import layer
    from overlaypc.idmap import mount_id
    from overlaypc.stack import LayerStack
    lower, upper, work, outside = _stack_over_bound_upper(tmp_path, binds)
    before = _source_state(outside)
    stack = LayerStack([str(lower)], str(upper), str(work))
    try:
        assert stack.upper.cloned and stack.work.cloned and stack.lowers[0].cloned
        # (one filesystem: one clone for every root)
        assert len({mount_id(layer.root_fd) for layer in (*stack.layers, stack.work)}) == 1
        assert stack.upper.lstat("f").st_size == len(b"covered\n")
        stack.upper.do_chmod("f", 0o640)
        assert stat.S_IMODE(stack.upper.lstat("f").st_mode) == 0o640
        os.close(stack.work.do_create("t", os.O_WRONLY, 0o644))
        layer.do_rename(stack.work, "t", stack.upper, "t")
        assert (upper / "t").is_file() and not (work / "t").exists()
    finally:
        stack.close()
    assert _source_state(outside) == before


def test_without_a_clone_a_mount_on_a_name_is_refused(tmp_path, binds, monkeypatch):
    """Where no clone can be made (a plain user: EPERM), the roots are the real mounts', and
    chmod/chown/utime of a name that is a mount point are refused (review24's O_PATH
    round trip) instead of reaching the mount's source."""
    from overlaypc import sysapi
    from overlaypc.stack import LayerStack

    def refused(fd: int) -> int:
        raise OSError(errno.EPERM, "open_tree: not permitted")

    lower, upper, work, outside = _stack_over_bound_upper(tmp_path, binds)
    before = _source_state(outside)
    monkeypatch.setattr(sysapi, "clone_tree", refused)
    stack = LayerStack([str(lower)], str(upper), str(work))
    try:
        assert not stack.upper.cloned and not stack.lowers[0].cloned
        for change in (lambda: stack.upper.do_chmod("f", 0o777),
                       lambda: stack.upper.do_chown("f", 1234, 1234),
                       lambda: stack.upper.do_utime("f", (10**9, 10**9))):
            with pytest.raises(OSError) as e:
                change()
            assert e.value.errno == errno.EXDEV
    finally:
        stack.close()
    assert _source_state(outside) == before


def test_a_root_behind_another_mount_is_opened_on_the_real_mount(tmp_path, binds):
    """An upper that is itself a mount (a bind mount of a directory elsewhere) under the
    directory it shares with the workdir: the clone of that directory shows what the mount
    covers, so the roots are opened on the real mounts, each the directory its path names.
    Lowers (sets of one) are then grouped by their real mount."""
    from overlaypc.idmap import mount_id
    from overlaypc.layerroots import open_roots
    real, upper, work = tmp_path / "real", tmp_path / "upper", tmp_path / "work"
    for p in (real, upper, work):
        p.mkdir()
    binds(real, upper)
    [roots] = open_roots([[str(upper), str(work)]])
    try:
        assert not roots.cloned
        for fd, path in zip(roots.fds, (real, work)):
            a, b = os.fstat(fd), os.stat(path)
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    finally:
        for fd in roots.fds:
            os.close(fd)
    # three lowers, one of them the bind mount: the two others still share a clone
    # (FICLONE needs one mount), the bind mount gets its own
    third = tmp_path / "third"
    third.mkdir()
    sets = open_roots([[str(upper)], [str(work)], [str(third)]])
    try:
        assert [r.cloned for r in sets] == [True, True, True]
        for r, path in zip(sets, (real, work, third)):
            a, b = os.fstat(r.fds[0]), os.stat(path)
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        ids = [mount_id(r.fds[0]) for r in sets]
        assert ids[1] == ids[2] != ids[0]
    finally:
        for r in sets:
            os.close(r.fds[0])


def test_a_read_only_bind_mounted_upper_is_still_refused(tmp_path, binds):
    """Validation reads the real paths: a read-only bind mount of the upper is refused as
    before (the clone would copy its ``ro`` flag anyway)."""
    from overlaypc.config import ConfigError, MountConfig, validate
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for p in (lower, upper, work):
        p.mkdir()
    binds(upper, upper, "ro")
    cfg = MountConfig(lowers=[str(lower)], upper=str(upper), work=str(work))
    with pytest.raises(ConfigError, match="read-only"):
        validate(cfg)


def test_a_writable_mount_inside_a_read_only_one_keeps_the_upper_writable(
        tmp_path, binds, overlay_mount, kernel_mount):
    """review27: the layers on one filesystem share a clone of their deepest common
    directory's mount, which passed its check (the same device and inode at each root's
    path) where a root lies on another mount of the same directory (``mount --bind x x``,
    then ``remount,bind,rw``) inside a read-only mount: the upper was held beneath the clone
    of the read-only mount above it, and every change failed with EROFS. The kernel's
    overlay clones the upper's own mount (writable); so must overlaypc (each root on the
    mount its path names: same mount ID as the common directory's, or split).

    Failed before: the mount itself (``MountError``: ``overlaypc: error: workdir
    .../ours-work/work: Read-only file system``)."""
    base = tmp_path / "fs"
    lower, x = base / "lower", base / "x"
    helpers.build_layer(lower, {"a": "from the lower\n"})
    dirs = {side: (x / f"{side}-upper", x / f"{side}-work") for side in ("kernel", "ours")}
    for upper, work in dirs.values():
        upper.mkdir(parents=True)
        work.mkdir()
    binds(base, base, "ro")
    binds(x, x, "rw")
    assert os.statvfs(base).f_flag & os.ST_RDONLY and not os.statvfs(x).f_flag & os.ST_RDONLY

    def write(mnt: Path) -> object:
        return _try(lambda: (Path(mnt, "new").write_text("new\n"), _append(f"{mnt}/a"))[1])

    mnt = kernel_mount([lower], *dirs["kernel"])
    kernel = write(mnt)
    helpers.force_unmount(mnt)
    assert kernel == b"from the lower\nmore\n"
    m = overlay_mount(stack_options([lower], *dirs["ours"]))
    ours = write(m.mountpoint)
    assert ours == kernel
    assert (dirs["ours"][0] / "new").read_text() == "new\n"


@pytest.mark.parametrize("source_fs", ["samefs", "tmpfs"])
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_without_a_clone_a_mount_on_a_name_is_absent_to_reads(where, source_fs, tmp_path, binds,
                                                              tmpfs_factory, monkeypatch):
    """fallback31: where no clone can be made, every read by name through a parent's fd
    (the lookup's ``fstatat``, a listing's stat, getxattr, listxattr, readlink) counts a
    name that is a mount point as absent, as ``RESOLVE_NO_XDEV`` does for opens: never the
    source's values. Names beside them read as before.

    Failed before (main at ec682e4), samefs: ``stat_at(d, "f")`` gave the source file's stat
    (mode 0600); tmpfs: ``getxattr_name(d, "f", "user.who")`` gave b"source"."""
    from overlaypc import sysapi
    from overlaypc.stack import LayerStack

    def refused(fd: int) -> int:
        raise OSError(errno.EPERM, "open_tree: not permitted")

    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for p in (lower, upper, work):
        p.mkdir()
    held = lower if where == "lower" else upper
    helpers.build_layer(held, COVERED)
    helpers.build_layer(held, {"d": Dir(children={
        "g": File("beside\n", xattrs={"user.who": b"covered"}),
        "l": Symlink("covered-target")})})
    source_base = tmpfs_factory() if source_fs == "tmpfs" else tmp_path / "sources"
    source = helpers.build_layer(source_base / "src", SOURCE)
    before = _source_state(source)
    binds(source / "sfile", held / "d" / "f")
    binds(source / "sdir", held / "d" / "x")
    monkeypatch.setattr(sysapi, "clone_tree", refused)
    stack = LayerStack([str(lower)], str(upper), str(work))
    try:
        layer = stack.upper if where == "upper" else stack.lowers[0]
        assert not layer.cloned
        d = layer.dir_fd("d")
        assert d is not None
        layer.dirs = lambda head: d if head == "d" else None  # (the lookup cache's parent)
        # names beside the mount points read as before (the test compares something)
        assert layer.stat_at(d, "g").st_size == len(b"beside\n")
        assert layer.lstat("d/g").st_size == len(b"beside\n")
        assert layer.getxattr_name(d, "g", "user.who") == b"covered"
        assert layer.getxattr_entry("d/g", "user.who") == b"covered"
        assert "user.who" in layer.xattr_names_at(d, "g")
        assert layer.readlink("d/l") == "covered-target"
        path, follow, fd = layer.entry_xattr_path(d.fd, "g")  # (attrs', index's, ownership's)
        try:
            assert os.getxattr(path, "user.who", follow_symlinks=follow) == b"covered"
        finally:
            if fd is not None:
                os.close(fd)
        for name in ("f", "x"):
            with pytest.raises(OSError) as e:
                layer.entry_xattr_path(d.fd, name)
            assert e.value.errno == errno.EXDEV, name
            assert layer.stat_at(d, name) is None, name
            assert layer.lstat(f"d/{name}") is None, name
            assert layer.getxattr_name(d, name, "user.who") is None, name
            assert layer.getxattr_entry(f"d/{name}", "user.who") is None, name
            assert layer.xattr_names_at(d, name) is None, name
            with pytest.raises(OSError) as e:
                layer.readlink(f"d/{name}")  # (not EINVAL: the source's type)
            assert e.value.errno == errno.EXDEV, name
        for stat_all in (True, False):  # (a stat-ed listing leaves them out)
            listed = {item.name: item for item in layer.scandir(d, stat_all=stat_all)}
            assert {"g", "l"} <= set(listed)
            if stat_all:
                assert "f" not in listed and "x" not in listed
            for item in listed.values():
                assert item.st is None or item.st.st_mode != 0o100600  # never the source's
        assert sorted(name for name, _ in layer.listdir("d")) == ["g", "l"]
        layer.dirs = None
    finally:
        stack.close()
    assert _source_state(source) == before
