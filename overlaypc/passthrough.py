"""FUSE passthrough: which opens the kernel may serve from a backing file, and their ids.

Owns the per-inode open modes the kernel enforces and the backing ids behind them. A
passthrough open is bound to one backing file for its lifetime: it cannot follow a
copy-up, so the caller offers it only where no copy-up can happen under it (an upper
file that is not metacopy, any file of a read-only mount). The kernel's rules (each
conflict would fail the user's open(2) with EIO, which must never happen):

- one backing id per inode, shared by all its passthrough opens, registered at the first
  and closed at the last release (closing it right after the open reply races the kernel);
- no passthrough open while another open of the inode is not passthrough, and the reverse.
  The daemon never sees mmap, and a MAP_SHARED mapping of a direct-io file makes the inode
  cached, so *every* unreleased non-passthrough open counts as cached.

So ``open`` chooses: passthrough when offered and nothing cached is open (or passthrough is
already in use), else an ordinary open; both are counted until ``release``.

Fallback: registering fails with EPERM without CAP_SYS_ADMIN in the initial user namespace
(rootless) — passthrough is then off for the mount, logged once — and with ELOOP when the
backing file's filesystem is stacked deeper than the negotiated ``max_stack_depth`` (a layer on
an overlay) — then off for that filesystem (``st_dev``). Either way the open goes on as an
ordinary one.

Passthrough reads and writes bypass the daemon: ``release`` says whether a passthrough open
that could write has ended, so the caller bumps the inode's data version (a later cached
open must not keep stale pages), and the stats count no passthrough I/O.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Hashable

from . import logs
from .records import record

log = logs.get("overlaypc.passthrough")


@record
class OpenModes:
    """The unreleased opens of one inode."""
    backing_id: int = 0
    passthrough: int = 0
    cached: int = 0
    #: a passthrough open that could write is (or was, since the last cached open) live
    wrote: bool = False


class Passthrough:
    """Open-mode bookkeeping for one mount; ``backing`` registers files with the kernel
    (``engine.ops.BackingFiles``), None when passthrough was not negotiated."""

    def __init__(self, backing) -> None:
        self._backing = backing
        self._modes: dict[Hashable, OpenModes] = {}
        self._lock = threading.Lock()
        self._off_devs: set[int] = set()
        self.enabled = backing is not None

    def __len__(self) -> int:
        return len(self._modes)

    def possible(self, key: Hashable, dev: int) -> bool:
        """Whether an offer could matter for ``key`` now (a hint, read without the lock:
        callers use it to skip work that only choosing a backing file needs)."""
        modes = self._modes.get(key)
        if modes is not None and (modes.passthrough or modes.cached):
            return False
        return self.enabled and dev not in self._off_devs

    def open_first(self, key: Hashable, dev: int, fd: int, writable: bool) -> int | None:
        """``open`` offered (``offer=True``) for a ``key`` with no open counted, ``fd`` the
        backing file itself (a file a CREATE just made: ``PassthroughOpens.open_made``):
        the same count and answer, no per-inode record looked up twice, no callable. None,
        nothing counted, where ``open`` may decide otherwise: ``key`` has opens counted,
        passthrough is off (for the mount or for ``dev``)."""
        with self._lock:
            if key in self._modes or not self.enabled or dev in self._off_devs:
                return None
            backing_id = self._register(fd, dev)
            self._modes[key] = OpenModes(backing_id, 1, 0, writable) if backing_id \
                else OpenModes(cached=1)
            return backing_id

    def open(self, key: Hashable, *, offer: bool, dev: int, fd: Callable[[], int],
             writable: bool) -> int:
        """Count one open of the inode ``key``; return a backing id to pass through, or 0.
        ``offer``: no copy-up can happen under this open; ``fd()``: the backing file to
        register (called only if needed); ``dev``: its filesystem."""
        with self._lock:
            modes = self._modes.get(key)
            if modes is None:
                modes = self._modes[key] = OpenModes()
            if modes.passthrough:
                # the kernel accepts only passthrough with the same id now
                modes.passthrough += 1
                modes.wrote |= writable
                return modes.backing_id
            if offer and not modes.cached and self.enabled and dev not in self._off_devs:
                backing_id = self._register(fd(), dev)
                if backing_id:
                    modes.backing_id, modes.passthrough = backing_id, 1
                    modes.wrote |= writable
                    return backing_id
            modes.cached += 1
            return 0

    def open_unoffered(self, key: Hashable) -> int:
        """``open`` of an open offered nothing (``offer`` False): one more passthrough open
        if the inode passes through already (its backing id), else one more cached open (0)."""
        with self._lock:
            modes = self._modes.get(key)
            if modes is None:
                self._modes[key] = OpenModes(0, 0, 1)
                return 0
            if modes.passthrough:
                modes.passthrough += 1  # (a read-only open: ``wrote`` stays)
                return modes.backing_id
            modes.cached += 1
            return 0

    def release(self, key: Hashable, backing_id: int) -> bool:
        """Uncount one open (``backing_id`` as ``open`` returned). True when the inode's
        last passthrough open that could write has ended (its data may have changed
        without the daemon seeing it)."""
        with self._lock:
            modes = self._modes.get(key)
            if modes is None:
                return False
            changed = False
            if backing_id:
                modes.passthrough -= 1
                if modes.passthrough == 0:
                    self._unregister(modes.backing_id)
                    changed, modes.backing_id, modes.wrote = modes.wrote, 0, False
            else:
                modes.cached -= 1
            if modes.passthrough <= 0 and modes.cached <= 0:
                del self._modes[key]
            return changed

    def release_unoffered(self, key: Hashable) -> None:
        """``release`` of a cached open (backing id 0: nothing passed through, so no
        change to report)."""
        with self._lock:
            modes = self._modes.get(key)
            if modes is None:
                return
            modes.cached -= 1
            if modes.cached <= 0 and modes.passthrough <= 0:
                del self._modes[key]

    def _register(self, fd: int, dev: int) -> int:
        try:
            return self._backing.open(fd)
        except OSError as e:
            if e.errno == errno.EPERM:
                self.enabled = False
                log.info("FUSE passthrough is not permitted here (needs CAP_SYS_ADMIN in the "
                         "initial user namespace): reads and writes go through the daemon")
            elif e.errno == errno.ELOOP:
                self._off_devs.add(dev)
                log.info("FUSE passthrough is off for files on device %d:%d (a stacked "
                         "filesystem): reads and writes there go through the daemon",
                         os.major(dev), os.minor(dev))
            else:
                log.warning("FUSE passthrough registration failed: %s", e)
            return 0

    def _unregister(self, backing_id: int) -> None:
        try:
            self._backing.close(backing_id)
        except OSError as e:
            log.warning("closing backing id %d failed: %s", backing_id, e)
