"""The layer stack: upper, workdir and lowers, and the inode-number scheme over them.

Owns: opening the layers, the ``xino`` mapping from (layer filesystem, real inode) to
an overlay ``st_ino`` that is unique across layers and stable across remounts
(docs/ARCHITECTURE.md §4), and the mount-exclusion locks on upper and workdir (flocks,
held until the daemon exits: a new mount waits ``LOCK_WAIT`` for them).

Inode numbers: when every layer sits on one filesystem ("samefs") the real inode
number is used unchanged. Otherwise the filesystems are numbered (upper's first, then
each new lower filesystem, top first) and that number goes in the top bits, as the
kernel's ``xino`` does; the numbering depends only on the stack, so it is stable across
remounts of the same stack.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time

from . import logs
from .layer import Layer
from .layerroots import open_roots
from .records import field, record

log = logs.get("overlaypc.stack")

#: how long a mount waits for another mount's locks on upper and workdir before EBUSY: a
#: daemon whose mount was just unmounted drops them when it exits, a few ms after
#: umount(2) returns, and container engines unmount and remount a layer back to back
LOCK_WAIT = 2.0


@record
class Xino:
    fsids: dict[int, int] = field(default_factory=dict)
    bits: int = 0
    _warned: bool = False

    @classmethod
    def for_devices(cls, devs: list[int]) -> "Xino":
        fsids: dict[int, int] = {}
        for dev in devs:
            fsids.setdefault(dev, len(fsids))
        bits = 0 if len(fsids) <= 1 else (len(fsids) - 1).bit_length()
        return cls(fsids, bits)

    def ino(self, dev: int, ino: int) -> int:
        if not self.bits:
            return ino
        shift = 64 - self.bits
        if ino >> shift:
            if not self._warned:
                log.warning("inode number %d too large for xino; st_ino may collide", ino)
                self._warned = True
            ino &= (1 << shift) - 1
        return ino | (self.fsids.get(dev, 0) << shift)


def _as_checked(layer: Layer, checked: dict[str, tuple[int, int]]) -> None:
    """Refuse ``layer`` if its root is not the directory validation checked at its path."""
    seen = checked.get(os.path.abspath(layer.path))
    if seen is None:
        return
    st = os.fstat(layer.root_fd)
    if (st.st_dev, st.st_ino) != seen:
        raise OSError(errno.ESTALE, f"{layer.name}dir replaced while the mount was being set "
                      "up (not the directory that was checked)", layer.path)


class LayerStack:
    def __init__(self, lowers: list[str], upper: str | None, work: str | None, *,
                 checked: dict[str, tuple[int, int]] | None = None) -> None:
        """``checked``: (st_dev, st_ino) of layer directories as validation saw them (by
        path); a root opened that is another object now (a directory or a parent swapped
        between the checks and the open) is refused (ESTALE), so the checks hold for
        what the daemon serves."""
        self.upper: Layer | None = None
        self.work: Layer | None = None
        self._locks: list[int] = []
        # every root at once: the layers on one filesystem share a clone (``layerroots``;
        # upper and workdir always, a rename from work to upper across two is EXDEV)
        sets = ([[os.path.abspath(upper), os.path.abspath(str(work))]] if upper else []) + \
            [[os.path.abspath(p)] for p in lowers]
        roots = open_roots(sets)
        opened: list[Layer] = []
        try:
            if upper:
                self.upper = Layer(upper, 0, writable=True, name="upper",
                                   root_fd=roots[0].fds[0], cloned=roots[0].cloned)
                opened.append(self.upper)
                self.work = Layer(str(work), -1, writable=True, name="work",
                                  root_fd=roots[0].fds[1], cloned=roots[0].cloned)
                opened.append(self.work)
            base = 1 if self.upper else 0
            self.lowers = []
            for i, p in enumerate(lowers):
                root = roots[base + i]
                self.lowers.append(Layer(p, base + i, writable=False, name=f"lower{i}",
                                         root_fd=root.fds[0], cloned=root.cloned))
                opened.append(self.lowers[-1])
            for layer in opened if checked else ():
                _as_checked(layer, checked)
        except BaseException:
            owned = {layer.root_fd for layer in opened}
            for layer in opened:
                layer.close()
            for fd in (fd for r in roots for fd in r.fds if fd not in owned):
                os.close(fd)
            raise
        self.layers: list[Layer] = ([self.upper] if self.upper else []) + self.lowers
        self.xino = Xino.for_devices([layer.dev for layer in self.layers])

    @property
    def samefs(self) -> bool:
        return self.xino.bits == 0

    def lock(self, wait: float = LOCK_WAIT) -> None:
        """Take exclusive flocks on upper and workdir; EBUSY if another mount still holds
        one after ``wait`` seconds (polled: a blocking flock cannot time out)."""
        deadline = time.monotonic() + wait
        for layer in (self.upper, self.work):
            if layer is None:
                continue
            fd = os.open(layer.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                while not _try_flock(fd):
                    if time.monotonic() >= deadline:
                        raise OSError(errno.EBUSY, f"{layer.name}dir {layer.path} is in use by another mount")
                    time.sleep(0.01)
            except BaseException:
                os.close(fd)
                raise
            self._locks.append(fd)

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()
        for layer in self.layers + ([self.work] if self.work else []):
            layer.close()


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
