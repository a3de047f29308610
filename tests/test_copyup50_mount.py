"""copyup50's one-pass chmod through a mount: the kernel overlay as the oracle for what a chmod
of lower files shows (root's chmods of plain, setuid, ACL'd and xattr'd files and a ``chmod -R``;
a caller who does not own the file: EPERM, nothing copied up; an owner outside the file's group
asking for S_ISGID: the kernel's ``setattr_prepare`` drops it before the request, and the copy
has it not), and kill -9 of the daemon at the copy-up's fault points of such a chmod: the lower
file's mode after a fresh mount, no leftover, and the chmod then made.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from features_support import KERNEL_REDIRECT
from reliability_support import kill_at_pause
from test_protattr import _each_side
from upper_support import NOBODY, run_as, stack_options, work_leftovers

pytestmark = pytest.mark.mount

GROUP = 4242  # not nobody's own group
T = (1_600_000_000_000_000_000, 1_500_000_000_000_000_000)
ACL = (b"\x02\x00\x00\x00"
       b"\x01\x00\x06\x00\xff\xff\xff\xff"   # user_obj rw-
       b"\x02\x00\x07\x00\xd2\x04\x00\x00"   # user 1234 rwx
       b"\x04\x00\x05\x00\xff\xff\xff\xff"   # group_obj r-x
       b"\x10\x00\x07\x00\xff\xff\xff\xff"   # mask rwx
       b"\x20\x00\x04\x00\xff\xff\xff\xff")  # other r--


def _lower(root: Path) -> Path:
    lower = root / "lower"
    (lower / "d" / "tree" / "sub").mkdir(parents=True)
    for name, mode in {"plain": 0o644, "suid": 0o4755, "acl": 0o674, "xattr": 0o600,
                       "rootfile": 0o644, "mine": 0o644, "mine2": 0o644}.items():
        (lower / "d" / name).write_bytes(name.encode() * 10)
        os.chmod(lower / "d" / name, mode)
    for i in range(5):
        (lower / "d" / "tree" / f"f{i}").write_bytes(b"t" * i)
        (lower / "d" / "tree" / "sub" / f"g{i}").write_bytes(b"s" * i)
    os.setxattr(lower / "d" / "acl", "system.posix_acl_access", ACL)
    os.setxattr(lower / "d" / "xattr", "user.note", b"kept")
    for name in ("mine", "mine2"):
        os.chown(lower / "d" / name, NOBODY, GROUP)
    os.chmod(lower / "d", 0o777)
    os.chmod(lower, 0o755)
    for q in lower.rglob("*"):
        os.utime(q, ns=T, follow_symlinks=False)
    return lower


def _stat(q: Path, inos: dict):
    st = os.lstat(q)
    return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns,
            inos.get(st.st_ino, "own"))


def _session(mnt: Path, inos: dict) -> dict:
    got = {}
    d = mnt / "d"
    os.chmod(d, 0o777)
    for name, mode in (("plain", 0o640), ("suid", 0o6750), ("acl", 0o604), ("xattr", 0o444)):
        os.chmod(d / name, mode)
        got[name] = _stat(d / name, inos)
    got["acl value"] = os.getxattr(d / "acl", "system.posix_acl_access")
    got["xattr value"] = os.getxattr(d / "xattr", "user.note")
    got["chmod -R"] = subprocess.run(["chmod", "-R", "g+w,o-r", str(d / "tree")]).returncode
    got["tree"] = sorted((str(q.relative_to(mnt)), _stat(q, inos)) for q in (d / "tree").rglob("*"))
    # another user: the owner or CAP_FOWNER only (EPERM); the owner outside the group: the
    # setgid bit dropped; in it (a supplementary group): kept
    code = """
import errno, json, os
out = {}
for name, mode in (("d/rootfile", 0o600), ("d/mine", 0o2755)):
    try:
        os.chmod(name, mode)
        out[name] = oct(os.lstat(name).st_mode)
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
"""
    got["nobody"] = json.loads(run_as(code, uid=NOBODY, gid=NOBODY, cwd=mnt))
    got["in group"] = json.loads(run_as(code.replace("d/mine", "d/mine2"), uid=NOBODY,
                                        gid=NOBODY, groups=[GROUP], cwd=mnt))
    for name in ("rootfile", "mine", "mine2"):
        got["after " + name] = _stat(d / name, inos)
    return got


def test_chmods_of_lower_files_as_the_kernel(tmp_path, overlay_mount, kernel_mount):
    lower = _lower(tmp_path)
    inos = {os.lstat(q).st_ino: str(q.relative_to(lower)) for q in lower.rglob("*")}
    stacks: dict = {}
    got = _each_side(tmp_path, lower, lambda mnt: _session(mnt, inos), overlay_mount,
                     kernel_mount, stacks=stacks, opts=KERNEL_REDIRECT)
    assert got["kernel"]["nobody"] == {"d/rootfile": "EPERM", "d/mine": "0o100755"}
    assert got["kernel"]["in group"]["d/mine2"] == "0o102755"
    assert got["overlaypc"] == got["kernel"]
    for side, s in stacks.items():  # the refused chmod copied nothing up; the others' copies
        assert not (s.upper / "d" / "rootfile").exists(), side
        assert stat.S_IMODE(os.lstat(s.upper / "d" / "mine").st_mode) == 0o755, side
        assert os.getxattr(s.upper / "d" / "acl", "system.posix_acl_access") == \
            got[side]["acl value"], side


@pytest.mark.parametrize("point", ["copyup.fsync", "copyup.rename"])
def test_kill9_during_a_chmods_copy_up_leaves_the_lower_mode(point, tmp_path, overlay_mount):
    """kill -9 of the daemon stopped at ``point`` of a chmod's copy-up (the copy built in
    ``workdir/work`` with the chmod's mode, before its fsync / before its rename): after a
    fresh mount the file shows the lower file's mode (the chmod never answered), the workdir
    is empty, the lower unchanged; the chmod then goes through."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for q in (lower / "d", upper, work):
        q.mkdir(parents=True)
    (lower / "d" / "victim").write_bytes(b"lower data")
    os.chmod(lower / "d" / "victim", 0o644)
    before = os.lstat(lower / "d" / "victim")
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": f"{point}~victim=pause"})
    os.chmod(m / "d", 0o755)  # (copies d up: the file's own copy-up is the one paused)

    def the_copy_has_the_new_mode() -> None:
        temps = work_leftovers(work)
        assert len(temps) == 1, temps
        assert stat.S_IMODE(os.lstat(work / "work" / temps[0]).st_mode) == 0o600
    rc, out, err = kill_at_pause(m, f"""
        try:
            os.chmod({str(m / 'd' / 'victim')!r}, 0o600)
        except OSError as e:
            print(e); sys.exit(1)
        print("changed"); sys.exit(0)
    """, point, the_copy_has_the_new_mode)
    assert rc != 0, f"the chmod answered although the daemon was killed: {out} {err}"
    assert not (upper / "d" / "victim").exists()
    m2 = overlay_mount(opts)
    assert work_leftovers(work) == []
    assert stat.S_IMODE(os.lstat(m2 / "d" / "victim").st_mode) == 0o644
    assert (m2 / "d" / "victim").read_bytes() == b"lower data"
    os.chmod(m2 / "d" / "victim", 0o600)
    assert stat.S_IMODE(os.lstat(m2 / "d" / "victim").st_mode) == 0o600
    m2.unmount()
    assert stat.S_IMODE(os.lstat(upper / "d" / "victim").st_mode) == 0o600
    after = os.lstat(lower / "d" / "victim")
    assert (after.st_mode, after.st_ino, after.st_mtime_ns) == \
        (before.st_mode, before.st_ino, before.st_mtime_ns)


@pytest.mark.daemon_errors_ok
def test_a_chmods_copy_up_failing_at_its_parents_fsync_leaves_the_lower_mode(tmp_path, overlay_mount):
    """A chmod's copy-up (one pass: the copy made with the chmod's mode) that fails after its
    rename, at the parent's fsync (EIO injected there): the chmod answers the error and the
    copy in place has the lower file's mode back (``CopyUp._mode_back``, review50a; its
    rootless test, an unreadable upper directory, no longer fails there: ``Layer.fsync_dir``
    falls back to ``sync``)."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for q in (lower / "d", upper, work):
        q.mkdir(parents=True)
    (lower / "d" / "victim").write_bytes(b"lower data")
    os.chmod(lower / "d" / "victim", 0o644)
    m = overlay_mount(stack_options([lower], upper, work),
                      env={"OVERLAYPC_FAULTS": "copyup.parent_fsync~victim=eio"})
    with pytest.raises(OSError) as got:
        os.chmod(m / "d" / "victim", 0o600)
    assert got.value.errno == errno.EIO
    assert stat.S_IMODE(os.lstat(upper / "d" / "victim").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(m / "d" / "victim").st_mode) == 0o644
    assert (m / "d" / "victim").read_bytes() == b"lower data"
