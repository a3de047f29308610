"""POSIX ACLs (issue 12, defect 6): enforced through the mount, inherited by new objects,
kept by copy-up, each exactly as on the kernel's overlayfs over identical layers.

Access is checked as uid/gid 65534 with the supplementary group 4242 (a child process
that drops privileges), so named-user, named-group and mask entries all decide something.
Objects are created with umask 022: under a directory with a default ACL the umask must
not apply (the new object takes the default ACL, masked by the requested mode), elsewhere
it must. Layers live on the test's ext4 tmp dir, which supports ACLs; one test puts a lower
on ramfs, which has no xattrs at all.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import helpers
from overlaypc import acl
from upper_support import NOBODY, run_as, stack_options

GROUP = 4242  # a supplementary group of the unprivileged caller
ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"


def setfacl(path: Path, *args: str) -> None:
    helpers.require(shutil.which("setfacl") is not None, "needs setfacl (Debian package acl)")
    subprocess.run(["setfacl", *args, str(path)], check=True, capture_output=True)


def getfacl(path: Path) -> str:
    r = subprocess.run(["getfacl", "-n", "--omit-header", "--", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def xattr_or_none(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def acl_state(path: Path) -> tuple:
    """Mode, owner and both ACLs (as getfacl shows them, and the raw xattrs)."""
    s = os.lstat(path)
    return (oct(s.st_mode), s.st_uid, s.st_gid, getfacl(path),
            xattr_or_none(path, ACCESS), xattr_or_none(path, DEFAULT))


def two_stacks(tmp_path: Path, build, overlay_mount, kernel_mount, *, lower_base=None) -> dict:
    """Build identical layers twice (``build(lower, upper)``), mount the kernel overlay over
    one copy and overlaypc over the other. -> {"kernel"|"overlaypc": (mnt, lower, upper)}."""
    out = {}
    for which in ("kernel", "overlaypc"):
        base = tmp_path / which
        lower = (Path(lower_base) if lower_base else base) / f"lower-{which}"
        upper, work = base / "upper", base / "work"
        for d in (lower, upper, work):
            d.mkdir(parents=True)
        build(lower, upper)
        if which == "kernel":
            mnt = kernel_mount([lower], upper, work)
        else:
            mnt = overlay_mount(stack_options([lower], upper, work)).path
        out[which] = (mnt, lower, upper)
    return out


ACCESS_SCRIPT = r"""
import errno, json
OPS = json.loads(os.environ["ACL_OPS"])
def attempt(op, p):
    if op == "read":
        os.close(os.open(p, os.O_RDONLY))
    elif op == "write":
        os.close(os.open(p, os.O_WRONLY))
    elif op == "list":
        os.listdir(p)
    elif op == "stat_child":
        os.stat(p + "/child")
    elif op == "create":
        os.close(os.open(p + "/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif op == "setacl":
        os.setxattr(p, "system.posix_acl_access", os.getxattr(p, "system.posix_acl_access"))
R = {}
for p, op in OPS:
    try:
        attempt(op, p)
        R[f"{p} {op}"] = "ok"
    except OSError as e:
        R[f"{p} {op}"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(R))
"""


def as_nobody(root: Path, ops: list[tuple[str, str]]) -> dict[str, str]:
    """Run ``(relative path, op)`` attempts in order as 65534:65534 (+ group 4242)."""
    code = f"os.environ['ACL_OPS'] = {json.dumps(ops)!r}\n" + ACCESS_SCRIPT
    return json.loads(run_as(code, uid=NOBODY, gid=NOBODY, groups=[GROUP], cwd=root))


# --------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------

def test_named_user_entry_denies_nobody_as_on_the_lower_and_kernel_overlay(
        tmp_path, overlay_mount, kernel_mount):
    """A lower file 0644 with ``user:nobody:---``: nobody may not read it on the lower
    itself, through the kernel's overlay, or through overlaypc."""
    def build(lower, upper):
        (lower / "secret").write_bytes(b"secret\n")
        os.chmod(lower / "secret", 0o644)
        setfacl(lower / "secret", "-m", f"u:{NOBODY}:---")

    stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount)
    ops = [("secret", "read")]
    assert as_nobody(stacks["overlaypc"][1], ops) == {"secret read": "EACCES"}  # the lower
    assert as_nobody(stacks["kernel"][0], ops) == {"secret read": "EACCES"}
    assert as_nobody(stacks["overlaypc"][0], ops) == {"secret read": "EACCES"}


# --------------------------------------------------------------------------------------
# Access decided by named-user, named-group and mask entries
# --------------------------------------------------------------------------------------

# name -> (mode, setfacl -m spec, {op: expected answer for 65534 with group 4242})
ACL_FILES = {
    "user_deny": (0o644, f"u:{NOBODY}:---", {"read": "EACCES", "write": "EACCES"}),
    "user_grant": (0o600, f"u:{NOBODY}:rw-", {"read": "ok", "write": "ok"}),
    "group_deny": (0o644, f"g:{GROUP}:---", {"read": "EACCES", "write": "EACCES"}),
    "group_grant": (0o600, f"g:{GROUP}:r--", {"read": "ok", "write": "EACCES"}),
    "mask_limits_user": (0o600, f"u:{NOBODY}:rw-,m::r--", {"read": "ok", "write": "EACCES"}),
    "mask_limits_group": (0o600, f"g:{GROUP}:rw-,m::---", {"read": "EACCES", "write": "EACCES"}),
}
ACL_DIRS = {
    "d_user_deny": (0o755, f"u:{NOBODY}:---", {"list": "EACCES", "stat_child": "EACCES"}),
    "d_group_grant": (0o700, f"g:{GROUP}:rwx", {"list": "ok", "stat_child": "ok", "create": "ok"}),
    "d_mask_limits": (0o700, f"u:{NOBODY}:rwx,m::r-x", {"list": "ok", "create": "EACCES"}),
}


def _build_acl_tree(root: Path) -> None:
    root.mkdir()
    for name, (mode, spec, _) in ACL_FILES.items():
        (root / name).write_bytes(b"data\n")
        os.chmod(root / name, mode)
        setfacl(root / name, "-m", spec)
    for name, (mode, spec, _) in ACL_DIRS.items():
        (root / name).mkdir()
        (root / name / "child").write_bytes(b"child\n")
        os.chmod(root / name, mode)
        setfacl(root / name, "-m", spec)


def _acl_ops() -> list[tuple[str, str]]:
    ops = []
    for top in ("lo", "up"):
        for table in (ACL_FILES, ACL_DIRS):
            for name, (_, _, expected) in table.items():
                ops += [(f"{top}/{name}", op) for op in expected]
                ops.append((f"{top}/{name}", "setacl"))  # only the owner may: EPERM
    return ops


def test_named_user_group_and_mask_entries_match_kernel_overlay(tmp_path, overlay_mount,
                                                                kernel_mount):
    """Files and directories with named-user, named-group and mask entries, in the lower
    and already in the upper: what 65534 may do matches the kernel's overlay and the ACL's
    meaning, and the merged trees (ACL xattrs included) end up the same."""
    def build(lower, upper):
        _build_acl_tree(lower / "lo")
        _build_acl_tree(upper / "up")
        os.mkdir(lower / "up")

    stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount)
    ops = _acl_ops()
    results = {w: as_nobody(stacks[w][0], ops) for w in stacks}
    expected = {}
    for top in ("lo", "up"):
        for table in (ACL_FILES, ACL_DIRS):
            for name, (_, _, answers) in table.items():
                expected.update({f"{top}/{name} {op}": a for op, a in answers.items()})
                expected[f"{top}/{name} setacl"] = "EPERM"
    assert results["kernel"] == expected, "the oracle disagrees with the ACLs' meaning"
    diff = {k: (results["kernel"][k], results["overlaypc"][k]) for k in expected
            if results["kernel"][k] != results["overlaypc"][k]}
    assert not diff, "op: (kernel, overlaypc)\n" + "\n".join(f"  {k}: {v}" for k, v in diff.items())
    trees = {w: helpers.tree_snapshot(stacks[w][0]) for w in stacks}
    tdiff = helpers.diff_snapshots(trees["kernel"], trees["overlaypc"], ("kernel", "overlaypc"))
    assert not tdiff, tdiff
    # the lower "user_grant" was copied up by the write and kept its ACL
    up = stacks["overlaypc"][2] / "lo" / "user_grant"
    assert xattr_or_none(up, ACCESS) == xattr_or_none(stacks["overlaypc"][1] / "lo" / "user_grant", ACCESS)


def test_acl_changed_through_the_mount_takes_effect_at_once(tmp_path, overlay_mount,
                                                            kernel_mount):
    """setfacl and chmod through the mount (on lower files, so with copy-up, and on one
    name of an upper hard link) change what 65534 may do immediately, through every name,
    as on the kernel's overlay: no cached ACL or mode survives."""
    def build(lower, upper):
        for name in ("f", "g"):
            (lower / name).write_bytes(b"data\n")
            os.chmod(lower / name, 0o644)
        setfacl(lower / "g", "-m", f"u:{NOBODY}:rw-")  # mode becomes 0664 (mask rw-)
        (upper / "h1").write_bytes(b"linked\n")
        os.chmod(upper / "h1", 0o644)
        os.link(upper / "h1", upper / "h2")

    stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount)
    ops = [("f", "read"), ("g", "write"), ("h2", "read")]
    steps = {}
    for which, (mnt, _, _) in stacks.items():
        seen = [as_nobody(mnt, ops)]  # the kernel now caches all three ACLs (none / some)
        setfacl(mnt / "f", "-m", f"u:{NOBODY}:---")
        os.chmod(mnt / "g", 0o644)  # the mask follows the group bits: r--
        setfacl(mnt / "h1", "-m", f"u:{NOBODY}:---")
        seen.append(as_nobody(mnt, ops))
        setfacl(mnt / "f", "-x", f"u:{NOBODY}")
        setfacl(mnt / "h1", "-b")
        seen.append(as_nobody(mnt, ops))
        steps[which] = (seen, acl_state(mnt / "f"), acl_state(mnt / "g"), acl_state(mnt / "h2"))
    assert steps["kernel"][0] == [{"f read": "ok", "g write": "ok", "h2 read": "ok"},
                                  {"f read": "EACCES", "g write": "EACCES", "h2 read": "EACCES"},
                                  {"f read": "ok", "g write": "EACCES", "h2 read": "ok"}]
    assert steps["overlaypc"] == steps["kernel"]


# --------------------------------------------------------------------------------------
# Default ACLs: inheritance by new objects, and the umask
# --------------------------------------------------------------------------------------

DEFAULT_SPEC = f"d:u:{NOBODY}:rwx,d:g:{GROUP}:r-x,d:m::rwx,d:o::r-x"
CREATE_SCRIPT = r"""
import json
DIRS = json.loads(os.environ["ACL_DIRS"])
for d in DIRS:
    os.close(os.open(f"{d}/f666", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.close(os.open(f"{d}/f640", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    os.mkdir(f"{d}/sub", 0o777)
    os.mkdir(f"{d}/sub750", 0o750)
    os.mkfifo(f"{d}/fifo", 0o666)
    os.close(os.open(f"{d}/sub/nested", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.symlink("f666", f"{d}/ln")
    if os.path.exists(f"{d}/old_file"):  # recreated over a whiteout when it was lower
        os.unlink(f"{d}/old_file")
        os.close(os.open(f"{d}/old_file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.rmdir(f"{d}/old_dir")
        os.mkdir(f"{d}/old_dir", 0o777)
        os.mknod(f"{d}/old_dir/node", 0o640 | stat.S_IFIFO)
"""
NEW_NAMES = ("f666", "f640", "sub", "sub750", "fifo", "sub/nested", "ln")


def _dflt_dir(d: Path, *, default_acl: bool, sgid: bool = False) -> None:
    d.mkdir()
    (d / "old_file").write_bytes(b"old\n")
    (d / "old_dir").mkdir()
    os.chmod(d, 0o2775 if sgid else 0o775)
    if sgid:
        os.chown(d, 0, GROUP)
    setfacl(d, "-m", f"u:{NOBODY}:rwx")  # 65534 may create here
    if default_acl:
        setfacl(d, "-m", DEFAULT_SPEC)


DFLT_DIRS = {"lo_dflt": True, "lo_plain": False, "lo_sgid": True}


def test_default_acl_inherited_by_new_objects_and_umask_applied_elsewhere(
        tmp_path, overlay_mount, kernel_mount):
    """As 65534 with umask 022, create files, directories, a fifo and a symlink in
    directories with a default ACL (one of them setgid) and without, in the lower and in the
    upper, also over whiteouts of lower names (overlaypc then builds them in workdir/work):
    modes, owners, ACLs (getfacl and raw xattrs) match the kernel's overlay, and the upper
    keeps the default ACL of each copied-up directory."""
    def build(lower, upper):
        for name, dflt in DFLT_DIRS.items():
            _dflt_dir(lower / name, default_acl=dflt, sgid=name.endswith("sgid"))
            _dflt_dir(upper / name.replace("lo_", "up_"), default_acl=dflt,
                      sgid=name.endswith("sgid"))
        for name in DFLT_DIRS:  # upper-only: no whiteouts there
            up = upper / name.replace("lo_", "up_")
            os.unlink(up / "old_file")
            os.rmdir(up / "old_dir")

    stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount)
    dirs = [*DFLT_DIRS, *(n.replace("lo_", "up_") for n in DFLT_DIRS)]
    states = {}
    for which, (mnt, _, upper) in stacks.items():
        code = f"os.environ['ACL_DIRS'] = {json.dumps(dirs)!r}\n" + CREATE_SCRIPT
        run_as(code, uid=NOBODY, gid=NOBODY, groups=[GROUP], cwd=mnt, umask=0o022)
        names = [f"{d}/{n}" for d in dirs for n in NEW_NAMES]
        names += [f"{d}/{n}" for d in DFLT_DIRS for n in ("old_file", "old_dir", "old_dir/node")]
        states[which] = {
            "merged": {n: acl_state(mnt / n) for n in names + dirs},
            "upper": {n: acl_state(upper / n) for n in names + dirs},
        }
    k, o = states["kernel"], states["overlaypc"]
    for part in ("merged", "upper"):
        diff = {n: (k[part][n], o[part][n]) for n in k[part] if k[part][n] != o[part][n]}
        assert not diff, f"{part}: name: (kernel, overlaypc)\n" + \
            "\n".join(f"  {n}:\n    {a}\n    {b}" for n, (a, b) in diff.items())
    # what that means, spelled out on overlaypc's results
    merged = o["merged"]
    for d in ("lo_dflt", "up_dflt"):
        # default ACL masked by 0666: user rw-, mask rw-, other r--; the umask 022 not applied
        assert merged[f"{d}/f666"][0] == oct(stat.S_IFREG | 0o664), merged[f"{d}/f666"]
        assert any(line.startswith(f"user:{NOBODY}:rwx") and line.endswith("#effective:rw-")
                   for line in merged[f"{d}/f666"][3].splitlines()), merged[f"{d}/f666"][3]
        assert merged[f"{d}/sub"][0] == oct(stat.S_IFDIR | 0o775)
        assert merged[f"{d}/sub"][5] == merged[d][5] is not None  # default ACL inherited
        assert merged[f"{d}/sub/nested"][4] == merged[f"{d}/f666"][4]
    assert merged["lo_dflt/old_file"][:5] == merged["lo_dflt/f666"][:5]  # over a whiteout
    assert merged["lo_dflt/old_dir"][4:] == merged["lo_dflt/sub"][4:]
    for d in ("lo_plain", "up_plain"):
        assert merged[f"{d}/f666"][0] == oct(stat.S_IFREG | 0o644)  # umask applied
        assert merged[f"{d}/sub"][0] == oct(stat.S_IFDIR | 0o755)
        assert merged[f"{d}/f666"][4] is None and merged[f"{d}/sub"][5] is None
    assert merged["lo_sgid/sub"][0] == oct(stat.S_IFDIR | stat.S_ISGID | 0o775)
    assert merged["lo_sgid/old_dir"][0] == oct(stat.S_IFDIR | stat.S_ISGID | 0o775)
    # the copied-up directories kept their default ACL
    for d in ("lo_dflt", "lo_sgid"):
        assert o["upper"][d][5] == xattr_or_none(stacks["overlaypc"][1] / d, DEFAULT) is not None


def test_workdir_default_acl_does_not_leak_into_new_objects(tmp_path, overlay_mount,
                                                            kernel_mount):
    """A default ACL on the workdir (inherited by ``workdir/work``) must not reach objects
    built there: overlaypc strips ACLs from ``work`` at mount, as the kernel does."""
    results = {}
    for which in ("kernel", "overlaypc"):
        base = tmp_path / which
        lower, upper, work = base / "lower", base / "upper", base / "work"
        for d in (lower, upper, work):
            d.mkdir(parents=True)
        (lower / "old").write_bytes(b"old\n")
        (lower / "copied").write_bytes(b"copied\n")
        setfacl(work, "-d", "-m", f"u:{NOBODY}:rwx")
        if which == "kernel":
            mnt = kernel_mount([lower], upper, work)
        else:
            mnt = overlay_mount(stack_options([lower], upper, work)).path
        os.unlink(mnt / "old")
        old_umask = os.umask(0o022)
        try:
            os.close(os.open(mnt / "old", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        finally:
            os.umask(old_umask)
        os.utime(mnt / "copied")
        results[which] = {n: acl_state(mnt / n) for n in ("old", "copied")}
        results[which]["work"] = xattr_or_none(work / "work", DEFAULT)
    assert results["overlaypc"] == results["kernel"]
    assert results["overlaypc"]["old"][4] is None and results["overlaypc"]["work"] is None
    assert results["overlaypc"]["old"][0] == oct(stat.S_IFREG | 0o644)


PERM = st.integers(0, 7)
DEFAULT_ACLS = st.tuples(PERM, PERM, PERM, st.one_of(st.none(), PERM), st.one_of(st.none(), PERM),
                         PERM)


@given(default=DEFAULT_ACLS, mode=st.integers(0, 0o7777),
       kind=st.sampled_from([stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO]))
def test_inherit_computes_what_the_filesystem_does(tmp_path, default, mode, kind):
    """``acl.inherit`` (used for objects built in workdir/work) against the real rule: the
    same object created on this ext4 in a directory with that default ACL, umask ignored."""
    user_obj, group_obj, other, named_user, named_group, mask = default
    entries = [acl.AclEntry(acl.USER_OBJ, user_obj, 0xFFFFFFFF)]
    if named_user is not None:
        entries.append(acl.AclEntry(acl.USER, named_user, NOBODY))
    entries.append(acl.AclEntry(acl.GROUP_OBJ, group_obj, 0xFFFFFFFF))
    if named_group is not None:
        entries.append(acl.AclEntry(acl.GROUP, named_group, GROUP))
    if named_user is not None or named_group is not None:
        entries.append(acl.AclEntry(acl.MASK, mask, 0xFFFFFFFF))
    entries.append(acl.AclEntry(acl.OTHER, other, 0xFFFFFFFF))
    value = acl.to_xattr(entries)
    mode &= 0o1777 if kind == stat.S_IFDIR else 0o6777  # what mkdir/open pass on
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        os.setxattr(d, DEFAULT, value)
        p = os.path.join(d, "new")
        old_umask = os.umask(0o077)  # must not matter under a default ACL
        try:
            if kind == stat.S_IFDIR:
                os.mkdir(p, mode)
            elif kind == stat.S_IFIFO:
                os.mkfifo(p, mode)
            else:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        finally:
            os.umask(old_umask)
        new = acl.inherit(value, kind | mode, 0o077)
        assert (oct(new.mode), new.access, new.default) == \
            (oct(os.lstat(p).st_mode), xattr_or_none(Path(p), ACCESS), xattr_or_none(Path(p), DEFAULT))


# --------------------------------------------------------------------------------------
# Copy-up keeps ACLs
# --------------------------------------------------------------------------------------

def test_copy_up_keeps_acls(tmp_path, overlay_mount, kernel_mount):
    """Lower files and a directory with ACLs, copied up by chmod, a write, utimens,
    setfacl and a create inside: the upper objects carry the ACLs the kernel's copy-up
    gives them (the lower's, except where the operation itself changes them), and 65534's
    access afterwards is the kernel's."""
    files = {  # name -> (mode, setfacl spec)
        "chmod_me": (0o640, f"u:{NOBODY}:r--"),
        "write_me": (0o600, f"u:{NOBODY}:r--"),
        "touch_me": (0o644, f"u:{NOBODY}:---"),
        "setfacl_me": (0o644, f"g:{GROUP}:rw-"),
    }

    def build(lower, upper):
        for name, (mode, spec) in files.items():
            (lower / name).write_bytes(b"data\n")
            os.chmod(lower / name, mode)
            setfacl(lower / name, "-m", spec)
        (lower / "ddir").mkdir()
        setfacl(lower / "ddir", "-m", f"u:{NOBODY}:r-x")
        setfacl(lower / "ddir", "-d", "-m", f"u:{NOBODY}:---")  # other r-- would grant

    stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount)
    ops = [(n, op) for n in files for op in ("read", "write")] + [("ddir", "list")]
    states = {}
    for which, (mnt, lower, upper) in stacks.items():
        before = as_nobody(mnt, ops)
        os.chmod(mnt / "chmod_me", 0o600)  # mask becomes ---
        with open(mnt / "write_me", "ab") as f:
            f.write(b"more\n")
        os.utime(mnt / "touch_me", ns=(10**18, 10**18))
        setfacl(mnt / "setfacl_me", "-m", f"u:{NOBODY}:---")
        (mnt / "ddir" / "new").write_bytes(b"new\n")  # as root: the dir is copied up
        after = as_nobody(mnt, ops + [("ddir/new", "read")])
        names = [*files, "ddir", "ddir/new"]
        states[which] = (before, after, {n: acl_state(upper / n) for n in names},
                         {n: acl_state(mnt / n) for n in names})
    k, o = states["kernel"], states["overlaypc"]
    for i, part in enumerate(("access before", "access after", "upper", "merged")):
        assert o[i] == k[i], f"{part}:\n kernel    {k[i]}\n overlaypc {o[i]}"
    # spelled out: copy-up alone changes no ACL, and the denials hold in the upper
    lower = stacks["overlaypc"][1]
    for n in ("write_me", "touch_me", "ddir"):
        assert o[2][n][4:] == (xattr_or_none(lower / n, ACCESS), xattr_or_none(lower / n, DEFAULT)), n
    assert k[1]["touch_me read"] == k[1]["chmod_me read"] == k[1]["setfacl_me read"] == "EACCES"
    assert k[1]["write_me read"] == "ok" and k[1]["write_me write"] == "EACCES"
    assert k[1]["ddir/new read"] == "EACCES" and k[1]["ddir list"] == "ok"


# --------------------------------------------------------------------------------------
# Layers without ACL support
# --------------------------------------------------------------------------------------

def test_lower_without_acl_support_still_grants_by_mode(tmp_path, overlay_mount, kernel_mount):
    """A lower on ramfs (no xattrs, so no ACLs): getxattr of an ACL there fails with
    EOPNOTSUPP, which must mean "no ACL" to the kernel's check, not a refusal."""
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)], check=True, capture_output=True)
    try:
        def build(lower, upper):
            (lower / "grp").write_bytes(b"group readable\n")
            os.chown(lower / "grp", 0, GROUP)
            os.chmod(lower / "grp", 0o640)
            (lower / "d").mkdir()
            os.chown(lower / "d", 0, GROUP)
            os.chmod(lower / "d", 0o750)
            (lower / "d" / "child").write_bytes(b"c\n")

        stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount, lower_base=ramfs)
        ops = [("grp", "read"), ("grp", "write"), ("d", "list"), ("d", "stat_child")]
        results = {w: as_nobody(stacks[w][0], ops) for w in stacks}
        assert results["kernel"] == {"grp read": "ok", "grp write": "EACCES", "d list": "ok",
                                     "d stat_child": "ok"}
        assert results["overlaypc"] == results["kernel"]
    finally:
        # the overlay mounts over it are unmounted by the fixtures after this test: detach
        # ramfs lazily now, it goes away with them
        subprocess.run(["umount", "-l", str(ramfs)], capture_output=True)


def test_acl_set_by_owner_outside_the_group_clears_setgid(tmp_path, overlay_mount,
                                                          kernel_mount):
    """Setting an access ACL clears S_ISGID when the caller is neither in the file's group
    nor holds CAP_FSETID (``posix_acl_update_mode``): the kernel says so only through
    FUSE_SETXATTR_ACL_KILL_SGID (SETXATTR_EXT), and the root daemon's own setxattr keeps
    the bit, so the daemon clears it."""
    def build(lower, upper):
        for p in (lower / "lf", upper / "uf"):
            p.write_bytes(b"data\n")
            os.chown(p, NOBODY, 0)  # 65534 owns it but is not in group 0
            os.chmod(p, 0o2775)

    stacks = two_stacks(tmp_path, build, overlay_mount, kernel_mount)
    modes = {}
    for which, (mnt, _, _) in stacks.items():
        run_as("""
            for n in ("lf", "uf"):
                os.setxattr(n, "system.posix_acl_access", ACL)
        """.replace("ACL", repr(_ACL_U1234_R)), cwd=mnt)
        modes[which] = {n: oct(os.lstat(mnt / n).st_mode) for n in ("lf", "uf")}
    assert modes["kernel"] == {"lf": oct(stat.S_IFREG | 0o775), "uf": oct(stat.S_IFREG | 0o775)}
    assert modes["overlaypc"] == modes["kernel"]


# user::rwx user:1234:r-- group::rwx mask::rwx other::r-x
_ACL_U1234_R = bytes.fromhex("02000000" "01000700ffffffff" "02000400d2040000" "04000700ffffffff"
                             "10000700ffffffff" "20000500ffffffff")
