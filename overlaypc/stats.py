"""Counters of what the daemon served, for ``overlaypc stats`` and the stats xattr.

Passthrough I/O (``passthrough_opens``) is served by the kernel from the backing file:
``bytes_read``/``bytes_written`` never see it.

Owns: one ``Stats`` object per mount. Counting is a dict update under a lock: cheap
next to a FUSE round trip.

Bound: the distinct backing inodes served are kept as one small int each, at most
``DISTINCT_LIMIT`` of them (4.2 MiB at the bound, measured with tracemalloc); past that the count is reported as a lower
bound (``distinct_backing_inodes_capped``).
"""
from __future__ import annotations

import threading
import time
from collections import Counter

#: At most this many distinct backing inodes are remembered (about 64 bytes each).
DISTINCT_LIMIT = 65536


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.counters: Counter[str] = Counter()
        self.copy_ups: Counter[str] = Counter()
        self._backing: set[int] = set()
        self._bytes_read = 0

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def copy_up(self, method: str) -> None:
        with self._lock:
            self.copy_ups[method] += 1

    def served(self, nbytes: int, backing: tuple[int, int], shared: int = 0) -> None:
        """A read of ``nbytes`` (``shared`` of them from a canonical file) from the backing
        inode ``backing`` (layer index, ino). Once per READ: kept to the lock and two
        lookups when the inode was counted already."""
        key = hash(backing)
        with self._lock:
            self._bytes_read += nbytes
            if shared:
                self.counters["bytes_shared"] += shared
            if key not in self._backing and len(self._backing) < DISTINCT_LIMIT:
                self._backing.add(key)

    def snapshot(self, **extra: object) -> dict:
        with self._lock:
            data = {
                "uptime_s": round(time.time() - self.started, 1),
                "bytes_read": self._bytes_read,
                "bytes_written": self.counters["bytes_written"],
                "bytes_shared": self.counters["bytes_shared"],
                "distinct_backing_inodes": len(self._backing),
                "distinct_backing_inodes_capped": len(self._backing) >= DISTINCT_LIMIT,
                "handle_switches": self.counters["handle_switches"],
                "bytes_copied": self.counters["bytes_copied"],
                "privileges_cleared": self.counters["privileges_cleared"],
                "passthrough_opens": self.counters["passthrough_opens"],
                "copy_ups": dict(self.copy_ups),
                "errors": self.counters["errors"],
            }
        data.update(extra)
        return data

    def to_json(self, **extra: object) -> bytes:
        import json  # only when asked: a start-up cost otherwise
        return json.dumps(self.snapshot(**extra), sort_keys=True).encode()
