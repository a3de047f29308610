"""``record``: typed state classes declared as dataclasses are, made for a fast start-up.

Owns the one decorator every typed state class of the package uses instead of
``dataclasses.dataclass``. The declaration is the same (annotated fields, plain defaults,
``field(default=..., default_factory=..., repr=..., compare=...)``, ``frozen``, ``eq``,
``__post_init__``), and so are the methods made: ``__init__`` (fields in order, keyword or
positional), ``__repr__``, ``__eq__`` (same class, compared fields as a tuple), with
``frozen`` a ``__setattr__``/``__delattr__`` that refuse (``FrozenInstanceError``) and a
``__hash__`` over the compared fields; ``eq`` without ``frozen`` makes instances unhashable,
as dataclasses does. A method the class defines itself is kept.

Why not dataclasses: importing it costs ~5 ms (it imports ``inspect``, ``ast``, ``dis``,
``tokenize``) and each class ~0.3 ms (six ``exec``s, an ``inspect.signature``); a mount
declares ~39 such classes before it can answer. Here the declaration is read at import
(its errors show there) and the methods are compiled at their first call, all of a class's
in one ``compile`` (~0.2 ms), so a class that start-up never instantiates costs nothing.
Caveats: no ``__slots__``, ``order``, ``kw_only``, ``InitVar`` or ``ClassVar`` fields, no
inheritance between records; ``dataclasses.fields``/``replace`` do not apply (nothing in
the package uses them).
"""
from __future__ import annotations

import threading

__all__ = ["FrozenInstanceError", "field", "record"]


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


_MISSING = object()


class _Field:
    __slots__ = ("default", "default_factory", "repr", "compare")

    def __init__(self, default: object, default_factory: object, repr: bool, compare: bool) -> None:
        self.default = default
        self.default_factory = default_factory
        self.repr = repr
        self.compare = compare


def field(*, default: object = _MISSING, default_factory: object = _MISSING,
          repr: bool = True, compare: bool = True) -> object:  # noqa: A002 (dataclasses' names)
    """A field's options, as ``dataclasses.field`` takes them."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory, repr, compare)


def _frozen_setattr(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _build(cls: type, frozen: bool, eq: bool) -> type:
    """Read the declaration (errors show at import, as with dataclasses) and put the
    methods' stand-ins on ``cls``; the first call of any of them makes them all."""
    own = cls.__dict__
    specs: dict[str, _Field] = {}
    seen_default = False
    for name, note in own.get("__annotations__", {}).items():
        if isinstance(note, str) and note.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = own.get(name, _MISSING)
        spec = value if isinstance(value, _Field) else _Field(value, _MISSING, True, True)
        if isinstance(value, _Field):  # as dataclasses: the class attribute is the default, if any
            if spec.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, spec.default)
        if spec.default is _MISSING and spec.default_factory is _MISSING:
            if seen_default:
                raise TypeError(f"non-default argument {name!r} follows default argument")
        else:
            seen_default = True
        specs[name] = spec
    made = ["__init__", "__repr__"] + (["__eq__"] + (["__hash__"] if frozen else []) if eq else [])
    made = [name for name in made if name not in own]
    for name in made:
        setattr(cls, name, _stand_in(cls, name, specs, frozen, made))
    if eq and not frozen and "__hash__" not in own:
        cls.__hash__ = None  # type: ignore[assignment]
    if frozen:
        for name, value in (("__setattr__", _frozen_setattr), ("__delattr__", _frozen_delattr)):
            if name not in own:
                setattr(cls, name, value)
    cls.__record_fields__ = tuple(specs)  # type: ignore[attr-defined]
    return cls


_made_lock = threading.Lock()


def _stand_in(cls: type, name: str, specs: dict[str, _Field], frozen: bool, made: list[str]):
    """A method that makes the real ones (once, under a lock: two threads may race to the
    first instance), then calls its own. Until then the class costs no ``compile``."""
    def stand_in(*args, **kwargs):
        with _made_lock:
            if cls.__dict__[name] is stand_in:
                _make_methods(cls, specs, frozen, made)
        return cls.__dict__[name](*args, **kwargs)
    stand_in.__qualname__ = f"{cls.__qualname__}.{name}"
    stand_in.__name__ = name
    return stand_in


def _make_methods(cls: type, specs: dict[str, _Field], frozen: bool, made: list[str]) -> None:
    """Compile the methods named in ``made`` (one ``compile`` for all) and put them on ``cls``."""
    own = cls.__dict__
    env: dict[str, object] = {"_MISSING": _MISSING, "_setattr": object.__setattr__}
    params, body = ["self"], []
    for name, spec in specs.items():
        if spec.default_factory is not _MISSING:
            env[f"_factory_{name}"] = spec.default_factory
            params.append(f"{name}=_MISSING")
            value = f"_factory_{name}() if {name} is _MISSING else {name}"
        elif spec.default is not _MISSING:
            env[f"_default_{name}"] = spec.default
            params.append(f"{name}=_default_{name}")
            value = name
        else:
            params.append(name)
            value = name
        body.append(f"    _setattr(self, {name!r}, {value})" if frozen else f"    self.{name} = {value}")
    if "__post_init__" in own:
        body.append("    self.__post_init__()")
    src = [f"def __init__({', '.join(params)}) -> None:", *(body or ["    pass"])]
    fmt = ", ".join(f"{n}={{self.{n}!r}}" for n, spec in specs.items() if spec.repr)
    src += ["def __repr__(self):",
            f"    return f'{{type(self).__qualname__}}({fmt})'"]
    compared = "(" + "".join(f"self.{n}, " for n, spec in specs.items() if spec.compare) + ")"
    if "__eq__" in made:
        other = compared.replace("self.", "other.")
        src += ["def __eq__(self, other):",
                "    if other.__class__ is not self.__class__:",
                "        return NotImplemented",
                f"    return {compared} == {other}"]
    if "__hash__" in made:
        src += ["def __hash__(self):", f"    return hash({compared})"]
    code: dict[str, object] = {}
    exec(compile("\n".join(src), f"<record {cls.__qualname__}>", "exec"), env, code)  # noqa: S102
    for name in made:
        value = code[name]
        value.__qualname__ = f"{cls.__qualname__}.{name}"  # type: ignore[attr-defined]
        setattr(cls, name, value)


def record(cls: type | None = None, /, *, frozen: bool = False, eq: bool = True):
    """Class decorator: ``@record`` or ``@record(frozen=True)`` / ``@record(eq=False)``."""
    if cls is None:
        return lambda c: _build(c, frozen, eq)
    return _build(cls, frozen, eq)
