"""The three things the package takes from ``typing`` at run time, without importing it.

Importing ``typing`` costs ~2 ms of every mount's start-up. Modules import ``TYPE_CHECKING``,
``NamedTuple`` and ``Protocol`` from here (and ``Callable``, ``Iterator``, ... from
``collections.abc``); type checkers see ``typing``'s own (the ``TYPE_CHECKING`` branch),
so declarations read and check exactly as with ``typing``.

At run time: ``TYPE_CHECKING`` is False; a ``NamedTuple`` subclass is the class
``collections.namedtuple`` makes from its annotations and defaults (the same methods and
attributes: ``_make``, ``_replace``, ``_asdict``, ``_fields``, ``_field_defaults``,
``__match_args__``, field properties), with the class's own methods, properties and
docstring (what ``typing.NamedTuple`` does, minus generics and checks). One difference,
for start-up: ``collections.namedtuple`` compiles each class's ``__new__`` (an ``eval``,
~40 us a class at import, ~0.45 ms of a mount's); here a class's first ``COMPILE_AFTER``
constructions go through a generic ``__new__`` (arguments bound by a loop), and only then
is its own compiled, once, under a lock (the hot paths make their tuples with
``tuple.__new__`` anyway). ``Protocol`` is an empty base class (the package's protocols
only document interfaces: nothing checks ``isinstance`` against them).
"""
from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NamedTuple, Protocol
else:
    import sys
    import threading
    from _collections import _tuplegetter

    _NOT_COPIED = frozenset(("__module__", "__qualname__", "__annotations__", "__dict__",
                             "__weakref__", "__orig_bases__"))
    #: constructions of a class answered by the generic ``__new__`` before its own is compiled
    COMPILE_AFTER = 32
    _compile_lock = threading.Lock()
    _MISSING = object()

    def _new_stand_in(name: str, fields: tuple[str, ...], defaults: dict[str, object]):
        """``__new__`` until the class's own is compiled (see the module's docstring); the
        same arguments, values and ``TypeError``s as ``collections.namedtuple``'s."""
        count = len(fields)
        calls = [0]
        owner: list[type] = []  # the class, once made

        def __new__(_cls, *args, **kwargs):
            calls[0] += 1
            if calls[0] >= COMPILE_AFTER:  # (threads may miscount: that only moves the moment)
                cls = owner[0]
                with _compile_lock:
                    if cls.__dict__["__new__"].__func__ is __new__:
                        cls.__new__ = staticmethod(_compiled_new(name, fields, defaults))
            if len(args) > count:
                raise TypeError(f"{name}.__new__() takes {count + 1} positional arguments "
                                f"but {len(args) + 1} were given")
            values = list(args)
            for field in fields[len(args):]:
                value = kwargs.pop(field, _MISSING)
                if value is _MISSING:
                    value = defaults.get(field, _MISSING)
                    if value is _MISSING:
                        raise TypeError(f"{name}.__new__() missing required argument: {field!r}")
                values.append(value)
            if kwargs:
                extra = next(iter(kwargs))
                if extra in fields:
                    raise TypeError(f"{name}.__new__() got multiple values for argument {extra!r}")
                raise TypeError(f"{name}.__new__() got an unexpected keyword argument {extra!r}")
            return tuple.__new__(_cls, values)
        return __new__, owner

    def _compiled_new(name: str, fields: tuple[str, ...], defaults: dict[str, object]):
        """The ``__new__`` ``collections.namedtuple`` makes: one ``eval``."""
        arg_list = ", ".join(fields) + ("," if len(fields) == 1 else "")
        scope = {"_tuple_new": tuple.__new__, "__builtins__": {}, "__name__": f"namedtuple_{name}"}
        new = eval(f"lambda _cls, {arg_list}: _tuple_new(_cls, ({arg_list}))", scope)  # noqa: S307
        new.__name__ = "__new__"
        new.__qualname__ = f"{name}.__new__"
        new.__doc__ = f"Create new instance of {name}({arg_list})"
        if defaults:
            new.__defaults__ = tuple(defaults.values())
        return new

    def _named_tuple(name: str, fields: tuple[str, ...], defaults: dict[str, object], module: str):
        """The class ``collections.namedtuple(name, fields, defaults=..., module=...)``
        makes, but for its ``__new__`` (``_new_stand_in``)."""
        count = len(fields)
        tuple_new = tuple.__new__

        @classmethod
        def _make(cls, iterable):
            result = tuple_new(cls, iterable)
            if len(result) != count:
                raise TypeError(f"Expected {count} arguments, got {len(result)}")
            return result
        _make.__func__.__doc__ = f"Make a new {name} object from a sequence or iterable"

        def _replace(self, /, **kwds):
            result = self._make(map(kwds.pop, fields, self))
            if kwds:
                raise ValueError(f"Got unexpected field names: {list(kwds)!r}")
            return result
        _replace.__doc__ = f"Return a new {name} object replacing specified fields with new values"

        repr_fmt = "(" + ", ".join(f"{field}=%r" for field in fields) + ")"

        def __repr__(self):
            "Return a nicely formatted representation string"
            return self.__class__.__name__ + repr_fmt % self

        def _asdict(self):
            "Return a new dict which maps field names to their values."
            return dict(zip(self._fields, self))

        def __getnewargs__(self):
            "Return self as a plain tuple.  Used by copy and pickle."
            return tuple(self)

        for method in (__repr__, _asdict, __getnewargs__, _replace, _make.__func__):
            method.__qualname__ = f"{name}.{method.__name__}"
        new, owner = _new_stand_in(name, fields, defaults)
        new.__qualname__ = f"{name}.__new__"
        ns = {"__doc__": f"{name}({', '.join(fields)})", "__slots__": (), "_fields": fields,
              "_field_defaults": dict(defaults), "__new__": new, "_make": _make,
              "_replace": _replace, "__repr__": __repr__, "_asdict": _asdict,
              "__getnewargs__": __getnewargs__, "__match_args__": fields}
        for index, field in enumerate(fields):
            ns[field] = _tuplegetter(index, sys.intern(f"Alias for field number {index}"))
        cls = type(name, (tuple,), ns)
        cls.__module__ = module
        owner.append(cls)
        return cls

    class _NamedTupleMeta(type):
        def __new__(mcs, name: str, bases: tuple, ns: dict):
            if ns.get("_base", False):
                return super().__new__(mcs, name, bases, ns)
            fields = tuple(ns.get("__annotations__", {}))
            defaults = {f: ns[f] for f in fields if f in ns}
            if any(f not in ns for f in fields[len(fields) - len(defaults):]):
                raise TypeError(f"{name}: a field without default follows one with a default")
            cls = _named_tuple(name, fields, defaults, ns["__module__"])
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
