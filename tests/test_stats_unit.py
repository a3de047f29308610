"""``stats.Stats`` counted from many threads at once (as the session's workers do): the
bytes read go to per-thread tallies with no lock, so the totals a snapshot sums must stay
exact, as must the distinct backing inodes and their cap."""
from __future__ import annotations

import sys

import helpers

from overlaypc import stats
from overlaypc.stats import Stats


def test_served_from_many_threads_sums_exactly(monkeypatch):
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        s = Stats()
        rounds, threads = 3000, 8

        def reader(i: int) -> None:
            for k in range(rounds):
                s.served(4096 + i, (i % 3, k % 50), shared=i)

        helpers.run_threads(reader, threads, timeout=120)
    finally:
        sys.setswitchinterval(old)
    snap = s.snapshot()
    assert snap["bytes_read"] == sum((4096 + i) * rounds for i in range(threads))
    assert snap["bytes_shared"] == sum(i * rounds for i in range(threads))
    assert snap["distinct_backing_inodes"] == 3 * 50
    assert snap["distinct_backing_inodes_capped"] is False
    s.served(10, (0, 0))  # the main thread's own tally joins the others
    assert s.snapshot()["bytes_read"] == snap["bytes_read"] + 10


def test_distinct_backing_inodes_stop_at_the_cap(monkeypatch):
    monkeypatch.setattr(stats, "DISTINCT_LIMIT", 5)
    s = Stats()
    for ino in range(20):
        s.served(1, (1, ino))
    snap = s.snapshot()
    assert snap["distinct_backing_inodes"] == 5 and snap["distinct_backing_inodes_capped"]
    assert snap["bytes_read"] == 20


def test_tallies_of_ended_threads_are_folded_not_kept():
    """Workers come and go (the session's pool retires the ones it added): each reading
    thread's tally must not outlive it. Before: one tally per thread that ever read, kept
    for the mount's life."""
    import threading

    s = Stats()
    for i in range(50):
        t = threading.Thread(target=s.served, args=(100 + i, (0, i)), kwargs={"shared": 1})
        t.start()
        t.join()
    s.served(7, (0, 0))  # a new tally: the ended threads' are folded now
    assert len(s._tallies) <= 2, len(s._tallies)
    snap = s.snapshot()
    assert snap["bytes_read"] == sum(100 + i for i in range(50)) + 7
    assert snap["bytes_shared"] == 50
