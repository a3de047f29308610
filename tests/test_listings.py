"""Directory listings through a real mount, where the kernel opens directories itself
(zero-message OPENDIR: ``overlaypc.listings``). A large directory is read in many
READDIRPLUS chunks; each listing continues in its own snapshot (named by the cookies), so
readers running while another process changes the directory see every unchanged entry
exactly once."""
from __future__ import annotations

import os
import threading

import pytest

import helpers

pytestmark = pytest.mark.mount

LOWER = [f"lower-{i:04d}-{'x' * 40}" for i in range(3000)]   # ~20 chunks of a 4 KiB getdents
UPPER = [f"upper-{i:03d}" for i in range(100)]


@pytest.fixture
def big(layers_factory, overlay_mount):
    layers = layers_factory({"low": {"big": {n: "" for n in LOWER}}})
    upper = layers_factory.empty_dir("upper")
    (upper / "big").mkdir()
    for n in UPPER:
        (upper / "big" / n).write_text("")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}")
    return m.path / "big"


def _listing(path) -> list[str]:
    with os.scandir(path) as it:   # getdents64 with a 32 KiB buffer: several requests
        return [e.name for e in it]


def test_large_directory_from_several_readers(big):
    expected = sorted(LOWER + UPPER)
    got: list[list[str]] = []

    def reader(_i: int) -> None:
        for _ in range(5):
            got.append(sorted(_listing(big)))

    helpers.run_threads(reader, 4, timeout=120)
    assert len(got) == 20 and all(g == expected for g in got)


def test_readers_see_unchanged_entries_once_while_the_directory_changes(big):
    stop = threading.Event()
    bad: list[str] = []

    def changer() -> None:
        i = 0
        while not stop.is_set():
            p = big / f"churn-{i % 50}"
            if p.exists():
                p.unlink()
            else:
                p.write_text("")
            i += 1

    t = threading.Thread(target=changer)
    t.start()
    try:
        def reader(_i: int) -> None:
            for _ in range(8):
                names = [n for n in _listing(big) if not n.startswith("churn-")]
                if sorted(names) != sorted(LOWER + UPPER):
                    dup = len(names) - len(set(names))
                    bad.append(f"{len(names)} names, {dup} twice")

        helpers.run_threads(reader, 3, timeout=120)
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:5]


def test_a_reader_of_the_kernels_cached_listing_misses_nothing_after_a_change(big):
    """soak13 (stress_mount BIGDIR: hundreds of unchanged names missing from a listing).
    A whole listing fills the kernel's cache of the directory (CACHE_DIR) with the cookies
    of its snapshot, which is dropped at its end; a second reader reads part of it from
    that cache. Names go, and a third listing voids the cache: the second reader goes on
    with READDIR at the gone snapshot's cookie, which the daemon served from that position
    in a fresh reading, so that as many unchanged names as had gone before it were missed."""
    assert sorted(_listing(big)) == sorted(LOWER + UPPER)   # the cache filled, snapshot done
    it = os.scandir(big)
    try:
        got = [next(it).name for _ in range(1500)]          # from the cache: 2 getdents
        for n in UPPER[:60]:
            os.unlink(big / n)
        assert len(_listing(big)) == len(LOWER) + 40        # the cache read anew
        got += [e.name for e in it]
    finally:
        it.close()
    stable = set(LOWER) | set(UPPER[60:])
    assert not stable - set(got), f"{len(stable - set(got))} unchanged names missed"
    assert len(got) == len(set(got))
