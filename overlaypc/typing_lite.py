"""The three things the package takes from ``typing`` at run time, without importing it.

Importing ``typing`` costs ~2 ms of every mount's start-up. Modules import ``TYPE_CHECKING``,
``NamedTuple`` and ``Protocol`` from here (and ``Callable``, ``Iterator``, ... from
``collections.abc``); type checkers see ``typing``'s own (the ``TYPE_CHECKING`` branch),
so declarations read and check exactly as with ``typing``.

At run time: ``TYPE_CHECKING`` is False; a ``NamedTuple`` subclass is made by
``collections.namedtuple`` from its annotations and defaults, with its methods,
properties and docstring (what ``typing.NamedTuple`` does, minus generics and checks);
``Protocol`` is an empty base class (the package's protocols only document interfaces:
nothing checks ``isinstance`` against them).
"""
from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NamedTuple, Protocol
else:
    import collections

    _NOT_COPIED = frozenset(("__module__", "__qualname__", "__annotations__", "__dict__",
                             "__weakref__", "__orig_bases__"))

    class _NamedTupleMeta(type):
        def __new__(mcs, name: str, bases: tuple, ns: dict):
            if ns.get("_base", False):
                return super().__new__(mcs, name, bases, ns)
            fields = list(ns.get("__annotations__", {}))
            defaults = [ns[f] for f in fields if f in ns]
            if any(f not in ns for f in fields[len(fields) - len(defaults):]):
                raise TypeError(f"{name}: a field without default follows one with a default")
            cls = collections.namedtuple(name, fields, defaults=defaults, module=ns["__module__"])
            cls.__qualname__ = ns["__qualname__"]
            for key, value in ns.items():
                if key not in _NOT_COPIED and key not in fields:
                    setattr(cls, key, value)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        _base = True

    class Protocol:
        __slots__ = ()

__all__ = ["NamedTuple", "Protocol", "TYPE_CHECKING"]
