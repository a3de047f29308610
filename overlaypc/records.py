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
declares ~39 such classes before it can answer, and makes ~17 of them. Here the
declaration is read at import (its errors show there); the first calls of a class's methods
are answered by generic ones (a loop over the fields, ~2 us a call), and only a class used
``COMPILE_AFTER`` times gets its own methods compiled, all in one ``compile`` (~0.2 ms).
Start-up then compiles nothing, and a class on a hot path soon runs the same code as a
dataclass's.
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
    methods' stand-ins on ``cls`` (see ``_stand_in``)."""
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
    plan = _Plan(cls, specs, frozen, [name for name in made if name not in own])
    for name in plan.made:
        setattr(cls, name, _stand_in(plan, name))
    if eq and not frozen and "__hash__" not in own:
        cls.__hash__ = None  # type: ignore[assignment]
    if frozen:
        for name, value in (("__setattr__", _frozen_setattr), ("__delattr__", _frozen_delattr)):
            if name not in own:
                setattr(cls, name, value)
    cls.__record_fields__ = tuple(specs)  # type: ignore[attr-defined]
    return cls


#: calls of a class's stand-ins answered by the generic methods before its own are compiled
COMPILE_AFTER = 32
_made_lock = threading.Lock()


class _Plan:
    """A record class's declaration, and how often its stand-ins were called."""
    __slots__ = ("cls", "specs", "frozen", "made", "names", "compared", "calls")

    def __init__(self, cls: type, specs: dict[str, _Field], frozen: bool, made: list[str]) -> None:
        self.cls = cls
        self.specs = specs
        self.frozen = frozen
        self.made = made
        self.names = tuple(specs)
        self.compared = tuple(n for n, spec in specs.items() if spec.compare)
        self.calls = 0


def _stand_in(plan: _Plan, name: str):
    """The method ``name`` until the class's own are compiled: the generic one (no
    ``compile``: start-up makes ~17 records a few times each), and from the
    ``COMPILE_AFTER``-th call on, the compiled ones (made once, under a lock: threads may
    race there; a miscounted call only moves the moment)."""
    cls, generic = plan.cls, _GENERIC[name]

    def stand_in(self, *args, **kwargs):
        plan.calls += 1
        if plan.calls < COMPILE_AFTER:
            return generic(plan, self, *args, **kwargs)
        with _made_lock:
            if cls.__dict__[name] is stand_in:
                _make_methods(cls, plan.specs, plan.frozen, plan.made)
        return cls.__dict__[name](self, *args, **kwargs)
    stand_in.__qualname__ = f"{cls.__qualname__}.{name}"
    stand_in.__name__ = name
    return stand_in


def _generic_init(plan: _Plan, self, *args, **kwargs) -> None:
    names, where = plan.names, f"{plan.cls.__qualname__}.__init__()"
    if len(args) > len(names):
        raise TypeError(f"{where} takes {len(names) + 1} positional arguments but {len(args) + 1} were given")
    put = object.__setattr__ if plan.frozen else setattr
    taken = 0
    for i, name in enumerate(names):
        if i < len(args):
            if name in kwargs:
                raise TypeError(f"{where} got multiple values for argument {name!r}")
            value = args[i]
        elif name in kwargs:
            value = kwargs[name]
            taken += 1
        else:
            spec = plan.specs[name]
            if spec.default_factory is not _MISSING:
                value = spec.default_factory()  # type: ignore[operator]
            elif spec.default is not _MISSING:
                value = spec.default
            else:
                raise TypeError(f"{where} missing required argument: {name!r}")
        put(self, name, value)
    if taken != len(kwargs):
        extra = next(k for k in kwargs if k not in names)
        raise TypeError(f"{where} got an unexpected keyword argument {extra!r}")
    if "__post_init__" in plan.cls.__dict__:
        self.__post_init__()


def _generic_repr(plan: _Plan, self) -> str:
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n, spec in plan.specs.items() if spec.repr)
    return f"{type(self).__qualname__}({shown})"


def _generic_eq(plan: _Plan, self, other) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return tuple(getattr(self, n) for n in plan.compared) == tuple(getattr(other, n) for n in plan.compared)


def _generic_hash(plan: _Plan, self) -> int:
    return hash(tuple(getattr(self, n) for n in plan.compared))


_GENERIC = {"__init__": _generic_init, "__repr__": _generic_repr, "__eq__": _generic_eq,
            "__hash__": _generic_hash}


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
