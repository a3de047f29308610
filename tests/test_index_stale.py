"""index45: stale, orphan and odd ``index=on`` entries, against the kernel.

The kernel checks every entry of ``workdir/index`` at mount (``ovl_indexdir_cleanup``,
``ovl_verify_index``): a ``#`` leftover goes; a regular entry whose ``origin`` is not the
handle its name encodes goes (ESTALE), and so does one with no upper name left (one link)
whose origin no longer decodes (ESTALE) or whose overlay count is 0 (an orphan); a whiteout
entry stays; an entry it cannot read (a name that is no file handle, no ``origin``) fails
the mount. At run time the last name of an indexed file that goes takes its entry with it
(``ovl_nlink_end`` -> ``ovl_cleanup_index``), and a lookup that finds an entry of another
type than the lower file fails (EIO, "bad index found"), where overlaypc served the entry:
a whiteout as a character device, a FIFO whose open never returned.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import helpers
from features_support import KERNEL_INDEX, KERNEL_METACOPY, make_lowers, new_stack
from overlaypc import sysapi
from test_index_roots import kernel_refusal, overlaypc_refusal

pytestmark = [pytest.mark.mount]

OLD = b"lower data\n"
NEW = b"new data, longer than the old\n" * 3
#: lower hard links: a = b = sub/c, x = x2, y = y2
READ = ("a", "b", "sub/c", "x", "x2", "y", "y2")


def _lowers(layers_factory, base: Path) -> list[Path]:
    lowers = make_lowers(layers_factory, base, {"l": {"a": OLD, "sub": {}, "x": b"x\n", "y": b"y\n"}})
    for src, dst in (("a", "b"), ("a", "sub/c"), ("x", "x2"), ("y", "y2")):
        os.link(lowers[0] / src, lowers[0] / dst)
    return lowers


def index_name(lower_file: Path) -> str:
    """The index name of a lower file: hex of its origin file handle."""
    fd = os.open(lower_file, os.O_RDONLY)
    try:
        return sysapi.ovl_origin_xattr(fd, sysapi.fs_uuid(fd)).hex()
    finally:
        os.close(fd)


def _entries(work: Path, labels: dict[str, str]) -> dict[str, str]:
    """index entries (temporary ``#`` names of a mounted kernel left out): label -> type."""
    d = work / "index"
    kinds = {0o100000: "file", 0o020000: "chr", 0o010000: "fifo", 0o040000: "dir"}
    return {labels.get(n, n): kinds[os.lstat(d / n).st_mode & 0o170000]
            for n in os.listdir(d) if not (n.startswith("#") and n not in labels)}


def _read(root: Path) -> dict:
    """What each name shows: its data, or the errno of its lstat (never an open of a FIFO)."""
    out = {}
    for n in READ:
        try:
            st = os.lstat(root / n)
        except OSError as e:
            out[n] = errno.errorcode[e.errno]
            continue
        out[n] = (root / n).read_bytes() if os.path.isfile(root / n) else oct(st.st_mode)
    return out


def _written(lowers, s, kernel_mount) -> dict[str, str]:
    """The kernel writes ``a`` and ``y`` (two index entries, each linked from its name);
    returns the index names of a, x and y -> "a", "x", "y"."""
    k = kernel_mount(lowers, s.upper, s.work, KERNEL_INDEX)
    for n in ("a", "y"):
        with open(k / n, "r+b") as f:
            f.write(NEW)
    helpers.force_unmount(k)
    return {index_name(lowers[0] / n): n for n in ("a", "x", "y")}


def _spoil(case: str, lowers, s, labels) -> None:
    d = s.work / "index"
    key = {n: k for k, n in labels.items()}
    if case == "mismatch":  # a's entry under x's name: x would read a's data
        os.rename(d / key["a"], d / key["x"])
    elif case == "leftover":
        (d / "#1f").write_bytes(b"left over by a kill\n")
    elif case == "stale":  # y's lower file gone (offline), its upper name too
        os.unlink(s.upper / "y")
        for n in ("y", "y2"):
            if os.path.lexists(lowers[0] / n):  # (shared by both stacks)
                os.unlink(lowers[0] / n)
    elif case == "orphan":  # y's names all whited out by hand, its count 0
        os.unlink(s.upper / "y")
        os.mknod(s.upper / "y", 0o20000 | 0o600, 0)
        os.mknod(s.upper / "y2", 0o20000 | 0o600, 0)
        os.setxattr(d / key["y"], "trusted.overlay.nlink", b"U-1")
    elif case == "whiteout":
        os.mknod(d / key["x"], 0o20000 | 0o600, 0)
    elif case == "fifo":  # (with the origin its name says: else the mount is refused)
        os.mkfifo(d / key["x"])
        os.setxattr(d / key["x"], "trusted.overlay.origin", bytes.fromhex(key["x"]))
    elif case == "dir":
        os.mkdir(d / key["x"])
    elif case == "junk":
        (d / "junk").write_bytes(b"not a file handle\n")
    elif case == "no_origin":
        os.removexattr(d / key["a"], "trusted.overlay.origin")
    elif case == "wrong_type":  # a regular entry (one link) whose origin decodes to a directory
        sub = index_name(lowers[0] / "sub")
        (d / sub).write_bytes(b"the only copy of some data\n")
        os.setxattr(d / sub, "trusted.overlay.origin", bytes.fromhex(sub))
    else:
        raise AssertionError(case)


MOUNTED = ["mismatch", "leftover", "stale", "orphan", "whiteout", "fifo", "dir", "wrong_type"]


def _mounted_as_the_kernel(lowers, ks, os_, labels, overlay_mount, kernel_mount):
    """The kernel mounts stack ``ks`` (its clean-up), then overlaypc ``os_``: the same view and
    the same index entries left. (overlaypc's mount, the kernel's view)"""
    k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX)
    theirs = _read(k)
    helpers.force_unmount(k)
    m = overlay_mount(os_.options("index=on"))
    assert _read(m.path) == theirs
    assert _entries(os_.work, labels) == _entries(ks.work, labels)
    return m, theirs


@pytest.mark.parametrize("case", MOUNTED)
def test_index_entries_at_mount_as_the_kernel(case, xfs_dir, layers_factory, overlay_mount,
                                              kernel_mount):
    lowers = _lowers(layers_factory, xfs_dir)
    ks, os_ = new_stack(lowers, xfs_dir, "k"), new_stack(lowers, xfs_dir, "o")
    # (the same index names in both: they name the lower files)
    labels = [_written(lowers, s, kernel_mount) for s in (ks, os_)][0]
    for s in (ks, os_):
        _spoil(case, lowers, s, dict(labels))
    if case == "leftover":
        labels["#1f"] = "#1f"
    m, theirs = _mounted_as_the_kernel(lowers, ks, os_, labels, overlay_mount, kernel_mount)


@pytest.mark.parametrize("case", ["junk", "no_origin"])
def test_unreadable_index_entry_refuses_the_mount(case, xfs_dir, layers_factory, kernel_mount,
                                                  tmp_path):
    lowers = _lowers(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, "k")
    labels = _written(lowers, s, kernel_mount)
    _spoil(case, lowers, s, labels)
    assert kernel_refusal(tmp_path / "k", lowers, s.upper, s.work) is not None
    before = {p: helpers.dir_state(p) for p in (s.upper, s.work)}
    line = overlaypc_refusal(tmp_path, tmp_path / "mnt", s.options("index=on"))
    assert line is not None and "index" in line, line
    assert {p: helpers.dir_state(p) for p in (s.upper, s.work)} == before, "a refused mount wrote"


@pytest.mark.parametrize("change", ["unlink", "rename_over"])
@pytest.mark.parametrize("written", [True, False])
@pytest.mark.parametrize("metacopy", [False, True])
def test_last_name_gone_takes_the_index_entry(change, written, metacopy, xfs_dir,
                                              layers_factory, overlay_mount, kernel_mount):
    """Every name of ``a`` goes (``a`` written first, or not: then the first removal
    copies it up into the index, metadata only under ``metacopy``); the kernel removes
    the entry with the last one."""
    lowers = _lowers(layers_factory, xfs_dir)
    labels = {index_name(lowers[0] / n): n for n in ("a", "x", "y")}

    def run(root: Path) -> dict:
        if written:
            with open(root / "a", "r+b") as f:
                f.write(NEW)
        for n in ("a", "b", "sub/c"):
            if change == "unlink":
                os.unlink(root / n)
            else:
                (root / "new").write_bytes(b"n\n")
                os.rename(root / "new", root / n)
        return _read(root)

    ks, os_ = new_stack(lowers, xfs_dir, "k"), new_stack(lowers, xfs_dir, "o")
    extra = KERNEL_METACOPY if metacopy else ()
    theirs = run(kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX + extra))
    assert _entries(ks.work, labels) == {}  # (the oracle)
    m = overlay_mount(os_.options(",".join(("index=on",) + extra)))
    assert run(m.path) == theirs
    assert _entries(os_.work, labels) == {}


def test_last_name_gone_while_open(xfs_dir, layers_factory, overlay_mount):
    """The file is open when its last name goes: it keeps reading and writing through its
    handle (its index entry stays while it is open: the handle may reopen it), and the
    next mount removes the orphan entry, as the kernel's would."""
    lowers = _lowers(layers_factory, xfs_dir)
    labels = {index_name(lowers[0] / n): n for n in ("a", "x", "y")}
    s = new_stack(lowers, xfs_dir, "o")
    m = overlay_mount(s.options("index=on"))
    with open(m / "b", "r+b") as f:
        f.write(NEW)
        for n in ("a", "b", "sub/c"):
            os.unlink(m / n)
        f.seek(0)
        assert f.read() == NEW
        f.write(b"more")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == NEW + b"more"
        assert os.fstat(f.fileno()).st_nlink == 0
        assert _entries(s.work, labels) == {"a": "file"}  # (kept while open)
    m.unmount()
    m = overlay_mount(s.options("index=on"))
    assert _entries(s.work, labels) == {}
    assert _read(m.path)["a"] == "ENOENT"


@pytest.mark.parametrize("how", ["eio", "kill"])
def test_index_clean_interrupted(how, xfs_dir, layers_factory, overlay_mount, kernel_mount,
                                 tmp_path):
    """The check's removals fail (EIO at the first) or the daemon is killed -9 there: no
    mount is left, nothing went, and the next mount (overlaypc's, then the kernel's) comes
    up and removes what the kernel's check removes."""
    import signal
    import subprocess

    from reliability_support import wait_stopped
    lowers = _lowers(layers_factory, xfs_dir)
    ks, os_ = new_stack(lowers, xfs_dir, "k"), new_stack(lowers, xfs_dir, "o")
    labels = [_written(lowers, s, kernel_mount) for s in (ks, os_)][0]
    for s in (ks, os_):
        _spoil("orphan", lowers, s, dict(labels))
        _spoil("leftover", lowers, s, dict(labels))
    labels["#1f"] = "#1f"
    before = _entries(os_.work, labels)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = helpers.overlaypc_env({"OVERLAYPC_FAULTS": f"layer.unlink~index={'eio' if how == 'eio' else 'pause'}"})
    proc = subprocess.Popen(helpers.overlaypc_cmd("-f", "-o", os_.options("index=on"), mnt),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        if how == "kill":
            assert wait_stopped(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        helpers.force_unmount(mnt)
    assert not helpers.mounts_at(mnt)
    assert _entries(os_.work, labels) == before  # (the first removal failed or never ran)
    m, theirs = _mounted_as_the_kernel(lowers, ks, os_, labels, overlay_mount, kernel_mount)
    m.unmount()
    assert _read(kernel_mount(lowers, os_.upper, os_.work, KERNEL_INDEX)) == theirs


@pytest.mark.parametrize("reused", ["both", "upper", "work"])
def test_layers_of_a_live_kernel_mount_refused(reused, xfs_dir, layers_factory, kernel_mount,
                                               tmp_path):
    """A kernel overlay mount holds upperdir and workdir: the kernel refuses an index=on
    mount of either (EBUSY, "mount with '-o index=off' to override exclusive upperdir
    protection"). overlaypc's flock keeps out a second overlaypc only: without this its
    check at mount judged, and removed, entries a live mount changes (and its start
    emptied the live mount's workdir/work)."""
    lowers = _lowers(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, "k")
    _written(lowers, s, kernel_mount)
    other = new_stack(lowers, xfs_dir, "o")
    upper, work = {"both": (s.upper, s.work), "upper": (s.upper, other.work),
                   "work": (other.upper, s.work)}[reused]
    kernel_mount(lowers, s.upper, s.work, KERNEL_INDEX)
    assert kernel_refusal(tmp_path / "k2", lowers, upper, work) is not None  # (the oracle)
    before = {p: helpers.dir_state(p) for p in (upper, work)}
    opts = f"lowerdir={lowers[0]},upperdir={upper},workdir={work},index=on"
    line = overlaypc_refusal(tmp_path, tmp_path / "mnt", opts)
    assert line is not None and "in use" in line, line
    assert {p: helpers.dir_state(p) for p in (upper, work)} == before, "a refused mount wrote"


@pytest.mark.parametrize("later", ["top_only", "extra_layer"])
def test_entries_of_a_layer_left_out_or_added(later, xfs_dir, layers_factory, overlay_mount,
                                              kernel_mount):
    """Two lowers on two filesystems (the second on tmp_path's), a hard link in each written
    then its upper name removed (its entry the only copy of what its other name shows). A
    mount that leaves the second layer out removes that entry (its origin decodes in no
    layer: ESTALE), so the layer given back shows its own data again; one that adds a third
    layer keeps both. As the kernel, step by step."""
    top = layers_factory({"t": {"a": OLD}}, where={"t": xfs_dir}).paths[0]
    bot = layers_factory({"u": {"p": OLD}}).paths[0]
    extra = layers_factory({"e": {"e": b"e\n"}}, where={"e": xfs_dir}).paths[0]
    os.link(top / "a", top / "b")
    os.link(bot / "p", bot / "q")
    stacks = ([top, bot], [top, bot], [top] if later == "top_only" else [top, bot, extra],
              [top, bot])

    def shown(root: Path, work: Path) -> tuple:
        names = {}
        for n in ("a", "b", "p", "q"):
            try:
                names[n] = (root / n).read_bytes()
            except OSError as e:
                names[n] = errno.errorcode[e.errno]
        return names, sorted(n for n in os.listdir(work / "index") if not n.startswith("#"))

    def steps(root: Path, i: int) -> None:
        for n in ("a", "p"):
            if i == 0:
                with open(root / n, "r+b") as f:
                    f.write(NEW)
            elif i == 1:
                os.unlink(root / n)

    ks, os_ = new_stack(stacks[0], xfs_dir, "k"), new_stack(stacks[0], xfs_dir, "o")
    for i, lowers in enumerate(stacks):
        k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX)
        steps(k, i)
        theirs = shown(k, ks.work)
        helpers.force_unmount(k)
        m = overlay_mount(f"lowerdir={':'.join(map(str, lowers))},upperdir={os_.upper},"
                          f"workdir={os_.work},index=on")
        steps(m.path, i)
        assert shown(m.path, os_.work) == theirs, i
        m.unmount()
    assert theirs[0]["q"] == (OLD if later == "top_only" else NEW)  # (the oracle)
