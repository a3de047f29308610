"""Security (issue 8): no operation through the mount reaches outside the layer roots;
overlay-private xattrs stay private; permission answers match the kernel's overlayfs;
setuid/setgid bits and file capabilities behave as on the kernel's overlay.

What "outside" means here: the *kernel* resolves symlinks met at the overlay level, so
``open(MNT/link-to-host-dir/f, "w")`` legitimately writes the host file, as it would on any
filesystem. What must never happen is the *daemon* following a symlink (or ``..``) that
sits inside a layer path, e.g. a lower ``dir -> /host`` below an upper or higher-lower
directory ``dir``, or a layer directory swapped for a symlink after mount. Every test
keeps a host ``Sentinel`` tree (known contents, modes, times, xattrs) outside the layers,
and the symlinks in the layers point at it, so any escape shows as a changed sentinel.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import textwrap
import time
from pathlib import Path

import pytest

import helpers
from helpers import Dir, File, Symlink
from reliability_support import SENTINEL_FILES, Sentinel, errno_name, outcome
from upper_support import NOBODY, run_as, stack_options, work_leftovers, xattr_dict

pytestmark = pytest.mark.mount

GROUP = 4242  # a supplementary group of the unprivileged caller


def _stack(layers_factory, spec: dict, base=None):
    layers = layers_factory(spec)
    tag = os.urandom(3).hex()
    upper = layers_factory.empty_dir(f"upper-{tag}", base)
    work = layers_factory.empty_dir(f"work-{tag}", base)
    return layers, upper, work


# --------------------------------------------------------------------------------------
# Symlinks inside layers
# --------------------------------------------------------------------------------------

def test_symlinks_in_lower_never_followed_by_the_daemon(tmp_path, layers_factory, overlay_mount):
    """Lower layers holding ``/``, ``..``, ``../../etc/passwd`` and host-dir symlinks, and a
    lower ``d -> SENTINEL`` below a directory ``d`` of a higher layer: the merged ``d`` holds
    only the higher layer's names, and every change made through ``MNT/d/...`` (names the
    sentinel also has) lands in the upper; no-follow changes of the symlinks themselves act
    on copied-up symlinks. The sentinel and /etc/passwd stay as they were."""
    s = Sentinel(tmp_path / "sentinel")
    passwd = Path("/etc/passwd")
    passwd_before = (passwd.read_bytes(), passwd.stat().st_mtime_ns, passwd.stat().st_mode)
    layers, upper, work = _stack(layers_factory, {
        "top": {
            "d": Dir({"own.txt": "top own\n"}),
            "root_link": Symlink("/"),
            "up_link": Symlink(".."),
            "passwd_link": Symlink("../../etc/passwd"),
            "sent_abs": Symlink(str(s.root)),
            "sent_file": Symlink(str(s.root / "secret.txt")),
        },
        "bottom": {
            "d": Symlink(str(s.root)),
            "e": Symlink(str(s.root)),
            "plain.txt": "bottom\n",
        },
    })
    m = overlay_mount(stack_options(layers.paths, upper, work))
    mnt = m.path

    for name, target in (("root_link", "/"), ("up_link", ".."),
                         ("passwd_link", "../../etc/passwd"), ("sent_abs", str(s.root)),
                         ("e", str(s.root))):
        assert stat.S_ISLNK(os.lstat(mnt / name).st_mode) and os.readlink(mnt / name) == target
    assert sorted(os.listdir(mnt / "d")) == ["own.txt"]
    for rel in SENTINEL_FILES:
        assert outcome(lambda: os.lstat(mnt / "d" / rel)) in ("ENOENT", "ENOTDIR"), rel

    # changes under MNT/d use names the sentinel has: all land in the upper
    d = mnt / "d"
    with open(d / "secret.txt", "wb") as f:
        f.write(b"overlay secret\n")
    os.chmod(d / "secret.txt", 0o600)
    os.chown(d / "secret.txt", 1234, 1234)
    os.utime(d / "secret.txt", ns=(1, 1))
    os.setxattr(d / "secret.txt", "user.mark", b"overlay")
    os.truncate(d / "secret.txt", 3)
    os.mkdir(d / "sub")
    (d / "sub" / "inner.txt").write_bytes(b"overlay inner\n")
    os.mkdir(d / "emptydir")
    os.rmdir(d / "emptydir")
    os.rename(d / "secret.txt", d / "victim.txt")
    assert (upper / "d" / "victim.txt").read_bytes() == b"ove"
    assert xattr_dict(upper / "d" / "victim.txt")["user.mark"] == b"overlay"
    assert (upper / "d" / "sub" / "inner.txt").read_bytes() == b"overlay inner\n"
    os.unlink(d / "victim.txt")
    assert sorted(os.listdir(d)) == ["own.txt", "sub"]

    # no-follow changes of the symlinks themselves (copy-up of the link, not its target)
    for name in ("sent_abs", "sent_file", "e"):
        os.chown(mnt / name, 4321, 4321, follow_symlinks=False)
        os.utime(mnt / name, ns=(5, 5), follow_symlinks=False)
        assert outcome(lambda: os.setxattr(mnt / name, "user.x", b"1", follow_symlinks=False)) \
            in ("EPERM", "EOPNOTSUPP")
        st = os.lstat(upper / name)
        assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (4321, 4321)
        assert os.readlink(upper / name) == os.readlink(mnt / name)
    # reading through the links is the kernel's doing and allowed; it must not change anything
    assert (mnt / "sent_file").read_bytes() == SENTINEL_FILES["secret.txt"]
    assert os.listxattr(mnt / "root_link", follow_symlinks=False) == []

    m.unmount()
    s.assert_untouched()
    assert (passwd.read_bytes(), passwd.stat().st_mtime_ns, passwd.stat().st_mode) == passwd_before
    assert work_leftovers(work) == []


@pytest.mark.parametrize("options", ["", "redirect_dir=on,metacopy=on"])
def test_crafted_redirects_never_leave_the_layers(options, tmp_path, layers_factory,
                                                  overlay_mount):
    """An upper prepared by someone else, whose redirect (and metacopy) xattrs point through a
    lower symlink to the host sentinel, or climb with ``..``: the merged directories show
    only their own entries (one whose redirect climbs fails its lookup, EACCES, as the
    kernel's: parity45), no sentinel byte is ever served or copied up, nothing changes."""
    s = Sentinel(tmp_path / "sentinel")
    secret = SENTINEL_FILES["secret.txt"]
    layers, upper, work = _stack(layers_factory, {"lower": {
        "lnk": Symlink(str(s.root)), "real/sub/own.txt": "lower own\n"}})
    redirects = {"r_link": "/lnk/sub", "r_dotdot": "/../sentinel/sub",
                 "r_abs_host": str(s.root / "sub"), "lnk2": "lnk"}
    for name, target in redirects.items():
        (upper / name).mkdir()
        (upper / name / "mine.txt").write_bytes(b"upper\n")
        os.setxattr(upper / name, "trusted.overlay.redirect", target.encode())
    if "metacopy" in options:
        for name, target in {"mc_link": "/lnk/secret.txt", "mc_dotdot": "/../sentinel/secret.txt"}.items():
            with open(upper / name, "wb") as f:
                f.truncate(len(secret))
            os.setxattr(upper / name, "trusted.overlay.metacopy", b"")
            os.setxattr(upper / name, "trusted.overlay.redirect", target.encode())
    m = overlay_mount(stack_options(layers.paths, upper, work, options))
    assert outcome(lambda: os.listdir(m / "r_dotdot")) == "EACCES"
    for name in redirects.keys() - {"r_dotdot"}:
        assert sorted(os.listdir(m / name)) == ["mine.txt"], name
        assert outcome(lambda: os.lstat(m / name / "inner.txt")) == "ENOENT"
        (m / name / "new.txt").write_bytes(b"new\n")
        assert outcome(lambda: os.unlink(m / name / "inner.txt")) == "ENOENT"
    if "metacopy" in options:
        for name in ("mc_link", "mc_dotdot"):
            got = b""
            with contextlib.suppress(OSError):
                got = (m / name).read_bytes()
            assert secret not in got, f"{name} served the host file"
            with contextlib.suppress(OSError):
                with open(m / name, "r+b") as f:  # data copy-up from "below"
                    f.write(b"x")
            assert secret[1:] not in (upper / name).read_bytes()
    m.unmount()
    s.assert_untouched()


def test_core_api_refuses_paths_leaving_the_layers(tmp_path, layers_factory):
    """The API tier, without FUSE (whose kernel side never sends ``..``): merged paths made of
    ``..`` components, absolute paths and symlinked components get an error from every
    operation, and touch nothing outside the layers."""
    from overlaypc.config import MountConfig, validate
    from overlaypc.core import OverlayFS

    s = Sentinel(tmp_path / "sentinel")
    layers, upper, work = _stack(layers_factory, {"lower": {
        "dir/f.txt": "f\n", "esc": Symlink("../../sentinel"), "abs": Symlink(str(s.root))}})
    mnt = tmp_path / "unused-mountpoint"
    mnt.mkdir()
    cfg = MountConfig(lowers=[str(layers["lower"])], upper=str(upper), work=str(work),
                      mountpoint=str(mnt))
    validate(cfg)
    fs = OverlayFS(cfg)
    fs.start()
    rel_sentinel = os.path.relpath(s.root, layers["lower"])
    bad_paths = ["..", "../sentinel/secret.txt", "dir/../../sentinel/secret.txt",
                 f"{rel_sentinel}/secret.txt", f"dir/../{rel_sentinel}/secret.txt",
                 "esc/secret.txt", "abs/secret.txt", "abs/sub/inner.txt",
                 str(s.root / "secret.txt").lstrip("/"), "dir/../../../../../etc/passwd"]
    try:
        for rel in bad_paths:
            ops = {
                "getattr": lambda: fs.getattr(rel),
                "open_r": lambda: fs.open(rel, os.O_RDONLY),
                "open_w": lambda: fs.open(rel, os.O_WRONLY),
                "create": lambda: fs.create(rel.rsplit("/", 1)[0] + "/new.txt", os.O_WRONLY, 0o644),
                "mkdir": lambda: fs.mkdir(rel.rsplit("/", 1)[0] + "/newdir", 0o755),
                "unlink": lambda: fs.unlink(rel),
                "rename": lambda: fs.rename(rel, "dir/stolen.txt"),
                "rename_to": lambda: fs.rename("dir/f.txt", rel),
                "chmod": lambda: fs.chmod(rel, 0o777),
                "chown": lambda: fs.chown(rel, 1, 1),
                "truncate": lambda: fs.truncate(rel, 0),
                "setxattr": lambda: fs.setxattr(rel, "user.x", b"1"),
                "symlink": lambda: fs.symlink("/x", rel.rsplit("/", 1)[0] + "/ln"),
                "link": lambda: fs.link("dir/f.txt", rel.rsplit("/", 1)[0] + "/hard"),
            }
            for name, op in ops.items():
                assert outcome(op) != "ok", f"{name}({rel!r}) succeeded"
        assert [e.name for e in fs.readdir("dir")] == ["f.txt"]
    finally:
        fs.close()
    s.assert_untouched()
    assert helpers.merged_names(upper) <= {"dir", "dir/f.txt"}, helpers.merged_names(upper)


def test_layer_dirs_swapped_for_symlinks_after_mount(tmp_path, layers_factory, overlay_mount):
    """After mount, a lower dir, an upper dir and ``workdir/work`` are each replaced by a
    symlink to the sentinel, and the lower root itself is renamed away with a symlink in its
    place. Operations through directory fds taken before the swap (so the kernel does not
    resolve anything itself) may fail, but never reach the sentinel."""
    s = Sentinel(tmp_path / "sentinel")
    names = {rel: b"layer copy of " + rel.encode() for rel in SENTINEL_FILES}
    layers, upper, work = _stack(layers_factory, {"lower": {
        **{f"victim/{rel}": data for rel, data in names.items()},
        "victim/emptydir": {}, "keep.txt": "keep\n", "later.txt": "later\n"}})
    lower = layers["lower"]
    m = overlay_mount(stack_options([lower], upper, work))
    mnt = m.path
    os.mkdir(mnt / "udir")
    for rel, data in names.items():
        (mnt / "udir" / rel).parent.mkdir(exist_ok=True)
        (mnt / "udir" / rel).write_bytes(data)
    os.mkdir(mnt / "udir" / "emptydir")
    assert sorted(os.listdir(mnt / "victim")) == ["emptydir", "secret.txt", "sub", "victim.txt"]

    fds = {name: os.open(mnt / name, os.O_RDONLY | os.O_DIRECTORY) for name in ("victim", "udir")}
    os.rename(lower / "victim", lower / "victim.away")
    os.symlink(s.root, lower / "victim")
    os.rename(upper / "udir", upper / "udir.away")
    os.symlink(s.root, upper / "udir")

    def attempts(dfd: int) -> dict[str, str]:
        proc = f"/proc/self/fd/{dfd}"

        def write_existing():
            fd = os.open("secret.txt", os.O_WRONLY, dir_fd=dfd)
            try:
                os.write(fd, b"escaped")
                os.ftruncate(fd, 1)
            finally:
                os.close(fd)

        def create_new():
            os.close(os.open("new.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))

        return {
            "read": outcome(lambda: os.close(os.open("secret.txt", os.O_RDONLY, dir_fd=dfd))),
            "write": outcome(write_existing),
            "create": outcome(create_new),
            "mkdir": outcome(lambda: os.mkdir("newdir", dir_fd=dfd)),
            "rmdir": outcome(lambda: os.rmdir("emptydir", dir_fd=dfd)),
            "unlink": outcome(lambda: os.unlink("victim.txt", dir_fd=dfd)),
            "rename": outcome(lambda: os.rename("secret.txt", "moved.txt", src_dir_fd=dfd,
                                                dst_dir_fd=dfd)),
            "chmod": outcome(lambda: os.chmod("sub", 0o777, dir_fd=dfd)),
            "chown": outcome(lambda: os.chown("sub/inner.txt", 1, 1, dir_fd=dfd)),
            "utime": outcome(lambda: os.utime("sub/inner.txt", ns=(1, 1), dir_fd=dfd)),
            "setxattr": outcome(lambda: os.setxattr(f"{proc}/sub/inner.txt", "user.x", b"1")),
            "removexattr": outcome(lambda: os.removexattr(f"{proc}/victim.txt",
                                                          "user.sentinel")),
            "truncate": outcome(lambda: os.truncate(f"{proc}/sub/inner.txt", 0)),
            "symlink": outcome(lambda: os.symlink("/", "ln", dir_fd=dfd)),
        }

    try:
        results = {name: attempts(fd) for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)
    s.assert_untouched()

    # workdir/work swapped: a copy-up needs it and must not create its temp in the sentinel
    os.rename(work / "work", work / "work.away")
    os.symlink(s.root, work / "work")
    results["copyup"] = {"open_w": outcome(lambda: os.close(os.open(mnt / "keep.txt",
                                                                   os.O_WRONLY)))}
    s.assert_untouched()
    os.unlink(work / "work")
    os.rename(work / "work.away", work / "work")

    # the lower root renamed away: the daemon keeps its root fd, never the new symlink
    os.rename(lower, tmp_path / "lower.away")
    os.symlink(s.root, lower)
    try:
        assert (mnt / "later.txt").read_bytes() == b"later\n"
        assert "secret.txt" not in os.listdir(mnt)
        assert outcome(lambda: os.lstat(mnt / "secret.txt")) == "ENOENT"
        with open(mnt / "later.txt", "ab") as f:  # copy-up from the (moved) lower root
            f.write(b"more\n")
        assert (upper / "later.txt").read_bytes() == b"later\nmore\n"
    finally:
        os.unlink(lower)
        os.rename(tmp_path / "lower.away", lower)
    m.unmount()
    s.assert_untouched()
    assert not (s.root / "new.txt").exists() and not (s.root / "ln").exists()
    # the unconfined outcomes would have been "ok" for create/mkdir/symlink in the sentinel;
    # the lower dir is reached by its new symlink only (copy-up of its parent resolves it)
    for op in ("create", "mkdir", "symlink", "write", "unlink", "rename"):
        assert results["victim"][op] != "ok", (op, results)
    # the upper dir is in the lookup cache, and changes act on the directory that fd holds:
    # whatever succeeded landed in the moved directory, inside the layer
    moved = upper / "udir.away"
    landed = {"create": (moved / "new.txt").exists(), "mkdir": (moved / "newdir").is_dir(),
              "symlink": (moved / "ln").is_symlink(), "write": (moved / "secret.txt").read_bytes() == b"e"}
    for op, there in landed.items():
        assert (results["udir"][op] == "ok") == there, (op, results["udir"])


def test_names_with_dots(layers_factory, overlay_mount):
    """Names that merely contain dots are ordinary names, kept beneath their directory."""
    layers, upper, work = _stack(layers_factory, {"lower": {"dir/..x": "lower dotdot\n",
                                                            "dir/...": {"f": "in dots dir\n"}}})
    m = overlay_mount(stack_options(layers.paths, upper, work))
    d = m.path / "dir"
    for name in ("..a", "a..", "....", ".. ..", "a..b"):
        (d / name).write_bytes(name.encode())
        assert (upper / "dir" / name).read_bytes() == name.encode()
    with open(d / "..x", "ab") as f:
        f.write(b"more\n")
    assert (upper / "dir" / "..x").read_bytes() == b"lower dotdot\nmore\n"
    os.rename(d / "..a", d / "..." / "..b")
    assert (upper / "dir" / "..." / "..b").read_bytes() == b"..a"
    assert sorted(os.listdir(d)) == sorted([".. ..", "....", "...", "..x", "a..", "a..b"])
    assert sorted(os.listdir(upper)) == ["dir"]


# --------------------------------------------------------------------------------------
# Overlay-private xattrs
# --------------------------------------------------------------------------------------

PRIVATE = ["trusted.overlay.opaque", "trusted.overlay.origin", "trusted.overlay.redirect",
           "trusted.overlay.junk", "user.overlay.opaque", "user.overlay.junk",
           "trusted.overlaypc.ino", "trusted.overlaypc.junk", "user.overlaypc.junk"]


def test_private_xattrs_are_invisible_and_immutable(layers_factory, overlay_mount):
    lower_x = {"trusted.overlay.junk": b"lj", "user.overlay.junk": b"lu",
               "trusted.overlaypc.junk": b"lp", "user.overlaypc.junk": b"lq",
               "user.ok": b"visible", "trusted.ok": b"visible too"}
    layers, upper, work = _stack(layers_factory, {"lower": {
        "lowfile": File("low\n", xattrs=lower_x),
        "copied": File("copied\n", xattrs=lower_x),
        "dir": Dir({"child": "c\n"}, xattrs=lower_x),
    }})
    lower = layers["lower"]
    m = overlay_mount(stack_options([lower], upper, work))
    mnt = m.path
    os.chmod(mnt / "copied", 0o640)          # copy-up: the upper gets overlay xattrs of its own
    (mnt / "dir" / "new").write_bytes(b"n")  # the directory is copied up
    os.mkdir(mnt / "newdir")
    upper_copied = xattr_dict(upper / "copied")
    assert any(k.startswith("trusted.overlay") for k in upper_copied), upper_copied

    backing_before = {p: xattr_dict(p) for p in (lower / "lowfile", lower / "copied",
                                                 lower / "dir", upper / "copied", upper / "dir",
                                                 upper / "newdir", upper)}
    for rel in ("lowfile", "copied", "dir", "newdir", ""):
        p = mnt / rel if rel else mnt
        listed = os.listxattr(p)
        assert not [n for n in listed if n.startswith(("trusted.overlay", "user.overlay"))], \
            (rel, listed)
        if rel in ("lowfile", "copied", "dir"):
            assert {"user.ok", "trusted.ok"} <= set(listed)
            assert os.getxattr(p, "user.ok") == b"visible"
        for name in PRIVATE:
            assert outcome(lambda: os.getxattr(p, name)) != "ok", (rel, name)
            assert outcome(lambda: os.setxattr(p, name, b"forged")) != "ok", (rel, name)
            assert outcome(lambda: os.setxattr(p, name, b"y", os.XATTR_CREATE)) != "ok"
            assert outcome(lambda: os.removexattr(p, name)) != "ok", (rel, name)
    assert outcome(lambda: os.setxattr(mnt, "user.overlaypc.stats", b"{}")) != "ok"
    assert outcome(lambda: os.removexattr(mnt, "user.overlaypc.stats")) != "ok"
    # nothing changed on disk, and a forged opaque did not hide the lower children
    assert {p: xattr_dict(p) for p in backing_before} == backing_before
    assert sorted(os.listdir(mnt / "dir")) == ["child", "new"]
    assert not (upper / "lowfile").exists()


# --------------------------------------------------------------------------------------
# Permissions: overlaypc vs the kernel's overlayfs, as an unprivileged caller
# --------------------------------------------------------------------------------------

# name -> (uid, gid, mode); files hold b"data\n"; dirs get children "x" (root 0644)
# and "y" (nobody 0644) and an empty "e/" (root 0755)
PERM_FILES = {
    "f600_root": (0, 0, 0o600), "f644_root": (0, 0, 0o644), "f666_root": (0, 0, 0o666),
    "f604_root": (0, 0, 0o604), "f460_grp": (0, GROUP, 0o460), "f400_nobody": (NOBODY, NOBODY, 0o400),
    "f600_nobody": (NOBODY, NOBODY, 0o600), "f000_nobody": (NOBODY, NOBODY, 0o000),
}
PERM_DIRS = {
    "d755_root": (0, 0, 0o755), "d777_root": (0, 0, 0o777), "d1777_root": (0, 0, 0o1777),
    "d700_root": (0, 0, 0o700), "d733_root": (0, 0, 0o733), "d755_nobody": (NOBODY, NOBODY, 0o755),
    "d770_grp": (0, GROUP, 0o770),
}


def _build_perm_tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (uid, gid, mode) in PERM_FILES.items():
        p = root / name
        p.write_bytes(b"data\n")
        os.chown(p, uid, gid)
        os.chmod(p, mode)
    for name, (uid, gid, mode) in PERM_DIRS.items():
        d = root / name
        d.mkdir()
        for child, owner in (("x", 0), ("y", NOBODY)):
            (d / child).write_bytes(b"child\n")
            os.chown(d / child, owner, owner)
            os.chmod(d / child, 0o644)
        (d / "e").mkdir()
        os.chown(d, uid, gid)
        os.chmod(d, mode)
    os.chmod(root, 0o755)


PERM_SCRIPT = r"""
import errno, json
R = {}
def rec(label, fn):
    try:
        fn()
        R[label] = "ok"
    except OSError as e:
        R[label] = errno.errorcode.get(e.errno, str(e.errno))
FILES = json.loads(os.environ["PERM_FILES"]); DIRS = json.loads(os.environ["PERM_DIRS"])
def op_open(p, fl):
    os.close(os.open(p, fl))
for top in ("lo", "up"):
    for f in FILES:
        p = f"{top}/{f}"
        rec(f"{p} open_r", lambda: op_open(p, os.O_RDONLY))
        rec(f"{p} open_w", lambda: op_open(p, os.O_WRONLY))
        rec(f"{p} open_trunc", lambda: op_open(p, os.O_WRONLY | os.O_TRUNC))
        rec(f"{p} truncate", lambda: os.truncate(p, 2))
        rec(f"{p} setxattr", lambda: os.setxattr(p, "user.t", b"1"))
        rec(f"{p} getxattr", lambda: os.getxattr(p, "user.t"))
        rec(f"{p} removexattr", lambda: os.removexattr(p, "user.t"))
        rec(f"{p} utime_now", lambda: os.utime(p))
        rec(f"{p} utime_set", lambda: os.utime(p, ns=(10**18, 10**18)))
        rec(f"{p} chown_self", lambda: os.chown(p, 65534, 65534))
        rec(f"{p} chgrp_grp", lambda: os.chown(p, -1, 4242))
        rec(f"{p} chown_root", lambda: os.chown(p, 0, 0))
        rec(f"{p} chmod", lambda: os.chmod(p, 0o640))
    for d in DIRS:
        p = f"{top}/{d}"
        rec(f"{p} list", lambda: os.listdir(p))
        rec(f"{p} stat_x", lambda: os.stat(f"{p}/x"))
        rec(f"{p} read_x", lambda: op_open(f"{p}/x", os.O_RDONLY))
        rec(f"{p} create", lambda: os.close(os.open(f"{p}/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
        rec(f"{p} mkdir", lambda: os.mkdir(f"{p}/newdir"))
        rec(f"{p} mknod_fifo", lambda: os.mkfifo(f"{p}/fifo"))
        rec(f"{p} symlink", lambda: os.symlink("x", f"{p}/ln"))
        rec(f"{p} link", lambda: os.link(f"{p}/y", f"{p}/hard"))
        rec(f"{p} rename_x", lambda: os.rename(f"{p}/x", f"{p}/x2"))
        rec(f"{p} rename_y", lambda: os.rename(f"{p}/y", f"{p}/y2"))
        rec(f"{p} rename_out", lambda: os.rename(f"{p}/y2", f"{top}/d777_root/from_{d}"))
        rec(f"{p} unlink_x", lambda: os.unlink(f"{p}/x"))
        rec(f"{p} unlink_y", lambda: os.unlink(f"{p}/y"))
        rec(f"{p} rmdir_e", lambda: os.rmdir(f"{p}/e"))
        rec(f"{p} chmod", lambda: os.chmod(p, 0o755))
        rec(f"{p} utime_now", lambda: os.utime(p))
        rec(f"{p} setxattr", lambda: os.setxattr(p, "user.t", b"1"))
print(json.dumps(R))
"""


def _perm_run(mnt: Path) -> dict[str, str]:
    env_files, env_dirs = json.dumps(list(PERM_FILES)), json.dumps(list(PERM_DIRS))
    code = f"os.environ['PERM_FILES'] = {env_files!r}\nos.environ['PERM_DIRS'] = {env_dirs!r}\n" \
        + PERM_SCRIPT
    out = run_as(code, uid=NOBODY, gid=NOBODY, groups=[GROUP], cwd=mnt)
    return json.loads(out)


def test_permissions_match_kernel_overlayfs(tmp_path, overlay_mount, kernel_mount):
    """As uid/gid 65534 (with a supplementary group), on a tree of files and dirs with
    various owners and modes, once in the lower and once already in the upper: every
    open/create/unlink/rename/chmod/chown/utimens/setxattr/... answers what the kernel's
    overlayfs answers on identical layers, and the resulting trees are the same."""
    results, trees, stacks = {}, {}, {}
    for which in ("kernel", "overlaypc"):
        base = tmp_path / which
        lower, upper, work = base / "lower", base / "upper", base / "work"
        _build_perm_tree(lower / "lo")
        _build_perm_tree(upper / "up")
        os.mkdir(lower / "up")
        work.mkdir()
        stacks[which] = (lower, upper, work)
    kmnt = kernel_mount([stacks["kernel"][0]], stacks["kernel"][1], stacks["kernel"][2])
    results["kernel"] = _perm_run(kmnt)
    trees["kernel"] = helpers.tree_snapshot(kmnt)
    m = overlay_mount(stack_options([stacks["overlaypc"][0]], *stacks["overlaypc"][1:]))
    results["overlaypc"] = _perm_run(m.path)
    trees["overlaypc"] = helpers.tree_snapshot(m.path)

    k, o = results["kernel"], results["overlaypc"]
    assert len(k) > 300 and set(k) == set(o)
    diff = {op: (k[op], o[op]) for op in k if k[op] != o[op]}
    assert not diff, "kernel vs overlaypc answers (op: (kernel, overlaypc)):\n" + \
        "\n".join(f"  {op}: {v}" for op, v in sorted(diff.items()))
    # sanity: the differential exercised both outcomes
    assert {"EACCES", "EPERM", "ok"} <= set(k.values()), set(k.values())
    tdiff = helpers.diff_snapshots(trees["kernel"], trees["overlaypc"], ("kernel", "overlaypc"))
    assert not tdiff, tdiff


# --------------------------------------------------------------------------------------
# setuid/setgid and file capabilities
# --------------------------------------------------------------------------------------

CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2

PRIV_FILES = {
    # name -> (uid, gid, mode, capability?)
    "suid_nobody": (NOBODY, NOBODY, 0o4755, False),
    "sgid_nobody": (NOBODY, GROUP, 0o2775, False),
    "sgid_noexec": (NOBODY, GROUP, 0o2664, False),
    "suid_root_w": (0, 0, 0o4777, False),
    "cap_nobody": (NOBODY, NOBODY, 0o755, True),
    "cap_suid": (NOBODY, NOBODY, 0o4755, True),
}


def _priv_state(root: Path, name: str) -> tuple:
    p = root / name
    st = os.lstat(p)
    try:
        cap = os.getxattr(p, "security.capability").hex()
    except OSError as e:
        cap = errno_name(e)
    return (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, cap)


def _priv_states(tmp_path: Path, which: str, files: dict, groups: list[int], mount) -> dict:
    """Build ``files`` twice in a fresh lower (``NAME.a``, ``NAME.b``), mount, copy the
    ``.a`` copies up as root without changing data, write one byte into every file as
    uid/gid 65534 (with ``groups``), and record mode/owner/capability at each step."""
    base = tmp_path / which
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for name, (uid, gid, mode, cap) in files.items():
        for copy in ("a", "b"):
            p = lower / f"{name}.{copy}"
            p.write_bytes(b"#!/bin/sh\nexit 0\n")
            os.chown(p, uid, gid)
            os.chmod(p, mode)
            if cap:
                os.setxattr(p, "security.capability", CAP_NET_RAW_EP)
    mnt = mount(lower, upper, work)
    names = sorted(os.listdir(lower))
    st: dict = {"lower": {n: _priv_state(lower, n) for n in names}}
    for n in names:
        if n.endswith(".a"):
            os.close(os.open(mnt / n, os.O_WRONLY))
    st["after_copyup"] = {n: _priv_state(mnt, n) for n in names}
    st["upper_after_copyup"] = {n: _priv_state(upper, n) for n in names if n.endswith(".a")}
    run_as(f"""
        for n in {names!r}:
            fd = os.open(n, os.O_WRONLY)
            os.pwrite(fd, b"#", 0)
            os.close(fd)
    """, cwd=mnt, groups=groups)
    st["after_write"] = {n: _priv_state(mnt, n) for n in names}
    st["upper_after_write"] = {n: _priv_state(upper, n) for n in names}
    st["lower_after"] = {n: _priv_state(lower, n) for n in names}
    return st


def _mounters(overlay_mount, kernel_mount, cache="kernel", extra=""):
    opts = ",".join(o for o in (f"cache={cache}", extra) if o)
    return {"kernel": lambda lo, up, wk: kernel_mount([lo], up, wk),
            "overlaypc": lambda lo, up, wk: overlay_mount(stack_options([lo], up, wk, opts)).path}


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_setuid_setgid_capabilities_on_copy_up_and_write(tmp_path, overlay_mount, kernel_mount,
                                                         cache):
    """Copy-up keeps setuid/setgid bits and ``security.capability`` (as the kernel's overlay
    does); a write by an unprivileged caller (a member of the files' group) then clears
    setuid, setgid-with-group-exec and the capability, exactly as on the kernel's overlay,
    in both cache modes (direct-io writes get no help from the kernel: the daemon strips
    them, ``handle_killpriv_v2``)."""
    mounters = _mounters(overlay_mount, kernel_mount, cache)
    states = {w: _priv_states(tmp_path, w, PRIV_FILES, [GROUP], mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    for phase in k:
        assert k[phase] == o[phase], f"{phase}: kernel {k[phase]}\n overlaypc {o[phase]}"
    # and what that means, spelled out
    for n in o["after_copyup"]:
        if n.endswith(".a"):
            assert o["after_copyup"][n] == o["lower"][n] == o["upper_after_copyup"][n], n
    for n, (mode, _, _, cap) in o["after_write"].items():
        assert not int(mode, 8) & stat.S_ISUID, n
        if n.startswith("sgid_noexec"):
            assert int(mode, 8) & stat.S_ISGID, n  # no group exec, caller in the group
        else:
            assert not int(mode, 8) & stat.S_ISGID, n
        assert cap == "ENODATA", n
    assert o["lower_after"] == o["lower"]


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_setgid_without_group_exec_cleared_by_non_member_write(tmp_path, overlay_mount,
                                                               kernel_mount, cache):
    """Without handle_killpriv_v2 the kernel's fuse_setattr cleared setgid on write only
    with group-exec set, whatever the writer's groups; the daemon now applies the rule
    with the writer's groups (read from /proc), as the kernel overlay does."""
    files = {"sgid_noexec": PRIV_FILES["sgid_noexec"]}
    mounters = _mounters(overlay_mount, kernel_mount, cache)
    states = {w: _priv_states(tmp_path, w, files, [], mounters[w]) for w in mounters}
    assert states["kernel"]["after_write"] == states["overlaypc"]["after_write"]
    mode = int(states["overlaypc"]["after_write"]["sgid_noexec.a"][0], 8)
    assert not mode & stat.S_ISGID


# each op runs as uid/gid 65534 with supplementary group GROUP (``chgrp_root`` as root)
_PRIV_OPS = {
    "truncate": "os.truncate(n, 3)",
    "ftruncate": "fd = os.open(n, os.O_WRONLY); os.ftruncate(fd, 2); os.close(fd)",
    "o_trunc": "os.close(os.open(n, os.O_WRONLY | os.O_TRUNC))",
    "chgrp": "os.chown(n, -1, GROUP)",
    # (a SETATTR asking for nothing comes first: file_remove_privs)
    "fallocate": "fd = os.open(n, os.O_WRONLY); os.posix_fallocate(fd, 0, 8192); os.close(fd)",
}
_PRIV_OP_FILES = {
    # writable by 65534 (owner or other), in a group 65534 is not in (0) or is in (GROUP)
    "suid_w": (0, 0, 0o4777, False),
    "sgid_noexec_w": (0, 0, 0o2666, False),
    "sgid_noexec_member": (0, GROUP, 0o2666, False),
    "sgid_w": (0, 0, 0o2777, False),
    "cap_w": (0, 0, 0o777, True),
}
_CHGRP_FILES = {  # chgrp needs the owner
    "own_sgid_noexec": (NOBODY, 0, 0o2664, False),
    "own_sgid_noexec_member": (NOBODY, GROUP, 0o2664, False),
    "own_suid": (NOBODY, 0, 0o4755, False),
    "own_cap": (NOBODY, 0, 0o755, True),
}


def _priv_op_states(tmp_path: Path, which: str, mount) -> dict:
    base = tmp_path / which
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    names = []
    for op in _PRIV_OPS:
        for name, (uid, gid, mode, cap) in (_CHGRP_FILES if op == "chgrp" else _PRIV_OP_FILES).items():
            for where in ("lo", "up"):  # a lower file (copied up by the op), an upper one
                n = f"{op}.{name}.{where}"
                p = (lower if where == "lo" else upper) / n
                p.write_bytes(b"#!/bin/sh\nexit 0\n")
                os.chown(p, uid, gid)
                os.chmod(p, mode)
                if cap:
                    os.setxattr(p, "security.capability", CAP_NET_RAW_EP)
                names.append((op, n))
    mnt = mount(lower, upper, work)
    code = "\n".join(f"n = {n!r}; " + _PRIV_OPS[op].replace("GROUP", str(GROUP))
                     for op, n in names)
    run_as(code, cwd=mnt, groups=[GROUP])
    # root keeps setgid-without-group-exec on chgrp (CAP_FSETID), even outside the group
    root = mnt / "root.sgid_noexec"
    root.write_bytes(b"x")
    os.chmod(root, 0o2664)
    os.chown(root, -1, NOBODY)
    return {n: _priv_state(mnt, n) for _, n in names + [("", "root.sgid_noexec")]}


@pytest.mark.parametrize("cache,extra", [("kernel", ""), ("shared", ""),
                                         ("kernel", "passthrough=off")])
def test_privileges_cleared_by_truncate_o_trunc_and_chgrp_as_kernel_overlay(
        tmp_path, overlay_mount, kernel_mount, cache, extra):
    """truncate, ftruncate, open(O_TRUNC) and fallocate by a writer without CAP_FSETID,
    and chgrp by the owner, clear setuid, setgid (with group-exec, or the writer outside
    the file's group) and the capability exactly as on the kernel's overlay."""
    mounters = _mounters(overlay_mount, kernel_mount, cache, extra)
    states = {w: _priv_op_states(tmp_path, w, mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    diff = {n: (k[n], o[n]) for n in k if k[n] != o[n]}
    assert not diff, diff
    # the cases that tell the rules apart, spelled out
    for n, (mode, _, _, cap) in o.items():
        mode = int(mode, 8)
        if n == "root.sgid_noexec" or ".sgid_noexec_member." in n or ".own_sgid_noexec_member." in n:
            assert mode & stat.S_ISGID, n
        else:
            assert not mode & (stat.S_ISUID | stat.S_ISGID), n
        assert cap == "ENODATA", n


def test_privileges_cleared_in_the_override_xattr(tmp_path, overlay_mount):
    """Under ``xattr_permissions`` the mode lives in the override xattr: a write by a
    non-member strips setuid/setgid there (and the capability), and the real upper file
    keeps no special bit."""
    files = {"suid": (NOBODY, GROUP, 0o6775, True), "sgid_noexec": (NOBODY, GROUP, 0o2664, False)}
    mounters = _mounters(overlay_mount, None, extra="xattr_permissions=1")
    st = _priv_states(tmp_path, "overlaypc", files, [], mounters["overlaypc"])
    after = st["after_write"]
    assert after["suid.a"][0] == after["suid.b"][0] == oct(0o775), after
    assert after["sgid_noexec.a"][0] == after["sgid_noexec.b"][0] == oct(0o664), after
    assert after["suid.a"][3] == after["suid.b"][3] == "ENODATA", after
    upper = tmp_path / "overlaypc" / "upper"
    for n in ("suid.a", "suid.b", "sgid_noexec.a"):
        value = os.getxattr(upper / n, "security.fuseoverlayfs.override_stat").decode()
        assert value.split(":")[2] in ("775", "664"), (n, value)
        assert not os.lstat(upper / n).st_mode & 0o7000, n


# chown(f, -1, -1): (uid, gid, mode, cap) of each file and who calls it, as uid (0: root)
_CHOWN_NONE_FILES = {
    "own_suid": (NOBODY, NOBODY, 0o6555, False),           # the owner: both bits go
    "own_sgid_noexec": (NOBODY, 0, 0o2644, False),         # owner outside the group: setgid goes
    "own_sgid_noexec_member": (NOBODY, GROUP, 0o2644, False),  # ... inside it: kept
    "own_cap": (NOBODY, NOBODY, 0o755, True),              # the capability goes
    "own_plain": (NOBODY, NOBODY, 0o644, False),           # nothing to strip: ctime only
    "other_suid": (0, 0, 0o4755, False),                   # not the owner: EPERM, kept
    "other_sgid_noexec": (0, 0, 0o2644, False),            # ... the same (outside the group)
    "other_plain": (0, 0, 0o644, False),                   # nothing to strip: allowed
    "other_cap": (0, 0, 0o755, True),                      # ... but the capability: goes
    "other_sgid_cap": (0, GROUP, 0o2755, True),            # EPERM: the capability kept too
    "root_suid": (NOBODY, NOBODY, 0o6755, False),          # root: both bits go (group-exec)
    "root_sgid_noexec": (NOBODY, NOBODY, 0o2644, False),   # root keeps it (CAP_FSETID)
}


def _chown_none_states(tmp_path: Path, which: str, mount) -> dict:
    base = tmp_path / which
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for name, (uid, gid, mode, cap) in _CHOWN_NONE_FILES.items():
        for where in ("lo", "up"):  # a lower file (the kernel overlay copies it up), an upper one
            p = (lower if where == "lo" else upper) / f"{name}.{where}"
            p.write_bytes(b"#!/bin/sh\nexit 0\n")
            os.chown(p, uid, gid)
            os.chmod(p, mode)
            if cap:
                os.setxattr(p, "security.capability", CAP_NET_RAW_EP)
    os.mkdir(upper / "own_dir.up")
    os.chown(upper / "own_dir.up", NOBODY, NOBODY)
    os.chmod(upper / "own_dir.up", 0o3775)
    mnt = mount(lower, upper, work)
    names = sorted(os.listdir(mnt))
    before = {n: os.lstat(mnt / n).st_ctime_ns for n in names}
    time.sleep(0.01)
    code = "import json\nout = {}\n" + "".join(
        f"try:\n    os.chown({n!r}, -1, -1); out[{n!r}] = 'ok'\n"
        f"except OSError as e:\n    out[{n!r}] = e.errno\n"
        for n in names if not n.startswith("root_"))
    got = json.loads(run_as(code + "print(json.dumps(out))", cwd=mnt, groups=[GROUP]))
    for n in names:
        if n.startswith("root_"):
            os.chown(mnt / n, -1, -1)
            got[n] = "ok"
    return {n: (got[n] if got[n] == "ok" else errno.errorcode[got[n]], *_priv_state(mnt, n),
                os.lstat(mnt / n).st_ctime_ns != before[n]) for n in names}


def test_chown_to_minus_one_strips_privileges_as_kernel_overlay(tmp_path, overlay_mount,
                                                                 kernel_mount):
    """``chown(f, -1, -1)`` of a non-directory strips setuid, setgid (with group-exec, or
    the caller outside the group and without CAP_FSETID) and the capability, as every
    chown does on Linux; where that would change the mode of someone else's file it fails
    with EPERM (``setattr_prepare``: only the owner may); and it changes the ctime. The
    kernel's FUSE sends it as a SETATTR asking for nothing (``fuse_setattr`` drops the
    kill and the ctime): the daemon does what the kernel overlay does (pjdfstest
    chown/00.t, which accepts either mode, showed the setuid bits kept)."""
    mounters = _mounters(overlay_mount, kernel_mount)
    states = {w: _chown_none_states(tmp_path, w, mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    diff = {n: (k[n], o[n]) for n in k if k[n] != o[n]}
    assert not diff, "\n".join(f"{n}: kernel {k[n]} overlaypc {o[n]}" for n in sorted(diff))
    # spelled out
    assert o["own_suid.up"][:2] == ("ok", oct(0o555)) and o["own_cap.lo"][4] == "ENODATA"
    assert o["other_suid.lo"][:2] == ("EPERM", oct(0o4755))
    # (the kernel's FUSE removes the capability itself, a REMOVEXATTR before the SETATTR)
    assert o["other_sgid_cap.lo"][0] == "EPERM" and o["other_sgid_cap.lo"][4] != "ENODATA"
    assert o["other_cap.lo"][:2] == ("ok", oct(0o755)) and o["other_cap.lo"][4] == "ENODATA"
    assert o["root_sgid_noexec.up"][:2] == ("ok", oct(0o2644))
    assert o["own_dir.up"][:2] == ("ok", oct(0o3775)) and o["own_plain.up"][5]


def _acl_writer_states(tmp_path: Path, which: str, mount) -> dict:
    """A setuid file of root's that an ACL entry (not the mode bits) lets 65534 write, in
    the lower and the upper: 65534's fallocate and write, then its chown(f, -1, -1)."""
    from overlaypc import acl
    base = tmp_path / which
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    value = acl.to_xattr([acl.AclEntry(acl.USER_OBJ, 7, 0xFFFFFFFF),
                          acl.AclEntry(acl.USER, 6, NOBODY),
                          acl.AclEntry(acl.GROUP_OBJ, 5, 0xFFFFFFFF),
                          acl.AclEntry(acl.MASK, 7, 0xFFFFFFFF),
                          acl.AclEntry(acl.OTHER, 5, 0xFFFFFFFF)])
    for n in ("fallocate", "write", "chown"):
        for where in ("lo", "up"):
            p = (lower if where == "lo" else upper) / f"{n}.{where}"
            p.write_bytes(b"#!/bin/sh\nexit 0\n")
            os.chmod(p, 0o4775)
            os.setxattr(p, "system.posix_acl_access", value)
    mnt = mount(lower, upper, work)
    out = json.loads(run_as("""
        import json
        out = {}
        for n in sorted(os.listdir(".")):
            try:
                if n.startswith("chown"):
                    os.chown(n, -1, -1)
                else:
                    fd = os.open(n, os.O_WRONLY)
                    if n.startswith("fallocate"):
                        os.posix_fallocate(fd, 0, 8192)
                    else:
                        os.pwrite(fd, b"#", 0)
                    os.close(fd)
                out[n] = "ok"
            except OSError as e:
                out[n] = e.errno
        print(json.dumps(out))
    """, cwd=mnt))
    return {n: (r if r == "ok" else errno.errorcode[r], *_priv_state(mnt, n)) for n, r in out.items()}


def test_setuid_file_an_acl_lets_write_as_kernel_overlay(tmp_path, overlay_mount, kernel_mount):
    """The empty SETATTR the kernel sends before a FALLOCATE (and a write while its mode is
    cached) of a setuid file comes from its writer, whom an ACL entry may let write where
    the mode bits do not: its kill is done, never an EPERM (``_chown_unchanged``); a
    chown(f, -1, -1) by that caller strips too there (Linux answers EPERM: the two cannot
    be told apart), everything else as on the kernel's overlay."""
    mounters = _mounters(overlay_mount, kernel_mount, extra="passthrough=off")
    states = {w: _acl_writer_states(tmp_path, w, mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    diff = {n: (k[n], o[n]) for n in k if k[n] != o[n] and not n.startswith("chown")}
    assert not diff, diff
    for n in ("fallocate.lo", "fallocate.up", "write.lo", "write.up"):
        assert o[n][:2] == ("ok", oct(0o775)), (n, o[n])
    assert k["chown.up"][0] == "EPERM" and o["chown.up"][:2] == ("ok", oct(0o775))


def _chown_each(mnt: Path, upper: Path, prelude: str = "", **run_kw) -> dict:
    """Each file of the mount's root chown'ed to -1, -1 by a child (``run_as``, after
    ``prelude``): its answer, ``_priv_state`` and whether it is in ``upper`` now."""
    out = json.loads(run_as(textwrap.dedent(prelude) + textwrap.dedent("""
        import json
        out = {}
        for n in sorted(os.listdir(".")):
            try:
                os.chown(n, -1, -1)
                out[n] = "ok"
            except OSError as e:
                out[n] = e.errno
        print(json.dumps(out))
    """), cwd=mnt, **run_kw))
    return {n: (r if r == "ok" else errno.errorcode[r], *_priv_state(mnt, n),
                os.path.exists(upper / n)) for n, r in out.items()}


def _acl_no_writer_states(tmp_path: Path, which: str, mount) -> dict:
    """Setuid files of root's (group ``GROUP``) whose access ACL does not let 65534 (a
    member of ``GROUP``) write, though it names it or the mode's group bits (its mask)
    have write: 65534's chown(f, -1, -1) of each, in the lower and the upper."""
    from overlaypc import acl
    base = tmp_path / which
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    any_id = 0xFFFFFFFF

    def entries(named: list[acl.AclEntry], group: int, mask: int) -> bytes:
        return acl.to_xattr(sorted([acl.AclEntry(acl.USER_OBJ, 7, any_id), *named,
                                    acl.AclEntry(acl.GROUP_OBJ, group, any_id),
                                    acl.AclEntry(acl.MASK, mask, any_id),
                                    acl.AclEntry(acl.OTHER, 5, any_id)], key=lambda e: e.tag))
    files = {
        "named_ro": entries([acl.AclEntry(acl.USER, 5, NOBODY)], 5, 5),      # r-x for it
        "named_masked": entries([acl.AclEntry(acl.USER, 7, NOBODY)], 5, 5),  # rwx, mask r-x
        "group_obj_ro": entries([acl.AclEntry(acl.USER, 5, 1234)], 5, 7),   # mask rwx (g+w)
        "named_group_ro": entries([acl.AclEntry(acl.GROUP, 5, GROUP)], 5, 7),
    }
    for n, value in files.items():
        for where in ("lo", "up"):
            p = (lower if where == "lo" else upper) / f"{n}.{where}"
            p.write_bytes(b"#!/bin/sh\nexit 0\n")
            os.chown(p, 0, GROUP if n == "group_obj_ro" else 0)
            os.chmod(p, 0o4755)
            os.setxattr(p, "system.posix_acl_access", value)
    mnt = mount(lower, upper, work)
    return _chown_each(mnt, upper, groups=[GROUP])


def test_setuid_file_an_acl_does_not_let_write_as_kernel_overlay(tmp_path, overlay_mount,
                                                                 kernel_mount):
    """chown(f, -1, -1) of someone else's setuid file by a caller its access ACL does not
    let write (a named entry without write, or one the mask takes it from, its group
    entries without write where the mode's group bits, the mask, have it) fails with
    EPERM and leaves the bit and the lower file alone, as on the kernel's overlay: an ACL
    is no licence to strip (``_chown_unchanged`` reads it)."""
    mounters = _mounters(overlay_mount, kernel_mount)
    states = {w: _acl_no_writer_states(tmp_path, w, mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    diff = {n: (k[n], o[n]) for n in k if k[n] != o[n]}
    assert not diff, "\n".join(f"{n}: kernel {k[n]} overlaypc {o[n]}" for n in sorted(diff))
    assert o["named_ro.lo"][:2] == ("EPERM", oct(0o4755)) and not o["named_ro.lo"][5]


def _userns_root_states(tmp_path: Path, which: str, mount) -> dict:
    """Root's setuid files, in the lower and the upper: 65534, as root of a user namespace
    of its own (all capabilities there, none over root's files), does chown(f, -1, -1)."""
    base = tmp_path / which
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for where in (lower, upper):
        p = where / f"suid.{where.name}"
        p.write_bytes(b"#!/bin/sh\nexit 0\n")
        os.chmod(p, 0o4755)
    mnt = mount(lower, upper, work)
    return _chown_each(mnt, upper, prelude="""
        import ctypes
        if ctypes.CDLL(None, use_errno=True).unshare(0x10000000):  # CLONE_NEWUSER
            raise OSError(ctypes.get_errno(), "unshare")
        caps = [ln for ln in open("/proc/self/status") if ln.startswith("CapEff:")]
        assert int(caps[0].split()[1], 16) >> 3 & 1  # CAP_FOWNER, in its namespace
    """)


def test_chown_to_minus_one_by_root_of_a_user_namespace_as_kernel_overlay(
        tmp_path, overlay_mount, kernel_mount):
    """A caller's capabilities count only in its own user namespace: root of one that an
    unprivileged user made has CAP_FOWNER there (``CapEff`` says all), none over root's
    files, so its chown(f, -1, -1) of root's setuid file fails with EPERM and copies
    nothing up, as on the kernel's overlay (``killpriv.has_capability``)."""
    mounters = _mounters(overlay_mount, kernel_mount)
    states = {w: _userns_root_states(tmp_path, w, mounters[w]) for w in mounters}
    k, o = states["kernel"], states["overlaypc"]
    diff = {n: (k[n], o[n]) for n in k if k[n] != o[n]}
    assert not diff, "\n".join(f"{n}: kernel {k[n]} overlaypc {o[n]}" for n in sorted(diff))
    assert o["suid.lower"][:2] == ("EPERM", oct(0o4755)) and not o["suid.lower"][5]


@pytest.mark.parametrize("extra", ["", "passthrough=off"])
def test_setuid_file_writer_that_lost_write_permission_as_kernel_overlay(
        tmp_path, overlay_mount, kernel_mount, extra):
    """A writer that opened root's setuid file while the mode let it write, then lost that
    to a chmod, writes and fallocates on: the kernel's ``file_remove_privs`` before each (an
    empty SETATTR) strips, never EPERM, as on the kernel's overlay (``_open_for_writing``:
    such a SETATTR is a chown(f, -1, -1) but for an open writable handle)."""
    res = {}
    for which in ("kernel", "overlaypc"):
        base = tmp_path / which
        lower, upper, work = base / "lower", base / "upper", base / "work"
        for d in (lower, upper, work):
            d.mkdir(parents=True)
        names = []
        for n in ("write", "falloc"):
            for w in (lower, upper):
                p = w / f"{n}.{w.name}"
                p.write_bytes(b"#!/bin/sh\nexit 0\n")
                os.chmod(p, 0o4777)
                names.append(p.name)
        if which == "kernel":
            mnt = kernel_mount([lower], upper, work)
        else:
            opts = ",".join(o for o in ("cache=kernel", extra) if o)
            mnt = overlay_mount(stack_options([lower], upper, work, opts)).path
        r1, w1 = os.pipe(); r2, w2 = os.pipe(); r3, w3 = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.chdir(mnt); os.setgroups([]); os.setgid(NOBODY); os.setuid(NOBODY)
                fds = {n: os.open(n, os.O_WRONLY) for n in names}
                os.write(w1, b"o")
                os.read(r2, 1)
                out = {}
                for n, fd in fds.items():
                    try:
                        if n.startswith("falloc"):
                            os.posix_fallocate(fd, 0, 8192)
                        else:
                            os.pwrite(fd, b"#", 0)
                        out[n] = "ok"
                    except OSError as e:
                        out[n] = errno.errorcode[e.errno]
                os.write(w3, json.dumps(out).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w1); os.close(w3)
        assert os.read(r1, 1)
        for n in names:
            os.chmod(mnt / n, 0o4755)
        os.write(w2, b"g")
        out = json.loads(os.read(r3, 65536))
        os.waitpid(pid, 0)
        res[which] = {n: (out[n], oct(os.lstat(mnt / n).st_mode)) for n in names}
    assert res["kernel"] == res["overlaypc"], res
    assert res["overlaypc"]["falloc.lower"] == ("ok", oct(0o100755))
