"""Calls into the process's own C library without importing the ``ctypes`` package.

Owns: ``Library`` (a libc function by attribute name, as ``ctypes.CDLL(None,
use_errno=True)`` gives it), the C types the package passes and declares (``c_int``,
``c_uint``, ``c_long``, ``c_ulong``, ``c_int64``, ``c_uint64``, ``c_ubyte``, ``c_char_p``),
and ``_ctypes``' own ``Structure``, ``byref``, ``sizeof`` and ``get_errno``.

Why: ``import ctypes`` costs a mount ~1.3 ms of its start-up (the package's body makes
some forty C types, the byte-order variants in ``ctypes._endian``, and more), where what
``sysapi`` and the engine's ``channel`` use of it is the ``_ctypes`` extension's classes and
a few type codes (~0.1 ms here). Everything is ``_ctypes``' machinery: a function here is
the same kind of foreign-function object ``ctypes.CDLL`` makes (the same argument
conversions, ``restype``/``argtypes``, errno captured around the call, the GIL released),
and a type here is a C type of the same code (``c_int`` is an ``"i"``).

Caveats: these types are not ``ctypes``' own classes (``cbind.c_int`` is not
``ctypes.c_int``): declare and pass this module's types to functions made here. No
``memmove``: copy into an array by slice assignment, which checks the length.
"""
from __future__ import annotations

import os
from _ctypes import (FUNCFLAG_CDECL, FUNCFLAG_USE_ERRNO, CFuncPtr, Structure, _SimpleCData,  # noqa: F401
                     byref, dlopen, get_errno, sizeof)

__all__ = ["Library", "Structure", "byref", "c_char_p", "c_int", "c_int64", "c_long", "c_ubyte",
           "c_uint", "c_uint64", "c_ulong", "get_errno", "sizeof"]


class c_int(_SimpleCData):  # noqa: N801 (ctypes' names)
    _type_ = "i"


class c_uint(_SimpleCData):  # noqa: N801
    _type_ = "I"


class c_long(_SimpleCData):  # noqa: N801
    _type_ = "l"


class c_ulong(_SimpleCData):  # noqa: N801
    _type_ = "L"


if sizeof(c_long) == 8:  # LP64: the 64-bit types are long's, as in ctypes (a type costs ~10 us)
    c_int64, c_uint64 = c_long, c_ulong
else:
    class c_int64(_SimpleCData):  # noqa: N801
        _type_ = "q"

    class c_uint64(_SimpleCData):  # noqa: N801
        _type_ = "Q"


class c_ubyte(_SimpleCData):  # noqa: N801
    _type_ = "B"


class c_char_p(_SimpleCData):  # noqa: N801 (bytes or None, passed as a NUL-terminated char *)
    _type_ = "z"


class _Function(CFuncPtr):
    """A C function called with the C calling convention, errno saved after each call
    (for ``get_errno``); it returns a C int until ``restype`` says otherwise."""
    _flags_ = FUNCFLAG_CDECL | FUNCFLAG_USE_ERRNO
    _restype_ = c_int


class Library:
    """The symbols of the process (``dlopen(NULL)``: its libc and what it links), each
    function made at its first use and kept on the instance, so ``argtypes``/``restype``
    set on it stay (each module makes its own ``Library``: its settings are its own). A
    missing symbol raises ``AttributeError``."""

    def __init__(self) -> None:
        self._handle = dlopen(None, os.RTLD_LOCAL)  # (``_ctypes`` adds RTLD_NOW)

    def __getattr__(self, name: str) -> _Function:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        func = _Function((name, self))  # (reads ``self._handle``; AttributeError if absent)
        func.__name__ = name
        setattr(self, name, func)
        return func
