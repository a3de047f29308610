"""How many worker threads serve a connection: one per usable CPU, more while requests block.

Owns the rule, not the threads (``session`` starts and ends them). The pool starts with
``base`` workers, one per CPU this process may run on: with more, two readers' wake-ups
land on workers whose CPU is busy and the READ rate scatters (benchmarks/RESULTS.md,
"Worker count"). A request that blocks (an fsync, a cold disk read, a slow lower layer)
ties up its worker, so the pool adds one when both of these hold as a worker picks up a
request:

  * no other worker is waiting for a request (the one just read took the last), and
  * some other worker has been on its current request longer than ``blocked`` (a request
    that blocks, not a READ of some microseconds).

and never beyond ``bound`` workers. So a worker is waiting again whenever one blocks,
and fast requests never grow it. An added ("extra") worker retires after answering a
request once no request has been seen blocked for ``linger`` seconds (libfuse's
max_idle_threads idea, with a delay so that a run of fsyncs does not start and end a
thread each time); the ``base`` workers never retire.

Nothing polls: every decision is made by a worker as it picks up or finishes a request,
from a time stamp per worker (written only by its own thread; the others read it,
which the GIL makes safe for a float attribute). Two time readings per request.

Caveat: if every worker blocks at once before any of them has been seen blocked, the
pool cannot grow (no worker is free to see it) until one of them returns, as a fixed
pool of ``base`` workers would.
"""
from __future__ import annotations

import os
import threading

from ..records import field, record

#: a request running longer than this (seconds) counts as blocked; a READ takes ~20 µs,
#: a LOOKUP ~15-30 µs, a copy-up with its two fsyncs ~0.5-1 ms on this project's VMs
BLOCKED = 0.002
#: extra workers retire once nothing has been seen blocked for this long (seconds)
LINGER = 2.0
#: at most this many workers beyond the base count
MAX_EXTRA = 8


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@record(eq=False)
class Slot:
    """One worker's state. ``since`` is when its current request was read (monotonic), 0.0
    while it waits for one; only its own thread writes it."""
    extra: bool = False
    since: float = 0.0


@record(eq=False)
class Pool:
    """The workers of one session and the rule for adding and retiring them."""
    base: int
    bound: int
    blocked: float = BLOCKED
    linger: float = LINGER
    #: the live workers; replaced (never changed in place) under ``lock``, so a worker can
    #: scan it without the lock
    slots: tuple = ()
    #: when a request was last seen blocked (monotonic)
    last_blocked: float = float("-inf")
    #: no growth before this time: cloning failed (e.g. EMFILE) and is not retried per request
    grow_after: float = 0.0
    #: counts, for tests and ``overlaypc stats``: extra workers started, retired; most at once
    grown: int = 0
    retired: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def sized(cls, base: int, extra: int = MAX_EXTRA, **kw) -> "Pool":
        base = max(1, base)
        return cls(base, base + max(0, extra), **kw)

    def join(self, extra: bool) -> Slot | None:
        """A slot for a new worker; None if the pool is full (an extra past ``bound``)."""
        with self.lock:
            # an extra only while every worker is busy: of two workers that saw that at
            # once, the second finds the first one's new (waiting) worker here
            if extra and (len(self.slots) >= self.bound or any(not s.since for s in self.slots)):
                return None
            slot = Slot(extra)
            self.slots = (*self.slots, slot)
            self.peak = max(self.peak, len(self.slots))
            if extra:
                self.grown += 1
            return slot

    def leave(self, slot: Slot) -> None:
        with self.lock:
            self.slots = tuple(s for s in self.slots if s is not slot)
            if slot.extra:
                self.retired += 1

    def wants_more(self, now: float) -> bool:
        """Called by a worker that has just read a request (its ``since`` set to ``now``):
        True if no other worker waits and one has been on its request over ``blocked``."""
        slots = self.slots
        if len(slots) >= self.bound or now < self.grow_after:
            return False
        limit = now - self.blocked
        old = False
        for s in slots:
            since = s.since
            if not since:
                return False  # a worker waits: it takes the next request
            if since < limit:
                old = True
        if old:
            self.last_blocked = now
        return old

    def should_retire(self, slot: Slot, now: float) -> bool:
        """Called by an extra worker that has answered a request at ``now``: True once
        nothing has been seen blocked for ``linger`` and no other worker is blocked now."""
        if now - self.last_blocked <= self.linger:
            return False
        limit = now - self.blocked
        for s in self.slots:
            since = s.since
            if since and since < limit and s is not slot:
                self.last_blocked = now  # still blocked: keep the spare, look again later
                return False
        return True
