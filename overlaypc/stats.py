"""Counters of what the daemon served, for ``overlaypc stats`` and the stats xattr.

Passthrough I/O (``passthrough_opens``) is served by the kernel from the backing file:
``bytes_read``/``bytes_written`` never see it.

Owns: one ``Stats`` object per mount. Counting is a dict update under a lock: cheap
next to a FUSE round trip; the bytes read (once per READ, the hot path) go to a tally of
the reading thread's own, with no lock.

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
        self._tls = threading.local()
        #: each reading thread's tally; a thread that ended is folded into ``_ended``
        #: (workers come and go: the pool retires the ones it added)
        self._tallies: list[tuple[threading.Thread, list[int]]] = []
        self._ended = [0, 0]

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def copy_up(self, method: str) -> None:
        with self._lock:
            self.copy_ups[method] += 1

    def served(self, nbytes: int, backing: tuple[int, int], shared: int = 0) -> None:
        """A read of ``nbytes`` (``shared`` of them from a canonical file) from the backing
        inode ``backing`` (layer index, ino). Once per READ, so no lock in the common case:
        the bytes go to the calling thread's own tally (only that thread writes it; a
        snapshot sums them), and a backing inode already counted is only looked up."""
        try:
            tally = self._tls.tally
        except AttributeError:
            tally = self._tls.tally = self._new_tally()
        tally[0] += nbytes
        if shared:
            tally[1] += shared
        key = hash(backing)
        if key not in self._backing:
            with self._lock:
                if len(self._backing) < DISTINCT_LIMIT:
                    self._backing.add(key)

    def _new_tally(self) -> list[int]:
        """A reading thread's [bytes_read, bytes_shared]. The tallies of threads that have
        ended are added up into one here (nothing writes them any more), so there are as
        many as live reading threads, plus those ended since the last new one."""
        tally = [0, 0]
        with self._lock:
            live = []
            for thread, t in self._tallies:
                if thread.is_alive():
                    live.append((thread, t))
                else:
                    self._ended[0] += t[0]
                    self._ended[1] += t[1]
            live.append((threading.current_thread(), tally))
            self._tallies = live
        return tally

    def _read_totals(self) -> tuple[int, int]:
        # each tally is written by its own thread only; an int read is atomic
        return (self._ended[0] + sum(t[0] for _, t in self._tallies),
                self._ended[1] + sum(t[1] for _, t in self._tallies))

    def snapshot(self, **extra: object) -> dict:
        with self._lock:
            bytes_read, bytes_shared = self._read_totals()
            data = {
                "uptime_s": round(time.time() - self.started, 1),
                "bytes_read": bytes_read,
                "bytes_written": self.counters["bytes_written"],
                "bytes_shared": bytes_shared,
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
