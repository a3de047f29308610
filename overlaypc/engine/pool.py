"""How many worker threads serve a connection: one per usable CPU, more while requests block.

Owns the rule, not the threads (``session`` starts and ends them). The pool starts with
``base`` workers, one per CPU this process may run on: with more, two readers' wake-ups
land on workers whose CPU is busy and the READ rate scatters (benchmarks/RESULTS.md,
"Worker count"). A request that blocks (a slow disk, a lower layer on a network or FUSE
file system, an fsync) ties up its worker, so the pool adds one when, as a worker picks up
a request, no other worker is waiting for one and another one is *blocked*: on its
current request for longer than ``blocked`` and, by /proc/self/task/TID/syscall, asleep
in a system call other than ``futex``. The second test tells a worker that waits for the
kernel from one that is only preempted (running, on a 2-vCPU machine shared with the
reader) or waiting for the GIL or a lock (a futex: another worker holds it, and more
workers would wait as well); a worker waiting for a lock held by a blocked worker is
covered by that one. So a worker is waiting again soon after one blocks, and fast
requests never grow the pool. At most ``bound`` workers.

An added ("extra") worker retires after answering a request once nothing has been seen
blocked for ``linger`` seconds and no other worker is blocked now (libfuse's
max_idle_threads idea, with a delay so that a run of blocking requests does not start
and end a thread each time). The ``base`` workers never retire.

Nothing polls while a worker waits: the decisions are made by a worker as it picks up or
answers a request, from one time stamp per worker (written only by its own thread; the
others read it, which the GIL makes safe for a float attribute), and by the *watch*, a
thread that sleeps until a worker picks up a request with no other worker waiting
(``all_busy``). It then looks every ``blocked`` seconds, for as long as no worker waits,
and adds one if a worker is blocked: so workers that all block at once, before any of
them could see another blocked, still get a spare. /proc is read only when every worker
is busy and one has been busy long; a worker found not blocked is not looked at again for
``blocked`` seconds.

Caveats: a preempted worker is runnable, which /proc shows as ``running`` even inside a
system call, but a fast request that sleeps a moment in the kernel (a page lock under
load) is seen as blocked if it has also run past ``blocked``: under fio with the machine
loaded by others (load 5-7 on 2 vCPUs) the pool grew by one worker in some runs. While
every worker stays busy (more concurrent requests than workers) the watch wakes every
``blocked`` seconds. An extra worker that gets no request never retires (it holds a
thread, a cloned fd and buffers of ``session``'s size until the next request or the
unmount).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable

from ..records import field, record

#: a request running longer than this (seconds) may be blocked (see ``in_io``); a READ
#: takes ~20 µs, a LOOKUP 15-30 µs, an fsync here ~0.15 ms, a copy-up with its two ~1 ms.
#: A block much shorter is over before a new worker (a clone, a thread start) could help;
#: 0.3 ms grew the pool about once per run of the small-file benchmarks, 2 ms not at all
BLOCKED = 0.002
#: extra workers retire once nothing has been seen blocked for this long (seconds)
LINGER = 2.0
#: at most this many workers beyond the base count
MAX_EXTRA = 8

#: the ``futex`` system call's numbers (and ``futex_time64``'s on 32-bit machines), which
#: /proc/PID/task/TID/syscall shows first: a thread waiting for the GIL or a lock
_FUTEX = {"x86_64": {202}, "aarch64": {98}, "riscv64": {98}, "loongarch64": {98},
          "ppc64le": {221}, "ppc64": {221}, "s390x": {238}, "i686": {240, 422},
          "i386": {240, 422}, "armv7l": {240, 422}, "armv6l": {240, 422}}
_futex = frozenset(str(n).encode() for n in _FUTEX.get(os.uname().machine, ()))


def in_io(tid: int) -> bool:
    """Whether thread ``tid`` of this process is asleep in a system call other than a
    futex wait: waiting for a disk, another file system, the kernel. False while it runs
    or is runnable, preempted or not (/proc shows ``running``), asleep outside a system
    call (``-1``) and when it is gone."""
    try:
        fd = os.open(f"/proc/self/task/{tid}/syscall", os.O_RDONLY)
    except FileNotFoundError:
        return False  # ended
    except OSError:
        return True   # no /proc: trust the time alone
    try:
        first = os.read(fd, 64).split(b" ", 1)[0]
    except OSError:
        return True
    finally:
        os.close(fd)
    return first[:1].isdigit() and first not in _futex


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@record(eq=False)
class Slot:
    """One worker's state. ``since`` is when its current request was read (monotonic), 0.0
    while it waits for one; only its own thread writes it (``looked``: the others)."""
    extra: bool = False
    since: float = 0.0
    #: the thread's id for /proc (set by the thread as it starts)
    tid: int = 0
    #: when another worker last found in /proc that this one is not blocked
    looked: float = 0.0


@record(eq=False)
class Pool:
    """The workers of one session and the rule for adding and retiring them."""
    base: int
    bound: int
    blocked: float = BLOCKED
    linger: float = LINGER
    #: whether a thread is blocked in the kernel (a seam for the fake kernel's tests,
    #: whose handlers block on a lock or event)
    in_io: "Callable[[int], bool]" = in_io
    #: the live workers; replaced (never changed in place) under ``lock``, so a worker can
    #: scan it without the lock
    slots: tuple = ()
    #: when a worker was last seen blocked (monotonic)
    last_blocked: float = float("-inf")
    #: no growth before this time: cloning failed (e.g. EMFILE) and is not retried per request
    grow_after: float = 0.0
    #: counts: extra workers started and retired, the most workers at once
    grown: int = 0
    retired: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: set by a worker that picked up a request while no other worker waited: the watch
    #: looks then whether they all block
    all_busy: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def sized(cls, base: int, extra: int = MAX_EXTRA, **kw) -> "Pool":
        base = max(1, base)
        return cls(base, base + max(0, extra), **kw)

    def join(self, extra: bool) -> Slot | None:
        """A slot for a new worker; None for an extra if the pool is full or a worker waits."""
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

    def leave(self, slot: Slot, retired: bool = False) -> None:
        """``slot``'s worker ends (``retired``: as a spare no longer needed); idempotent."""
        with self.lock:
            self.slots = tuple(s for s in self.slots if s is not slot)
            if retired:
                self.retired += 1

    def wants_more(self, now: float) -> bool:
        """Called by a worker that has just read a request (its ``since`` set to ``now``):
        True if no other worker waits and one is blocked."""
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
        # (the common case ends above: a worker waits, or every busy one is recent)
        if old and self._any_blocked(slots, None, now):
            return True
        if not self.all_busy.is_set():
            self.all_busy.set()  # every worker busy: the watch looks again later
        return False

    def waiting(self) -> bool:
        """Whether a worker waits for a request."""
        return any(not s.since for s in self.slots)

    def full(self) -> bool:
        return len(self.slots) >= self.bound

    def stalled(self, now: float) -> bool:
        """Called by the watch: True if no worker waits, the pool may grow and one is
        blocked."""
        if self.full() or now < self.grow_after or self.waiting():
            return False
        return self._any_blocked(self.slots, None, now)

    def should_retire(self, slot: Slot, now: float) -> bool:
        """Called by an extra worker that has answered a request at ``now``: True once
        nothing has been seen blocked for ``linger`` and no other worker is blocked now."""
        return now - self.last_blocked > self.linger and \
            not self._any_blocked(self.slots, slot, now)

    def _any_blocked(self, slots: tuple, me: Slot | None, now: float) -> bool:
        limit = now - self.blocked
        for s in slots:
            since = s.since
            if s is me or not since or since >= limit or now - s.looked < self.blocked:
                continue
            if s.since == since and self.in_io(s.tid):
                self.last_blocked = now
                return True
            s.looked = now  # not blocked (preempted, or waiting for a lock): not again for a while
        return False
