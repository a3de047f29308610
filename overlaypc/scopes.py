"""The three things the package takes from ``contextlib``, without importing it.

Owns: ``contextmanager`` (a generator function made into a context manager),
``nullcontext`` and ``suppress``. Importing ``contextlib`` costs a mount ~0.3 ms of its
start-up (it makes some twenty classes, several of them abstract base classes) for what
these ~60 lines do; ``logging`` loads it later anyway (through ``traceback``), after the
mount's first reply.

The context managers made here behave as ``contextlib``'s do for every way a ``with``
block can end: the generator runs to its ``yield`` at ``__enter__`` (whose value the
``with`` gets); a block that ends normally resumes it, which must then finish; a block
that raises has the exception thrown in at the ``yield``: the generator may let it go
(re-raised, with the block's traceback), raise another (that one propagates), or swallow
it and finish (the ``with`` goes on after the block). A ``StopIteration`` the block raises,
which the generator machinery turns into a ``RuntimeError`` when it passes through, is
given back as itself. Misuse raises the ``RuntimeError``s ``contextlib`` raises.
Caveat: no use as a decorator (``ContextDecorator``), no ``async``; the package uses neither.
"""
from __future__ import annotations

from functools import wraps


class _GeneratorScope:
    """One ``with`` of a ``contextmanager`` function: the generator it made."""
    __slots__ = ("_gen",)

    def __init__(self, gen) -> None:
        self._gen = gen

    def __enter__(self):
        try:
            return next(self._gen)
        except StopIteration:
            raise RuntimeError("generator didn't yield") from None

    def __exit__(self, typ, value, traceback) -> bool:
        gen = self._gen
        if typ is None:
            try:
                next(gen)
            except StopIteration:
                return False
            raise RuntimeError("generator didn't stop")
        if value is None:  # (an exception type alone, from a direct call)
            value = typ()
        try:
            gen.throw(value)
        except StopIteration as done:
            # the generator finished: it swallowed the exception, unless what ended it is
            # the block's own StopIteration passing through
            return done is not value
        except BaseException as raised:
            # the block's exception itself (kept with its traceback: the caller's ``with``
            # re-raises it), or the RuntimeError the generator protocol wrapped it in
            if raised is value or (isinstance(raised, RuntimeError) and isinstance(value, StopIteration)
                                   and raised.__cause__ is value):
                value.__traceback__ = traceback
                return False
            raise
        raise RuntimeError("generator didn't stop after throw()")


def contextmanager(func):
    """``func`` (a generator function yielding once) as a context manager factory."""
    @wraps(func)
    def scope(*args, **kwargs) -> _GeneratorScope:
        return _GeneratorScope(func(*args, **kwargs))
    return scope


class nullcontext:  # noqa: N801 (contextlib's name)
    """A context manager that does nothing; ``with`` gets ``enter_result``."""
    __slots__ = ("_result",)

    def __init__(self, enter_result=None) -> None:
        self._result = enter_result

    def __enter__(self):
        return self._result

    def __exit__(self, typ, value, traceback) -> None:
        return None


class suppress:  # noqa: N801 (contextlib's name)
    """A ``with`` block whose exceptions of the given types end it silently."""
    __slots__ = ("_types",)

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self._types = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, value, traceback) -> bool:
        return typ is not None and issubclass(typ, self._types)
