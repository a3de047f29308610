"""``made_once``: an attribute built at its first use, once, even when two threads ask first.

``functools.cached_property`` builds under a lock only on Python 3.8–3.11; from 3.12 two
worker threads whose first requests reach such an attribute together can each build one,
and each go on with its own (two ``Namespace`` objects: two counters naming work files).
Here the first reader builds under a lock shared by every ``made_once`` attribute (they are
few, built once each); the value then sits in the instance's ``__dict__``, so later reads
are a plain attribute lookup, as with ``cached_property``.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

_building = threading.RLock()


class made_once:  # noqa: N801 (used as a decorator, as cached_property)
    """Decorate a method of no arguments but ``self``: its result becomes the attribute."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self.build = build
        self.name = build.__name__
        self.__doc__ = build.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        with _building:
            cache = obj.__dict__
            if self.name not in cache:  # (another thread may have built it meanwhile)
                cache[self.name] = self.build(obj)
            return cache[self.name]
