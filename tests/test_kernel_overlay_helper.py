"""The kernel overlay helper (``helpers.kernel_overlay``) when its upper or work dir is
held by another mount (flake53).

The kernel locks an overlay's upperdir and workdir while its superblock lives; with
index=on a second mount over them fails EBUSY (util-linux 2.38: "overlay already
mounted on M", M any overlay mount it finds, or "... or mount point busy"). A mount namespace made while a test's overlay was up (a
podman test's holder, kept for minutes) holds a copy that keeps the superblock alive
after the test unmounted its own: the next mount over the same dirs failed at once. The
helper now finds the holders in every namespace (``overlay_holders``), waits while only
other namespaces hold the dirs and fails at once, naming them, when its own does.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

import helpers

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]

INDEX = ("index=on",)  # the kernel's exclusive upperdir protection: EBUSY, not a warning


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    helpers.require("root")
    helpers.require("kernel_overlay")
    # a space: mountinfo shows it as \040, the helper must unescape it
    out = {n: tmp_path / n for n in ("lower", "up per", "work", "m1", "m2")}
    for d in out.values():
        d.mkdir()
    (out["lower"] / "f").write_text("lower\n")
    return out


def _options(d: dict[str, Path], *extra: str) -> str:
    return ",".join([f"lowerdir={d['lower']}", f"upperdir={d['up per']}",
                     f"workdir={d['work']}", helpers.KERNEL_PINNED_OPTIONS, *extra])


@contextlib.contextmanager
def holder(d: dict[str, Path], seconds: float = 600, extra: tuple[str, ...] = INDEX,
           children: int = 0) -> Iterator[subprocess.Popen]:
    """A process in a mount namespace of its own, holding an overlay over ``d``'s upper
    and work at m2 (there only); it exits after ``seconds``, which ends the namespace.
    ``children``: more processes in that namespace."""
    script = (f"mount -t overlay overlay -o '{_options(d, *extra)}' '{d['m2']}' || exit 1; "
              + f"sleep {seconds} & " * children + f"echo ready; exec sleep {seconds}")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--",
                             "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.stderr.read().decode()
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # its own session: the children too
        proc.wait()


@pytest.mark.parametrize("text, busy", [
    # libmount names the first mount of source "overlay" it finds, seldom the holder
    ("mount: /tmp/x/m2: overlay already mounted on /tmp/other/kmnt.\n"
     "       dmesg(1) may have more information after failed mount system call.", True),
    ("mount: /tmp/x/m: overlay already mounted or mount point busy.\n"
     "       dmesg(1) may have more information after failed mount system call.", True),
    ("mount: /tmp/x/m: mount(2) system call failed: Device or resource busy.", True),
    ("mount: /tmp/x/m: fsconfig system call failed: overlay: upperdir is in-use as "
     "upperdir/workdir of another mount, mount with '-o index=off' to override exclusive "
     "upperdir protection.", True),
    ("mount: /tmp/x/m: wrong fs type, bad option, bad superblock on overlay, missing "
     "codepage or helper program, or other error.", False),
    ("mount: /tmp/x/m: special device overlay does not exist.", False),
    ("mount: /tmp/x/m: permission denied.", False),
])
def test_busy_is_told_from_other_mount_failures(text, busy):
    assert helpers.overlay_mount_busy(text) is busy


def test_holders_in_every_namespace_one_per_namespace(dirs):
    assert helpers.overlay_holders(dirs["up per"], dirs["work"]) == []
    with holder(dirs, children=2) as h:
        found = helpers.overlay_holders(dirs["up per"], dirs["work"])
        assert len(found) == 1, found  # three processes, one namespace, one mount
        assert found[0].ns == os.readlink(f"/proc/{h.pid}/ns/mnt") and not found[0].ours
        assert h.pid in found[0].pids and len(found[0].pids) == 3
        assert found[0].mountpoint == str(dirs["m2"])
        # by either dir, and through another spelling of the path
        assert helpers.overlay_holders(dirs["work"] / ".." / "up per") == found
        assert helpers.overlay_holders(dirs["lower"], dirs["m1"]) == []
        with helpers.kernel_overlay(dirs["m1"], [dirs["lower"]], dirs["up per"], dirs["work"]):
            both = helpers.overlay_holders(dirs["up per"], dirs["work"])
            assert sorted((x.ours, x.mountpoint) for x in both) == \
                [(False, str(dirs["m2"])), (True, str(dirs["m1"]))]
    assert helpers.wait_until(lambda: helpers.overlay_holders(dirs["up per"], dirs["work"]) == [],
                              timeout=10)


def test_mount_waits_while_another_namespace_holds_the_dirs(dirs):
    """Failed before: 'kernel overlay mount failed: mount: ...: overlay already mounted or
    mount point busy' at once, while the holder had 3 s to live."""
    with holder(dirs, seconds=3):
        start = time.monotonic()
        with helpers.kernel_overlay(dirs["m1"], [dirs["lower"]], dirs["up per"], dirs["work"],
                                    INDEX) as m:
            assert (m / "f").read_text() == "lower\n"
        assert time.monotonic() - start >= 1.0  # it did wait for the holder to go


def test_wait_is_bounded_and_names_the_holder(dirs, monkeypatch):
    monkeypatch.setenv("KERNEL_BUSY_WAIT", "2")
    with holder(dirs) as h:
        start = time.monotonic()
        with pytest.raises(AssertionError) as e:
            with helpers.kernel_overlay(dirs["m1"], [dirs["lower"]], dirs["up per"],
                                        dirs["work"], INDEX):
                pass
        assert 2 <= time.monotonic() - start < 30
        assert f"still held after 2 s by overlay on {dirs['m2']}" in str(e.value)
        assert f"pids {h.pid}" in str(e.value)


def test_a_holder_in_our_own_namespace_fails_at_once_named(dirs):
    with helpers.kernel_overlay(dirs["m1"], [dirs["lower"]], dirs["up per"], dirs["work"], INDEX):
        start = time.monotonic()
        with pytest.raises(AssertionError) as e:
            with helpers.kernel_overlay(dirs["m2"], [dirs["lower"]], dirs["up per"],
                                        dirs["work"], INDEX):
                pass
        assert time.monotonic() - start < 10
        assert f"held in this mount namespace by overlay on {dirs['m1']}" in str(e.value)


def test_other_failures_are_not_waited_for(dirs, monkeypatch):
    monkeypatch.setenv("KERNEL_BUSY_WAIT", "60")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="kernel overlay mount failed"):
        with helpers.kernel_overlay(dirs["m1"], [dirs["lower"] / "missing"], dirs["up per"],
                                    dirs["work"]):
            pass
    assert time.monotonic() - start < 10
