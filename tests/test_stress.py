"""Stress (issue 8): threads of random operations against a model, and an fsx-style
randomized read/write/truncate/mmap run on one file that starts in the lower layer.

Both are bounded in time for CI and seeded, so a failure names a reproducible seed
(``OVERLAYPC_STRESS_SEED`` overrides it). The daemon's log must stay free of errors.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import helpers
from reliability_support import pattern
from upper_support import overlay_stats, stack_options, work_leftovers

pytestmark = pytest.mark.mount

SEED = int(os.environ.get("OVERLAYPC_STRESS_SEED", "8"))


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _merged_files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = _read(p)
    return out


# --------------------------------------------------------------------------------------
# N threads x M seconds against a model
# --------------------------------------------------------------------------------------

THREADS = 4
DURATION = 3.0
SHARED = 3                 # lower files every thread copies up and writes at once
REGION = 16 * 1024         # each thread owns one region of each shared file
SLOTS = 5                  # private names per thread, in each of two directories


class Worker:
    """One thread's private names (``pool/t{n}_{k}``, ``d{n}/t{n}_{k}``) and its regions of
    the shared files; it keeps the model of exactly what it owns."""

    def __init__(self, n: int, mnt: Path, model: dict[str, bytes], rng: random.Random) -> None:
        self.n, self.mnt, self.rng = n, mnt, rng
        self.names = [f"pool/t{n}_{k}" for k in range(SLOTS)] + [f"d{n}/t{n}_{k}" for k in range(SLOTS)]
        self.model = {k: v for k, v in model.items() if k in self.names}
        self.regions = {f"shared/s{i}.bin": model[f"shared/s{i}.bin"][n * REGION:(n + 1) * REGION]
                        for i in range(SHARED)}
        self.old_handles: dict[str, int] = {}
        self.ops = 0
        self.error: BaseException | None = None
        self.history: list[str] = []

    def p(self, rel: str) -> Path:
        return self.mnt / rel

    def _data(self, limit: int = 48 * 1024) -> bytes:
        return self.rng.randbytes(self.rng.randrange(1, limit))

    # -- private names -------------------------------------------------------------------------
    def op_create(self, rel: str) -> None:
        data = self._data()
        with open(self.p(rel), "wb") as f:
            f.write(data)
        self.model[rel] = data

    def op_write(self, rel: str) -> None:
        cur = bytearray(self.model[rel])
        off = self.rng.randrange(0, len(cur) + 4096)
        data = self._data(16 * 1024)
        fd = os.open(self.p(rel), os.O_RDWR)
        try:
            assert os.pwrite(fd, data, off) == len(data)
        finally:
            os.close(fd)
        if off > len(cur):
            cur.extend(bytes(off - len(cur)))
        cur[off:off + len(data)] = data
        self.model[rel] = bytes(cur)

    def op_append(self, rel: str) -> None:
        data = self._data(8 * 1024)
        with open(self.p(rel), "ab") as f:
            f.write(data)
        self.model[rel] += data

    def op_truncate(self, rel: str) -> None:
        cur = self.model[rel]
        size = self.rng.randrange(0, len(cur) + 8192)
        if self.rng.random() < 0.5:
            os.truncate(self.p(rel), size)
        else:
            fd = os.open(self.p(rel), os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        self.model[rel] = cur[:size] + bytes(max(0, size - len(cur)))

    def op_read(self, rel: str) -> None:
        got = _read(self.p(rel))
        assert got == self.model[rel], f"{rel}: {len(got)} bytes read, model has {len(self.model[rel])}"

    def op_rename(self, rel: str) -> None:
        dst = self.rng.choice([n for n in self.names if n != rel])
        self.history.append(f"  -> {dst}{' (replacing)' if dst in self.model else ''}")
        os.rename(self.p(rel), self.p(dst))
        self.model[dst] = self.model.pop(rel)

    def op_unlink(self, rel: str) -> None:
        os.unlink(self.p(rel))
        del self.model[rel]

    # -- shared lower files: concurrent copy-ups, disjoint regions -------------------------------
    def op_shared_write(self, rel: str) -> None:
        off = self.rng.randrange(0, REGION - 1)
        data = self.rng.randbytes(self.rng.randrange(1, REGION - off + 1))
        fd = os.open(self.p(rel), os.O_RDWR)
        try:
            assert os.pwrite(fd, data, self.n * REGION + off) == len(data)
        finally:
            os.close(fd)
        r = bytearray(self.regions[rel])
        r[off:off + len(data)] = data
        self.regions[rel] = bytes(r)

    def op_shared_read(self, rel: str) -> None:
        # through a handle opened before any copy-up: it must follow the copy-up
        got = os.pread(self.old_handles[rel], REGION, self.n * REGION)
        assert got == self.regions[rel], f"{rel}: stale or wrong region of thread {self.n}"

    def run(self, barrier: threading.Barrier, deadline: float) -> None:
        try:
            for rel in self.regions:
                self.old_handles[rel] = os.open(self.p(rel), os.O_RDONLY)
            barrier.wait()
            # all threads copy up the same lower files at once, from several handles
            for rel in self.regions:
                self.op_shared_write(rel)
            while time.monotonic() < deadline:
                self.step()
            for rel in self.regions:
                self.op_shared_read(rel)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            for fd in self.old_handles.values():
                os.close(fd)

    def step(self) -> None:
        self.ops += 1
        r = self.rng.random()
        if r < 0.2:
            self.rng.choice([self.op_shared_write, self.op_shared_read])(
                self.rng.choice(list(self.regions)))
            return
        rel = self.rng.choice(self.names)
        if rel not in self.model:
            self.history.append(f"create {rel}")
            self.op_create(rel)
            return
        op = self.rng.choices(
            [self.op_write, self.op_append, self.op_truncate, self.op_read, self.op_rename,
             self.op_unlink], weights=[5, 2, 2, 5, 2, 1])[0]
        self.history.append(f"{op.__name__[3:]} {rel}")
        op(rel)


def test_threads_of_random_ops_match_model(tmp_path, layers_factory, overlay_mount, mountpoint,
                                           kernel_mount):
    """THREADS threads x DURATION s of creates, writes, appends, truncates (by path and fd),
    reads, renames (within and across dirs, over existing names) and unlinks, on names that
    start in the lower and on new ones, plus racing copy-ups of shared lower files written in
    disjoint regions and read through handles opened before the copy-up. The merged tree
    equals the model while mounted, after a remount, and under the kernel's overlayfs."""
    rng = random.Random(SEED)
    lower_spec: dict[str, bytes] = {}
    for i in range(SHARED):
        lower_spec[f"shared/s{i}.bin"] = rng.randbytes(THREADS * REGION)
    for n in range(THREADS):
        for k in range(SLOTS):
            if k % 2 == 0:
                lower_spec[f"pool/t{n}_{k}"] = rng.randbytes(rng.randrange(0, 40_000))
            if k % 3 == 0:
                lower_spec[f"d{n}/t{n}_{k}"] = rng.randbytes(rng.randrange(0, 40_000))
        lower_spec.setdefault(f"d{n}/keep", b"keep\n")
    layers = layers_factory({"lower": lower_spec})
    lower = layers["lower"]
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    lower_state = helpers.dir_state(lower)
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts, debug=bool(os.environ.get("OVERLAYPC_STRESS_DEBUG")))

    workers = [Worker(n, m.path, lower_spec, random.Random(SEED * 1000 + n)) for n in range(THREADS)]
    barrier = threading.Barrier(THREADS)
    deadline = time.monotonic() + DURATION
    threads = [threading.Thread(target=w.run, args=(barrier, deadline)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DURATION + 60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    for w in workers:
        if w.error is not None:
            raise AssertionError(f"worker {w.n} (seed {SEED}) failed after {w.ops} ops; its "
                                 f"last ops:\n" + "\n".join(w.history[-60:])) from w.error
    assert sum(w.ops for w in workers) > 200, [w.ops for w in workers]

    expected: dict[str, bytes] = {f"d{n}/keep": b"keep\n" for n in range(THREADS)}
    for w in workers:
        expected.update(w.model)
    for i in range(SHARED):
        rel = f"shared/s{i}.bin"
        expected[rel] = b"".join(w.regions[rel] for w in workers)

    def check(root: Path, where: str) -> None:
        got = _merged_files(root)
        assert sorted(got) == sorted(expected), f"{where}: names differ"
        bad = [k for k in expected if got[k] != expected[k]]
        assert not bad, f"{where}: contents differ for {bad}"

    check(m.path, "live mount")
    assert overlay_stats(m.path).get("errors", 0) == 0
    assert not helpers.unexpected_log_lines(m.log_text())
    m.unmount()  # raises on a bad exit or on ERROR lines in the daemon log
    assert work_leftovers(work) == []
    assert helpers.dir_state(lower) == lower_state
    m2 = overlay_mount(opts)
    check(m2.path, "after remount")
    m2.unmount()
    check(kernel_mount([upper, lower]), "kernel overlayfs over the same upper")


def test_racing_opens_for_write_during_copy_up_never_write_the_lower(layers_factory,
                                                                     overlay_mount):
    """Regression: while one thread's copy-up had renamed the upper copy into place but not
    yet rebound the live inode (it fsyncs the parent first), another thread's open for write
    got an fd on the *lower* file: its write changed the lower layer and was missing from the
    upper. Each file here is held open read-only first, so its inode is live."""
    n_files, n_threads = 40, 6
    layers = layers_factory({"lower": {f"f{i}": b"L" * 65536 for i in range(n_files)}})
    lower = layers["lower"]
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(stack_options([lower], upper, work))
    held = [os.open(m / f"f{i}", os.O_RDONLY) for i in range(n_files)]
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(n_files):
                fd = os.open(m / f"f{i}", os.O_RDWR)
                try:
                    os.pwrite(fd, bytes([65 + t]) * 100, t * 4096)
                finally:
                    os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors, errors
        changed = [i for i in range(n_files) if (lower / f"f{i}").read_bytes() != b"L" * 65536]
        assert not changed, f"lower files written through the mount: {changed}"
        for i in range(n_files):
            data = (upper / f"f{i}").read_bytes()
            want = bytearray(b"L" * 65536)
            for t in range(n_threads):
                want[t * 4096:t * 4096 + 100] = bytes([65 + t]) * 100
            assert data == want, f"f{i}: writes missing from the upper copy"
            assert os.pread(held[i], 65536, 0) == want, f"f{i}: stale through the old handle"
    finally:
        for fd in held:
            os.close(fd)


# --------------------------------------------------------------------------------------
# fsx
# --------------------------------------------------------------------------------------

FSX_OPS = 20_000
FSX_SIZE = 256 * 1024
FSX_MAX = 320 * 1024
FSX_MAXLEN = 32 * 1024
PAGE = mmap.PAGESIZE


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def map_whole_pages(fd: int, size: int) -> bytes:
    """The file's pages through a MAP_SHARED mapping, including the part of the last page
    past EOF (Python's mmap refuses a length beyond the file size)."""
    length = -(-size // PAGE) * PAGE
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    try:
        return ctypes.string_at(addr, length)
    finally:
        _libc.munmap(addr, length)


class Fsx:
    """fsx's loop: each operation is done through the mount and on the model, and the whole
    file is compared after every one (size by fstat, bytes by pread, and through a mapping
    every few operations, including the zeroed tail of the last page)."""

    def __init__(self, path: Path, model: bytes, rng: random.Random) -> None:
        self.path, self.rng = path, rng
        self.model = bytearray(model)
        self.fr = os.open(path, os.O_RDONLY)   # opened while the file is still lower
        self.fw = os.open(path, os.O_RDWR)     # copies it up
        self.log: list[str] = []
        self.counts: dict[str, int] = {}

    def close(self) -> None:
        os.close(self.fr)
        os.close(self.fw)

    def _range(self, size: int) -> tuple[int, int]:
        off = self.rng.randrange(0, max(size, 1))
        return off, self.rng.randrange(1, FSX_MAXLEN)

    def _extend(self, new_size: int) -> None:
        if new_size > len(self.model):
            self.model.extend(bytes(new_size - len(self.model)))

    def op_read(self) -> None:
        off, n = self._range(len(self.model))
        fd = self.rng.choice((self.fr, self.fw))
        assert os.pread(fd, n, off) == bytes(self.model[off:off + n])

    def op_write(self) -> None:
        off, n = self._range(FSX_MAX - FSX_MAXLEN)
        data = self.rng.randbytes(n)
        assert os.pwrite(self.fw, data, off) == n
        self._extend(off + n)
        self.model[off:off + n] = data

    def op_truncate(self) -> None:
        size = self.rng.randrange(0, FSX_MAX)
        if self.rng.random() < 0.8:
            os.ftruncate(self.fw, size)
        else:
            os.truncate(self.path, size)
        del self.model[size:]
        self._extend(size)

    def op_mapread(self) -> None:
        size = len(self.model)
        if not size:
            return
        off, n = self._range(size)
        n = min(n, size - off)
        start = off - off % PAGE
        with mmap.mmap(self.fr, off + n - start, mmap.MAP_SHARED, mmap.PROT_READ,
                       offset=start) as mm:
            assert mm[off - start:] == bytes(self.model[off:off + n])

    def op_mapwrite(self) -> None:
        off, n = self._range(FSX_MAX - FSX_MAXLEN)
        if off + n > len(self.model):  # as fsx: grow first, a mapping cannot extend a file
            os.ftruncate(self.fw, off + n)
            self._extend(off + n)
        data = self.rng.randbytes(n)
        start = off - off % PAGE
        with mmap.mmap(self.fw, off + n - start, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as mm:
            mm[off - start:] = data
            if self.rng.random() < 0.3:
                mm.flush()
        self.model[off:off + n] = data

    def op_fsync(self) -> None:
        os.fsync(self.fw)

    def op_reopen(self) -> None:
        """A fresh open of the write handle (cache kept or dropped by the daemon)."""
        os.close(self.fw)
        self.fw = os.open(self.path, os.O_RDWR)

    def op_dropcache(self) -> None:
        os.posix_fadvise(self.fr, 0, 0, os.POSIX_FADV_DONTNEED)

    OPS = {"read": 6, "write": 6, "mapread": 4, "mapwrite": 4, "truncate": 2, "fsync": 1,
           "reopen": 1, "dropcache": 1}

    def check(self, full_map: bool) -> None:
        size = len(self.model)
        assert os.fstat(self.fr).st_size == size == os.fstat(self.fw).st_size
        got = os.pread(self.fr, FSX_MAX + 1, 0)
        if got != self.model:
            bad = next((i for i, (a, b) in enumerate(zip(got, self.model)) if a != b),
                       min(len(got), size))
            raise AssertionError(f"pread differs from the model at byte {bad} "
                                 f"(size {len(got)} vs {size})")
        if full_map and size:
            mapped = map_whole_pages(self.fr, size)
            assert mapped[:size] == self.model, "mapping differs from the model"
            assert mapped[size:] == bytes(len(mapped) - size), "bytes past EOF are not zero"

    def run(self, n_ops: int) -> None:
        names, weights = list(self.OPS), list(self.OPS.values())
        for i in range(n_ops):
            name = self.rng.choices(names, weights)[0]
            self.counts[name] = self.counts.get(name, 0) + 1
            self.log.append(name)
            try:
                getattr(self, "op_" + name)()
                self.check(full_map=i % 8 == 0)
            except AssertionError as e:
                raise AssertionError(f"fsx op #{i} ({name}, seed {SEED}) failed: {e}; "
                                     f"last ops: {self.log[-12:]}") from None


def test_fsx_on_a_lower_file(layers_factory, overlay_mount):
    """FSX_OPS randomized read/write/truncate/mmap operations (default cache=kernel mode) on a
    256 KiB file that starts in the lower layer; the file is compared byte for byte with the
    model after every operation, then in the upper after unmount."""
    rng = random.Random(SEED)
    initial = pattern(FSX_SIZE, SEED)
    layers = layers_factory({"lower": {"fsx.bin": initial}})
    lower = layers["lower"]
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(stack_options([lower], upper, work))
    fsx = Fsx(m / "fsx.bin", initial, rng)
    t0 = time.monotonic()
    try:
        fsx.run(FSX_OPS)
    finally:
        fsx.close()
    elapsed = time.monotonic() - t0
    assert all(fsx.counts.get(k, 0) > 100 for k in ("read", "write", "mapread", "mapwrite",
                                                    "truncate")), fsx.counts
    assert _read(m / "fsx.bin") == fsx.model
    m.unmount()
    assert (upper / "fsx.bin").read_bytes() == fsx.model
    assert (lower / "fsx.bin").read_bytes() == initial
    print(f"fsx: {FSX_OPS} ops in {elapsed:.1f}s: {fsx.counts}")


def test_changes_of_never_copied_lower_files_match_model_briefly(tmp_path):
    """tests/stress_mount.py's LOWERCHG mode, briefly (race40): two processes change lower
    files never copied up by path (chmod, chown, utime, truncate, setxattr, O_TRUNC opens:
    the copy-up hand-over, ``CopyUp.handing_over``), with fds opened on them before, while
    their directories move and other processes rename, hold open and unlink them; each
    change against a model, the tree at the end against the model and the kernel's
    overlay on the same layers. The soak runs it longer (several seeds, option sets)."""
    helpers.require("root")
    helpers.require("kernel_overlay")
    base = tmp_path / "lowerchg"
    env = helpers.overlaypc_env({"LOWERCHG": "2", "LOWERCHG_FILES": "48", "NOAUX": "1"})
    cmd = [sys.executable, str(Path(__file__).with_name("stress_mount.py")), str(base), "", str(SEED),
           "0", "0"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        if os.path.ismount(base / "mnt"):  # (the tool unmounts; a timeout leaves it)
            subprocess.run(["fusermount3", "-u", str(base / "mnt")], check=False)
    assert done.returncode == 0 and " 0 problems" in done.stdout, \
        f"seed {SEED}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
