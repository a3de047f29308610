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
