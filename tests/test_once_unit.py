"""``once.made_once``: built once per instance, even when threads ask first together."""
from __future__ import annotations

import threading
import time

from overlaypc.core import OverlayFS
from overlaypc.once import made_once


class _Slow:
    builds = 0

    @made_once
    def thing(self) -> object:
        """A slow build: every thread that asks meanwhile must get this one object."""
        type(self).builds += 1
        time.sleep(0.05)
        return object()


def test_threads_asking_first_together_get_one_object():
    slow, got = _Slow(), []
    threads = [threading.Thread(target=lambda: got.append(slow.thing)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _Slow.builds == 1
    assert len(got) == 8 and all(g is got[0] for g in got)
    assert slow.__dict__["thing"] is got[0]  # later reads: a plain attribute


def test_each_instance_builds_its_own_and_a_failed_build_is_tried_again():
    class Flaky:
        tries = 0

        @made_once
        def thing(self) -> int:
            type(self).tries += 1
            if type(self).tries == 1:
                raise OSError("first build fails")
            return type(self).tries

    a, b = Flaky(), Flaky()
    try:
        a.thing
    except OSError:
        pass
    assert a.thing == 2 and a.thing == 2 and b.thing == 3
    assert Flaky.__dict__["thing"].__doc__ is None and Flaky.thing is Flaky.__dict__["thing"]


def test_the_filesystems_request_only_parts_are_made_once():
    for name in ("namespace", "fileattrs"):
        assert isinstance(OverlayFS.__dict__[name], made_once)
