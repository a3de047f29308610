#!/usr/bin/env python3
"""The open-foo scenario, side by side on several overlay implementations.

    fr = open("foo", O_RDONLY)    # foo lives on a read-only lower layer
    fw = open("foo", O_RDWR)      # copies foo up into the upper layer
    write(fw, data)
    read(fr, buf)                 # buf must equal data

Runs the scenario and coherence checks 1-4 of issue 5 on overlaypc (default), overlaypc
``cache=shared``, overlaypc ``handles=bind-at-open`` (the old bug, reproduced on purpose),
the kernel's overlayfs (``mount -t overlay``) and fuse-overlayfs when the machine has
them, each check on fresh temporary layers, and prints one table of OK / STALE.

Staleness often hides in the page cache: a write through one handle updates pages that
are cached already. So each check also reads through ``fr`` after dropping its cached pages
(``posix_fadvise(POSIX_FADV_DONTNEED)``), and check 4 also after
``echo 3 > /proc/sys/vm/drop_caches``.

Needs root (mounts, drop_caches). Exit status 0 when overlaypc (default) passes every
check, 1 otherwise. Every mount this script makes is unmounted (by its path) before it
exits, also on errors and on Ctrl-C / SIGTERM.

    sudo python3 examples/stale_read.py [--verbose]
"""
from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 20.0
OLD = b"old-lower-data:" * 400          # 6000 bytes: spans two pages
NEW_HEAD = b"NEW!"
NEW = NEW_HEAD + OLD[len(NEW_HEAD):]
APPENDED = b"+appended-by-fw"
KERNEL_PINNED = "redirect_dir=off,index=off,metacopy=off,xino=off"


# --------------------------------------------------------------------------------------
# Mounts: each one is ours, found by its path in /proc/self/mountinfo, unmounted by path
# --------------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Every mount point on the machine, unescaped. A name that is not UTF-8 (anyone's
    mount, anywhere) is kept as surrogates, as ``os.fsdecode`` keeps it, never an error."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(fields[4]) for fields in (line.split() for line in f)
                if len(fields) > 4]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def unmount(path: Path) -> None:
    """umount, then a lazy unmount if something still holds it. Only ever our own path."""
    for cmd in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"stale_read.py: {' '.join(cmd)}: {r.stderr.strip()}", file=sys.stderr)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM / SIGHUP until the block is done: starting a mount and
    taking it down must not be cut in half (a pending signal is raised right after)."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wait_mounted(path: Path, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not mounted within {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.02)


@dataclass
class Layers:
    lower: Path
    upper: Path
    work: Path
    mnt: Path


def fresh_layers(base: Path, name: str) -> Layers:
    root = Path(tempfile.mkdtemp(prefix=name + "-", dir=base))
    layers = Layers(root / "lower", root / "upper", root / "work", root / "mnt")
    for d in (layers.lower, layers.upper, layers.work, layers.mnt):
        d.mkdir()
    (layers.lower / "foo").write_bytes(OLD)
    return layers


@contextlib.contextmanager
def mount_overlaypc(layers: Layers, extra: str) -> Iterator[None]:
    opts = f"lowerdir={layers.lower},upperdir={layers.upper},workdir={layers.work}"
    if extra:
        opts += "," + extra
    log_path = layers.mnt.parent / "overlaypc.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with signals_deferred(), open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "overlaypc", "-f", "-o", opts,
                                 str(layers.mnt)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                                start_new_session=True)
    try:
        try:
            wait_mounted(layers.mnt, proc)
        except RuntimeError as e:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"overlaypc {e}: {' | '.join(tail)}") from None
        yield
    finally:
        with signals_deferred():
            stop_overlaypc(proc, layers.mnt)


def stop_overlaypc(proc: subprocess.Popen, mnt: Path) -> None:
    """Unmount and reap our daemon, also when we were interrupted while it was mounting."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while proc.poll() is None and not is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.02)          # still starting: let it finish, then unmount it properly
    unmount(mnt)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:  # our own child: stop it by its PID
        proc.kill()
        proc.wait()
    unmount(mnt)                  # a killed daemon leaves its mount behind


@contextlib.contextmanager
def mount_kernel(layers: Layers) -> Iterator[None]:
    opts = (f"lowerdir={layers.lower},upperdir={layers.upper},workdir={layers.work},"
            f"{KERNEL_PINNED}")
    try:
        with signals_deferred():
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts,
                                str(layers.mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mount -t overlay failed: {r.stderr.strip()}")
        yield
    finally:
        with signals_deferred():
            unmount(layers.mnt)


@contextlib.contextmanager
def mount_fuse_overlayfs(layers: Layers) -> Iterator[None]:
    opts = f"lowerdir={layers.lower},upperdir={layers.upper},workdir={layers.work}"
    try:
        with signals_deferred():  # it returns once mounted (its daemon stays behind)
            r = subprocess.run(["fuse-overlayfs", "-o", opts, str(layers.mnt)],
                               capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"fuse-overlayfs failed: {r.stderr.strip()}")
        wait_mounted(layers.mnt)
        yield
    finally:
        with signals_deferred():
            unmount(layers.mnt)  # its daemon exits when its mount goes away


@dataclass
class System:
    label: str
    mount: Callable[[Layers], contextlib.AbstractContextManager]
    available: Optional[str] = None   # why it is not, if it is not


def systems() -> list[System]:
    have_kernel = any(line.split()[-1] == "overlay" for line in
                      Path("/proc/filesystems").read_text().splitlines() if line.split())
    return [
        System("overlaypc", lambda l: mount_overlaypc(l, "")),
        System("cache=shared", lambda l: mount_overlaypc(l, "cache=shared")),
        System("bind-at-open", lambda l: mount_overlaypc(l, "handles=bind-at-open")),
        System("kernel", mount_kernel, None if have_kernel else "no overlay in /proc/filesystems"),
        System("fuse-overlayfs", mount_fuse_overlayfs,
               None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed"),
    ]


# --------------------------------------------------------------------------------------
# The checks: each returns (ok, what it saw); ok None means "cannot run here"
# --------------------------------------------------------------------------------------

def dontneed(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def read_all(fd: int, offset: int = 0) -> bytes:
    out = bytearray()
    while True:
        chunk = os.pread(fd, 1 << 16, offset + len(out))
        if not chunk:
            return bytes(out)
        out += chunk


def show(data: bytes) -> str:
    return {OLD: "old", NEW: "new", b"": "empty"}.get(data, f"{len(data)} bytes {data[:8]!r}")


class Fds(contextlib.ExitStack):
    def open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        self.callback(os.close, fd)
        return fd


def check_scenario(mnt: Path) -> tuple[Optional[bool], str]:
    with Fds() as fds:
        fr = fds.open(mnt / "foo", os.O_RDONLY)
        fw = fds.open(mnt / "foo", os.O_RDWR)
        os.pwrite(fw, NEW_HEAD, 0)
        got = read_all(fr)
    return got == NEW, f"read(fr): {show(got)}"


def check_pread(mnt: Path) -> tuple[Optional[bool], str]:
    with Fds() as fds:
        fr = fds.open(mnt / "foo", os.O_RDONLY)
        read_all(fr)
        fw = fds.open(mnt / "foo", os.O_RDWR)
        os.pwrite(fw, NEW_HEAD, 0)
        reads = [read_all(fr)]
        dontneed(fr)
        reads.append(read_all(fr))
        drop_caches()
        reads.append(read_all(fr))
    return all(r == NEW for r in reads), (
        "at once / after DONTNEED / after drop_caches: " + " / ".join(map(show, reads)))


def check_mmap(mnt: Path) -> tuple[Optional[bool], str]:
    # Mapped before the copy-up and not touched until after the write: its pages are
    # faulted in through fr then (a page cached earlier would be updated by the write).
    with Fds() as fds:
        fr = fds.open(mnt / "foo", os.O_RDONLY)
        try:
            mp = mmap.mmap(fr, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as e:
            return None, f"MAP_SHARED refused: {e.strerror}"
        try:
            fw = fds.open(mnt / "foo", os.O_RDWR)
            os.pwrite(fw, NEW_HEAD, 0)
            got = mp[:]
        finally:
            mp.close()
    return got == NEW, f"mapping: {show(got)}"


def check_append(mnt: Path) -> tuple[Optional[bool], str]:
    with Fds() as fds:
        fr = fds.open(mnt / "foo", os.O_RDONLY)
        read_all(fr)
        fw = fds.open(mnt / "foo", os.O_WRONLY | os.O_APPEND)
        os.write(fw, APPENDED)
        size = os.fstat(fr).st_size
        dontneed(fr)
        drop_caches()
        tail = os.pread(fr, 4096, len(OLD))
    ok = size == len(OLD) + len(APPENDED) and tail == APPENDED
    return ok, f"fstat size {size}, appended bytes: {show(tail) if tail != APPENDED else 'new'}"


def check_fresh_open(mnt: Path) -> tuple[Optional[bool], str]:
    with Fds() as fds:
        fr = fds.open(mnt / "foo", os.O_RDONLY)
        read_all(fr)
        fw = fds.open(mnt / "foo", os.O_RDWR)
        os.pwrite(fw, NEW_HEAD, 0)
        dontneed(fr)
        drop_caches()
        read_all(fr)                     # a reader reads after the write, then all close
    # open + pread, no stat: a GETATTR that sees a new mtime would make FUSE drop its
    # cached pages (auto_inval_data) and hide what a plain reader gets.
    with Fds() as fds:
        fresh = read_all(fds.open(mnt / "foo", os.O_RDONLY))
    drop_caches()
    with Fds() as fds:
        dropped = read_all(fds.open(mnt / "foo", os.O_RDONLY))
    return fresh == dropped == NEW, f"fresh open: {show(fresh)}, after drop_caches: {show(dropped)}"


CHECKS = [
    ("open-foo: read(fr) right after write(fw)", check_scenario),
    ("1 pread via fr, also after cache drops", check_pread),
    ("2 MAP_SHARED via fr made before copy-up", check_mmap),
    ("3 fstat(fr) size, appended bytes via fr", check_append),
    ("4 fresh open after close; after drop_caches", check_fresh_open),
]


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def run(base: Path, verbose: bool) -> dict[tuple[str, str], str]:
    results: dict[tuple[str, str], str] = {}
    for system in systems():
        for name, check in CHECKS:
            if system.available is not None:
                results[system.label, name] = "-"
                continue
            layers = fresh_layers(base, system.label)
            try:
                with system.mount(layers):
                    ok, seen = check(layers.mnt)
                cell = "n/a" if ok is None else "OK" if ok else "STALE"
            except Exception as e:  # a system that fails to mount or errors: say so, go on
                cell, seen = "ERROR", f"{type(e).__name__}: {e}"
            results[system.label, name] = cell
            if verbose or cell == "ERROR":
                print(f"  {system.label:<15} {name:<46} {cell:<6} {seen}")
    return results


def print_table(results: dict[tuple[str, str], str]) -> None:
    labels = [s.label for s in systems()]
    width = max(len(name) for name, _ in CHECKS)
    cols = [max(len(label), 6) for label in labels]
    print((f"{'check':<{width}}  " + "  ".join(f"{l:<{c}}" for l, c in zip(labels, cols))).rstrip())
    print(f"{'-' * width}  " + "  ".join("-" * c for c in cols))
    for name, _ in CHECKS:
        cells = [results[label, name] for label in labels]
        print((f"{name:<{width}}  " + "  ".join(f"{x:<{c}}" for x, c in zip(cells, cols))).rstrip())
    notes = ["overlaypc: default options (cache=kernel, handles=reopen)",
             "cache=shared, bind-at-open: overlaypc -o cache=shared / -o handles=bind-at-open",
             f"kernel: mount -t overlay ({KERNEL_PINNED}), Linux {platform.release()}"]
    fo = shutil.which("fuse-overlayfs")
    if fo:
        r = subprocess.run([fo, "--version"], capture_output=True, text=True)
        version = next((line for line in (r.stdout + r.stderr).splitlines()
                        if "fuse-overlayfs" in line), "fuse-overlayfs")
        notes.append(version.strip())
    if "n/a" in results.values():
        notes.append("n/a: the system refused the operation (e.g. MAP_SHARED on a direct-io "
                     "file of a FUSE filesystem without DIRECT_IO_ALLOW_MMAP)")
    notes.append("STALE: read old data after the copy-up; -: not on this machine")
    print()
    for n in notes:
        print("  " + n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="show what each check read")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("stale_read.py: needs root (it mounts overlays and drops caches)", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` below unmounts what it mounted.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    base = Path(tempfile.mkdtemp(prefix="overlaypc-stale-read-"))
    try:
        results = run(base, args.verbose)
    finally:
        # Remove the scratch tree only if none of our mounts survived under it.
        left = [m for m in mount_points() if m.startswith(str(base) + "/")]
        if left:
            print(f"stale_read.py: still mounted, left in place: {', '.join(left)}",
                  file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print_table(results)
    ours = [results["overlaypc", name] for name, _ in CHECKS]
    return 0 if all(cell == "OK" for cell in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
