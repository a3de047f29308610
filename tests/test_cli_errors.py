"""Bad input to the CLI: exit status 2, one ``overlaypc: error:`` line naming the bad value,
nothing mounted, nothing written.

Every case runs the daemonizing form (no ``-f``) under a timeout, so a wrongly successful
mount is noticed and taken down again (helpers.run_overlaypc).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import re
import os
import subprocess
import threading
from pathlib import Path
from typing import Optional

import pytest

import helpers


@dataclasses.dataclass
class Env:
    """A valid stack (lower L, upper U, work W on one filesystem) plus a mountpoint."""
    tmp: Path
    lower: Path
    lower2: Path
    upper: Path
    work: Path
    mnt: Path
    a_file: Path


@pytest.fixture
def env(tmp_path: Path) -> Env:
    lower = helpers.build_layer(tmp_path / "lower", {"f.txt": "lower", "d": {"x": "x"}})
    lower2 = helpers.build_layer(tmp_path / "lower2", {"g.txt": "lower2"})
    upper = tmp_path / "upper"
    work = tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    (upper / "kept.txt").write_text("upper content")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a directory")
    return Env(tmp_path, lower, lower2, upper, work, mnt, a_file)


def check_refused(env: Env, args: list, bad_values: list, *, watched: tuple = (),
                  mountpoint: Optional[Path] = None, any_of: bool = False,
                  prefix: tuple = ()) -> helpers.CliResult:
    """Run overlaypc with `args` and check the whole error contract.

    `bad_values`: strings the error line must contain (all of them, or one with `any_of`).
    `watched`: extra directories that must be unchanged (upper, work, lowers, mnt always are).
    `prefix`: a command that runs overlaypc (``prlimit ...``).
    """
    mnt = mountpoint or env.mnt
    dirs = {str(p): p for p in (env.lower, env.lower2, env.upper, env.work, env.mnt, mnt,
                                *watched)}
    before = {k: helpers.dir_state(p) for k, p in dirs.items()}
    mounts_before = helpers.mounts_at(mnt)

    res = helpers.run_overlaypc(args, mnt, env.tmp, prefix=prefix)

    detail = (f"command: {' '.join(res.args)}\nexit status: {res.returncode}\n"
              f"stderr: {res.stderr!r}\nstdout: {res.stdout!r}")
    assert not res.timed_out, "overlaypc neither failed nor returned within the timeout\n" + detail
    assert not res.wrongly_mounted, "overlaypc mounted despite bad input\n" + detail
    assert res.returncode == 2, detail
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, "expected exactly one line on stderr\n" + detail
    line = lines[0]
    assert line.startswith("overlaypc: error:"), detail
    hits = [v for v in map(str, bad_values) if v in line]
    if any_of:
        assert hits, f"error line names none of {bad_values}\n" + detail
    else:
        assert hits == [str(v) for v in bad_values], \
            f"error line must name {bad_values}\n" + detail
    assert helpers.mounts_at(mnt) == mounts_before, "mount table changed at the mountpoint"
    for k, p in dirs.items():
        assert helpers.dir_state(p) == before[k], f"{k} was changed by a refused invocation"
    return res


def opts(*parts: str) -> str:
    return ",".join(parts)


# --- option errors ---------------------------------------------------------------------

def test_missing_lowerdir(env: Env):
    check_refused(env, ["-o", opts(f"upperdir={env.upper}", f"workdir={env.work}"), env.mnt],
                  ["lowerdir"])


def test_no_options_at_all(env: Env):
    check_refused(env, [env.mnt], ["lowerdir"])


def test_lower_is_a_file(env: Env):
    check_refused(env, ["-o", f"lowerdir={env.lower}:{env.a_file}", env.mnt], [env.a_file])


def test_lower_missing(env: Env):
    missing = env.tmp / "no-such-lower"
    check_refused(env, ["-o", f"lowerdir={missing}", env.mnt], [missing])
    assert not missing.exists()


def test_upper_without_work(env: Env):
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}"), env.mnt],
                  ["workdir"])


def test_work_without_upper(env: Env):
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"workdir={env.work}"), env.mnt],
                  ["upperdir"])


def test_upper_missing(env: Env):
    missing = env.tmp / "no-such-upper"
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={missing}",
                                   f"workdir={env.work}"), env.mnt], [missing])
    assert not missing.exists(), "a missing upperdir must not be created"


def test_work_missing(env: Env):
    missing = env.tmp / "no-such-work"
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={missing}"), env.mnt], [missing])
    assert not missing.exists(), "a missing workdir must not be created"


def test_upper_and_work_on_different_filesystems(env: Env, tmpfs_factory):
    other_fs_work = tmpfs_factory() / "work"
    other_fs_work.mkdir()
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={other_fs_work}"), env.mnt],
                  [other_fs_work, env.upper], any_of=True, watched=(other_fs_work,))


def test_work_inside_upper(env: Env):
    work = env.upper / "work"
    work.mkdir()
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={work}"), env.mnt], [work])


def test_upper_inside_a_lower(env: Env):
    upper = env.lower / "up"
    upper.mkdir()
    check_refused(env, ["-o", opts(f"lowerdir={env.lower2}:{env.lower}", f"upperdir={upper}",
                                   f"workdir={env.work}"), env.mnt], [upper])


@pytest.mark.parametrize("option, bad", [
    ("frobnicate", "frobnicate"),
    ("frobnicate=1", "frobnicate"),
    ("cache=bogusmode", "bogusmode"),
    ("handles=bogushandles", "bogushandles"),
    # fuse-overlayfs's options are accepted (issue 14), with their values checked
    ("uidmapping=0:100000", "uidmapping='0:100000'"),
    ("gidmapping=0:100000:10:5:100005:10", "overlaps"),
    ("xattr_permissions=3", "xattr_permissions='3'"),
    ("squash_to_uid=root", "squash_to_uid='root'"),
    ("fsync=never", "fsync='never'"),
    ('context="unbalanced', "unbalanced"),
    # ... but what is neither overlaypc's nor fuse-overlayfs's still is not
    ("uid=1000", "uid=1000"),
    ("squash_to_nobody", "squash_to_nobody"),
])
def test_unknown_or_bad_option(env: Env, option: str, bad: str):
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={env.work}", option), env.mnt], [bad])


def test_bench_workers_not_a_number(env: Env):
    """The benchmark-only ``OVERLAYPC_BENCH_WORKERS`` not a number: refused before the mount
    (it was read after it: a ValueError's traceback, and the mount left to the caller)."""
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={env.work}"), env.mnt],
                  ["OVERLAYPC_BENCH_WORKERS='two'"], prefix=("env", "OVERLAYPC_BENCH_WORKERS=two"))


# --- mountpoint and exclusivity ----------------------------------------------------------

def test_mountpoint_already_a_mount(env: Env):
    helpers.require("root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(env.mnt)], check=True)
    try:
        assert [m.fstype for m in helpers.mounts_at(env.mnt)] == ["tmpfs"]
        check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                       f"workdir={env.work}"), env.mnt], [env.mnt])
        assert [m.fstype for m in helpers.mounts_at(env.mnt)] == ["tmpfs"]
    finally:
        helpers.force_unmount(env.mnt)


def test_upper_and_work_in_use_by_another_mount(env: Env, overlay_mount, mountpoint):
    first = overlay_mount(opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                               f"workdir={env.work}"))
    second_mnt = mountpoint("second")
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={env.work}"), second_mnt],
                  [env.upper, env.work], any_of=True, mountpoint=second_mnt)
    assert helpers.is_mounted(first.path, helpers.FSTYPE), "first mount must be unaffected"
    assert (first.path / "f.txt").read_text() == "lower"


def test_upper_in_use_with_another_workdir(env: Env, overlay_mount, mountpoint):
    overlay_mount(opts(f"lowerdir={env.lower}", f"upperdir={env.upper}", f"workdir={env.work}"))
    work2 = env.tmp / "work2"
    work2.mkdir()
    second_mnt = mountpoint("second")
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={work2}"), second_mnt],
                  [env.upper], mountpoint=second_mnt, watched=(work2,))


def test_work_in_use_with_another_upper(env: Env, overlay_mount, mountpoint):
    overlay_mount(opts(f"lowerdir={env.lower}", f"upperdir={env.upper}", f"workdir={env.work}"))
    upper2 = env.tmp / "upper2"
    upper2.mkdir()
    second_mnt = mountpoint("second")
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={upper2}",
                                   f"workdir={env.work}"), second_mnt],
                  [env.work], mountpoint=second_mnt, watched=(upper2,))


def test_index_upper_used_over_other_lowers(env: Env, overlay_mount):
    """index=on: the upper root records the lower it was made over (as the kernel's)."""
    overlay_mount(opts(f"lowerdir={env.lower}", f"upperdir={env.upper}", f"workdir={env.work}",
                       "index=on")).unmount()
    check_refused(env, ["-o", opts(f"lowerdir={env.lower2}", f"upperdir={env.upper}",
                                   f"workdir={env.work}", "index=on"), env.mnt],
                  ["index=on", env.upper, env.lower2])


def test_index_workdir_used_with_another_upper(env: Env, overlay_mount):
    """index=on: the index dir records the upper it indexes (as the kernel's)."""
    overlay_mount(opts(f"lowerdir={env.lower}", f"upperdir={env.upper}", f"workdir={env.work}",
                       "index=on")).unmount()
    upper2 = env.tmp / "upper2"
    upper2.mkdir()
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={upper2}",
                                   f"workdir={env.work}", "index=on"), env.mnt],
                  ["index=on", env.work, upper2], watched=(upper2,))


def test_mount_waits_for_a_just_unmounted_daemon_to_let_go(env: Env, overlay_mount):
    """A daemon drops its locks on upper and workdir when it exits, a moment after
    umount(2) returned; podman unmounts and remounts a layer back to back (`podman diff`
    after `podman run`). A lock let go within the wait is no error."""
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in (env.upper, env.work)]
    timer = threading.Timer(0.3, lambda: [fcntl.flock(fd, fcntl.LOCK_UN) for fd in fds])
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        timer.start()
        m = overlay_mount(opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                               f"workdir={env.work}"))
        assert (m.path / "f.txt").read_text() == "lower"
        assert (m.path / "kept.txt").read_text() == "upper content"
    finally:
        timer.cancel()
        timer.join()
        for fd in fds:
            os.close(fd)


# --- YAML stack files ----------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_stack_yaml_malformed(env: Env):
    bad = write(env.tmp / "broken.yaml", f"lowers: [{env.lower}, {env.lower2}\nupper: [\n")
    check_refused(env, ["--stack", bad, env.mnt], [bad])


def test_stack_yaml_unknown_key(env: Env):
    bad = write(env.tmp / "unknown.yaml",
                f"lowers: [{env.lower}]\nfrobnicate_key: 1\n")
    check_refused(env, ["--stack", bad, env.mnt], ["frobnicate_key"])


def test_stack_yaml_not_a_mapping(env: Env):
    bad = write(env.tmp / "list.yaml", f"- {env.lower}\n- {env.lower2}\n")
    check_refused(env, ["--stack", bad, env.mnt], [bad])


def test_stack_yaml_missing_file(env: Env):
    missing = env.tmp / "no-such-stack.yaml"
    check_refused(env, ["--stack", missing, env.mnt], [missing])


def test_stack_yaml_bad_lower(env: Env):
    bad = write(env.tmp / "badlower.yaml", f"lowers: [{env.lower}, {env.a_file}]\n")
    check_refused(env, ["--stack", bad, env.mnt], [env.a_file])


# --- overlapping layers (hunt12) -----------------------------------------------------------

def test_lower_inside_workdir(env: Env):
    """workdir/work is emptied at mount: a lower layer in it must be refused before that
    (the kernel refuses it as an overlapping lowerdir, but only after emptying work/)."""
    precious = env.work / "work" / "precious"
    precious.mkdir(parents=True)
    (precious / "data").write_text("keep me")
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}:{precious}", f"upperdir={env.upper}",
                                   f"workdir={env.work}"), env.mnt], [precious, env.work])
    assert (precious / "data").read_text() == "keep me"


def test_lower_inside_another_lower(env: Env):
    """A lower inside another would show its objects at two paths with one inode number,
    and a change through one path would not show at the other (the kernel: ELOOP)."""
    inner = env.lower / "d"
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}:{inner}", f"upperdir={env.upper}",
                                   f"workdir={env.work}"), env.mnt], [inner, env.lower])


def test_lower_given_twice(env: Env):
    check_refused(env, ["-o", f"lowerdir={env.lower}:{env.lower2}:{env.lower}", env.mnt],
                  [env.lower])


# --- mountinfo with escaped, non-ASCII and non-UTF-8 paths (hunt12) -------------------------

@pytest.mark.parametrize("name", ["caf\u00e9 mnt", os.fsdecode(b"\xff mnt")], ids=["utf8", "not-utf8"])
def test_mountpoint_already_a_mount_with_an_escaped_name(env: Env, name: str):
    """mountinfo writes a space as \\040 and other bytes as they are: a mountpoint whose
    name has both is still found in use (no traceback on a name that is not UTF-8)."""
    helpers.require("root")
    mnt = env.tmp / name
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        check_refused(env, ["-o", f"lowerdir={env.lower}", mnt], ["already in use"],
                      mountpoint=mnt)
        assert [m.fstype for m in helpers.mounts_at(mnt)] == ["tmpfs"]
    finally:
        helpers.force_unmount(mnt)


def test_idmapped_mount_options_past_a_name_that_is_not_utf8(tmp_path: Path):
    """The idmapped-layer check reads mountinfo too: a line it cannot decode as UTF-8 must
    not make it miss the mount it looks for (it answered None: not idmapped)."""
    from overlaypc import idmap
    info = tmp_path / "mountinfo"
    info.write_bytes(b"30 1 0:40 / /tmp/\xff\040x rw - tmpfs tmpfs rw\n"
                     b"31 1 0:41 / /srv/layer rw,idmapped - ext4 /dev/sda1 rw\n")
    assert idmap.mount_options(31, str(info)) == ["rw", "idmapped"]


# --- read-only or unwritable upper (hunt12) --------------------------------------------------

def test_upper_on_a_read_only_filesystem(env: Env, tmpfs_factory):
    """As the kernel ("filesystem on U is read-only"), also for -o ro: named, not '[Errno 30] ... work'."""
    fs = tmpfs_factory()
    (fs / "u").mkdir()
    (fs / "w").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    for extra in ([], ["ro"]):
        check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={fs / 'u'}",
                                       f"workdir={fs / 'w'}", *extra), env.mnt],
                      [f"{fs / 'u'}", "read-only"])


def test_workdir_not_writable_names_it(env: Env):
    """A workdir/work that cannot be made (here: a file in its place, EEXIST/ENOTDIR) is
    named with the workdir's path, not as a bare relative 'work'."""
    (env.work / "work").write_text("in the way")
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={env.upper}",
                                   f"workdir={env.work}"), env.mnt], [f"{env.work}/work"])


# --- lowerdir+=, datadir+= and data-only layers (kernel 6.7+; hunt12) ------------------------

@pytest.mark.parametrize("option, bad", [
    ("lowerdir={lower}::{lower2}", "data-only"),
    ("lowerdir+={lower},datadir+={lower2}", "data-only"),
    ("lowerdir={lower},lowerdir+={lower2}", "lowerdir+"),
    ("lowerdir+=", "lowerdir+"),
])
def test_kernel_layer_options_refused(env: Env, option: str, bad: str):
    check_refused(env, ["-o", option.format(lower=env.lower, lower2=env.lower2), env.mnt], [bad])


def test_lowerdir_plus_takes_paths_as_they_are(tmp_path: Path, overlay_mount):
    """``lowerdir+=`` (kernel 6.8+) adds one layer, top first, with no ':' escaping; a later
    ``lowerdir=`` replaces the layers given so far, as the kernel's."""
    top = helpers.build_layer(tmp_path / "top:1", {"f": "top", "t": "t"})
    bottom = helpers.build_layer(tmp_path / "bottom", {"f": "bottom", "b": "b"})
    m = overlay_mount(f"lowerdir+={top},lowerdir+={bottom}")
    assert (m.path / "f").read_text() == "top"
    assert sorted(os.listdir(m.path)) == ["b", "f", "t"]
    m.unmount()
    m = overlay_mount(f"lowerdir+={top},lowerdir={bottom}")
    assert sorted(os.listdir(m.path)) == ["b", "f"]


# --- YAML stack files: hostile or broken input (hunt12) --------------------------------------

ALIAS_BOMB = ", ".join(["&a [x, x, x, x, x, x, x, x, x]"] + [
    f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("text, bad", [
    # aliases share one object: a billion-laughs bomb must not be expanded (to text) anywhere
    (f"lowers: [{{lower}}]\noptions: {{{{k: [{ALIAS_BOMB}]}}}}\n", "options"),
    (f"lowers: [{{lower}}]\noptions: [[{ALIAS_BOMB}]]\n", "options"),
    ("lowers: [{lower}]\noptions: [[cache=shared]]\n", "options"),
    ("lowers: " + "[" * 20000 + "]" * 20000 + "\n", "nested"),
    ('lowers: ["{lower}\\0x"]\n', "NUL"),
    ("lowers: [{lower}]\nlowers: [{lower2}]\n", "lowers"),
], ids=["alias-bomb-dict", "alias-bomb-list", "nested-option", "deep", "nul-byte", "duplicate-key"])
def test_stack_yaml_hostile(env: Env, text: str, bad: str):
    stack = write(env.tmp / "hostile.yaml", text.format(lower=env.lower, lower2=env.lower2))
    check_refused(env, ["--stack", stack, env.mnt], [bad])


def test_stack_yaml_not_utf8(env: Env):
    stack = env.tmp / "latin1.yaml"
    stack.write_bytes(f"lowers: [{env.lower}]\n# caf\xe9\n".encode("latin-1"))
    check_refused(env, ["--stack", stack, env.mnt], [stack, "UTF-8"])


def test_stack_yaml_too_large(env: Env):
    """A stack file is a few lines: a huge one (or a device) is refused, not parsed for minutes."""
    stack = env.tmp / "huge.yaml"
    with open(stack, "w") as f:
        f.write(f"lowers: [{env.lower}]\n")
        f.write(("#" + "x" * 1023 + "\n") * 2048)
    check_refused(env, ["--stack", stack, env.mnt], [stack, "too large"])
    check_refused(env, ["--stack", "/dev/zero", env.mnt], ["/dev/zero"])


# --- one directory at two paths, layer counts, stack files that are not files (fix15c) -------

@pytest.fixture
def bind_mount():
    """``bind_mount(src, dst)``: bind-mount directory `src` on a new directory `dst`;
    every bind is unmounted in teardown."""
    made: list = []

    def bind(src: Path, dst: Path) -> Path:
        helpers.require("root")
        dst.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        made.append(dst)
        return dst

    yield bind
    for dst in reversed(made):
        helpers.force_unmount(dst)


def test_lower_given_twice_through_a_bind_mount(env: Env, bind_mount):
    """A bind mount of a lower is the same directory at another path (same st_dev and
    st_ino): the kernel refuses it ("conflicting lowerdir path"), and so must the check
    of lowers given twice, which compared paths only."""
    again = bind_mount(env.lower, env.tmp / "lower-again")
    check_refused(env, ["-o", f"lowerdir={env.lower}:{env.lower2}:{again}", env.mnt],
                  [again, env.lower])


@pytest.mark.parametrize("upper_of, work_of", [("lower", None), (None, "lower"), (None, "upper")],
                         ids=["upper-is-lower", "work-is-lower", "work-is-upper"])
def test_upper_or_work_a_bind_mount_of_another_layer(env: Env, bind_mount, upper_of, work_of):
    """An upper or workdir that is a lower (or workdir the upper) at another path: the
    mount would write into a read-only layer, or its workdir's work/ and index/ into the
    upper; refused by naming both paths."""
    upper, work = env.upper, env.work
    if upper_of:
        upper = bind_mount(getattr(env, upper_of), env.tmp / "upper-alias")
    if work_of:
        work = bind_mount(getattr(env, work_of), env.tmp / "work-alias")
    same = upper if upper_of else work
    check_refused(env, ["-o", opts(f"lowerdir={env.lower}", f"upperdir={upper}",
                                   f"workdir={work}"), env.mnt],
                  [same, getattr(env, upper_of or work_of)])


def test_too_many_layers_for_the_fd_limit(env: Env, tmp_path: Path):
    """Each layer holds open files: a stack that needs more than ``ulimit -n`` is refused by
    saying so, with both numbers (it named /proc/self/fd/127: the open that failed)."""
    lowers = [tmp_path / "many" / f"l{i}" for i in range(100)]
    for d in lowers:
        d.mkdir(parents=True)
    res = check_refused(env, ["-o", "lowerdir=" + ":".join(map(str, lowers)), env.mnt],
                        ["100 layers", "ulimit -n", "128"],
                        prefix=("prlimit", "--nofile=128:128", "--"))
    assert "/proc/self/fd" not in res.stderr


@pytest.mark.parametrize("make", [
    lambda p: (os.mkfifo(p), p)[1],
    lambda p: (p.mkdir(), p)[1],
    helpers.make_socket,
    lambda p: Path("/dev/null"),
], ids=["fifo", "directory", "socket", "device"])
def test_stack_file_not_a_regular_file(env: Env, make):
    """A stack file that is a FIFO blocked the CLI forever (an open waits for a writer);
    a directory, socket or device gave an unrelated error (EISDIR, ENXIO, 'must be a
    mapping'). Anything but a regular file is refused, a FIFO without blocking."""
    stack = make(env.tmp / "stack.yaml")
    check_refused(env, ["--stack", stack, env.mnt], [stack, "not a regular file"])


@pytest.mark.parametrize("option, bad", [
    ("lowerdir: yes", "lowerdir"),
    ("cache: on", "cache"),
    ("timeout: off", "timeout"),
    ("volatile: no", "volatile"),
])
def test_stack_yaml_boolean_where_none_fits(env: Env, option: str, bad: str):
    """YAML 1.1 reads unquoted yes/no/on/off as booleans: accepted where an option is
    on/off (test_config_accepts), refused by name where a boolean means nothing."""
    stack = write(env.tmp / "bool.yaml", f"lowers: [{env.lower}]\noptions: {{{option}}}\n")
    check_refused(env, ["--stack", stack, env.mnt], [bad, "boolean"])


def _mounted_at_the_lowest_admitted_limit(env: Env, overlay_mount, lowers: list[Path]):
    """``lowers`` over the env's upper, mounted with the fd limit the mount check names as
    the least it works with (read from its refusal at 200 fds): (the mount, that limit)."""
    options = opts("lowerdir=" + ":".join(map(str, lowers)), f"upperdir={env.upper}",
                   f"workdir={env.work}")
    res = check_refused(env, ["-o", options, env.mnt],
                        [f"{len(lowers) + 2} layers", "ulimit -n"],
                        prefix=("prlimit", "--nofile=200:200", "--"))
    found = re.search(r"need at least (\d+) open files", res.stderr)
    assert found, res.stderr
    limit = int(found.group(1))
    return overlay_mount(options, nofile=limit), limit


def test_a_stack_the_fd_limit_admits_works(env: Env, tmp_path: Path, overlay_mount):
    """The fewest fds the CLI says a stack needs are enough to use it (review16): a lookup
    of a directory merged across every layer holds an fd of it in each layer, and of its
    parent while it walks down, beside the two each layer root holds. Before: 100 lowers
    were admitted at 318 fds (2 per layer counted), and every lookup of ``d`` failed with
    EMFILE (the real need is about 4 per layer)."""
    count = 100
    lowers = []
    for i in range(count):
        lower = tmp_path / "many" / f"l{i}"
        (lower / "d" / "e" / "g").mkdir(parents=True)
        (lower / "d" / "e" / "g" / f"f{i}").write_text(str(i))
        (lower / "d" / f"top{i}").write_text(str(i))
        lowers.append(lower)
    m, _ = _mounted_at_the_lowest_admitted_limit(env, overlay_mount, lowers)
    d = m.path / "d"
    assert len(os.listdir(d)) == count + 1  # (every top file, and e)
    assert sorted(os.listdir(d / "e" / "g")) == sorted(f"f{i}" for i in range(count))
    assert (d / "e" / "g" / "f7").read_text() == "7"
    with open(d / "e" / "g" / "f1", "a") as f:  # a copy-up, with its three parents
        f.write("+")
    assert (d / "e" / "g" / "f1").read_text() == "1+"
    (d / "e" / "g" / "new").mkdir()
    os.rename(d / "top2", d / "e" / "g" / "new" / "top2")
    assert (d / "e" / "g" / "new" / "top2").read_text() == "2"
    assert sum(len(files) for _, _, files in os.walk(d)) == 2 * count


def test_lookups_at_once_across_a_stack_the_fd_limit_admits(env: Env, tmp_path: Path, overlay_mount):
    """Lookups running at once of directories merged across every layer of a stack the
    mount check admits all answer (walk17). Before: each walk held two fds per layer (the
    directory's in each layer and its parent's) and several ran at once on the engine's
    workers, past the limit the check had counted for one: with 200 lowers at the lowest
    admitted limit, ``ls a/x``, ``b/y``, ``c/z`` in parallel answered EMFILE."""
    count, threads, rounds = 200, 6, 4
    names = [f"d{k}" for k in range(threads * rounds)]
    lowers = []
    for i in range(count):
        lower = tmp_path / "many" / f"l{i}"
        for name in names:
            (lower / name / "s").mkdir(parents=True)
        (lower / names[i % len(names)] / "s" / f"f{i}").write_text(str(i))
        lowers.append(lower)
    m, _ = _mounted_at_the_lowest_admitted_limit(env, overlay_mount, lowers)
    start = threading.Barrier(threads)
    failed: list[str] = []

    def walk(t: int) -> None:
        for r in range(rounds):
            name = names[r * threads + t]  # a directory no lookup walked down yet
            start.wait()
            try:
                listed = sorted(os.listdir(m.path / name / "s"))
            except OSError as e:
                failed.append(f"ls {name}/s: {e}")
                continue
            want = sorted(f"f{i}" for i in range(count) if names[i % len(names)] == name)
            if listed != want:
                failed.append(f"ls {name}/s: {listed} != {want}")

    workers = [threading.Thread(target=walk, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failed, f"{len(failed)} of {threads * rounds} listings failed: {failed}"


def test_open_files_leave_a_walk_its_fds_at_a_limit_the_check_admits(env: Env, tmp_path: Path,
                                                                     overlay_mount):
    """At the lowest limit the mount check admits for 200 lowers, a client holding as many
    files open as the daemon lets it (ENFILE past that) leaves a lookup of a directory
    merged across every layer its walk's fds (walk17). Before: open files could take them
    (their bound kept none for a walk), and ``ls`` of such a directory answered EMFILE."""
    count = 200
    lowers = []
    for i in range(count):
        lower = tmp_path / "many" / f"l{i}"
        (lower / "a" / "x").mkdir(parents=True)
        (lower / "b" / "y").mkdir(parents=True)
        (lower / "a" / "x" / f"f{i}").write_text(str(i))
        lowers.append(lower)
    m, limit = _mounted_at_the_lowest_admitted_limit(env, overlay_mount, lowers)
    held: list[int] = []
    try:
        refused = None
        for _ in range(2 * limit):  # (bounded: the daemon refuses before)
            try:
                held.append(os.open(m.path / "a" / "x" / "f7", os.O_RDONLY))
            except OSError as e:
                refused = e.errno
                break
        assert refused == errno.ENFILE, (refused, len(held))
        assert sorted(os.listdir(m.path / "b" / "y")) == []  # a walk across every layer
        assert len(os.listdir(m.path / "a" / "x")) == count
    finally:
        for fd in held:
            os.close(fd)


def test_a_layer_gone_while_it_is_checked_gives_one_line(tmp_path, monkeypatch, capsys):
    """validate() stats each layer several times (its checks of paths, then of identity):
    a layer removed between two of them raised a bare OSError, a traceback instead of the
    error line (review19). The race is made here by removing the lower at the identity
    check."""
    from overlaypc import cli, config

    lower = tmp_path / "lower"
    lower.mkdir()
    checked = config._check_distinct

    def removed_meanwhile(named):
        lower.rmdir()
        return checked(named)
    monkeypatch.setattr(config, "_check_distinct", removed_meanwhile)
    assert cli.mount_main(["-o", f"lowerdir={lower}", str(tmp_path / "mnt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("overlaypc: error:") and str(lower) in err[0], err
