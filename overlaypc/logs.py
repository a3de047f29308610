"""Loggers that import ``logging`` only when it is needed.

Owns: ``get(name)``, the package's loggers, and ``configure``, the mount's logging set-up
handed over to run later. Importing ``logging`` costs a mount ~5 ms of its start-up (it
brings ``re``, ``traceback``, ``tokenize``, ``weakref``, ``string``), and most mounts emit
their first record only once INIT is answered ("mounted"). A ``Logger`` here answers
``isEnabledFor`` from the configured level while ``logging`` is not loaded; the first
record at an enabled level (or any call once something else loaded ``logging``, as
pytest does) imports it, runs the pending set-up once, and from then on the logger's
methods are the real ``logging.Logger``'s own (bound on the instance: no extra call per
record). So every record goes through ``logging`` exactly as before, only the import
and the handlers' creation come later.

Caveat: a set-up handed to ``configure`` runs at the first record, possibly in a worker
thread and after a fork: it must not depend on the working directory and must not fail
(``cli`` resolves paths and opens files first).
"""
from __future__ import annotations

import _thread
import sys
from collections.abc import Callable

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

#: the root logger's level while ``logging`` is not loaded (``logging``'s default until
#: ``configure`` sets another: with no handler, WARNING and above reach stderr)
_level = WARNING
#: the set-up ``configure`` was given, until it has run (it receives the ``logging`` module)
_pending: Callable | None = None
_lock = _thread.allocate_lock()

_METHODS = ("debug", "info", "warning", "error", "exception", "critical", "log", "isEnabledFor")


def configure(level: int, setup: Callable) -> None:
    """Set the root level to ``level`` and run ``setup(logging)`` before the first record
    (at once if ``logging`` is loaded already)."""
    global _level, _pending
    _level = level
    _pending = setup
    if "logging" in sys.modules:
        _logging()


def _logging():
    """The ``logging`` module, with the pending set-up done."""
    global _pending
    import logging
    if _pending is not None:
        with _lock:  # others wait here until the handlers are in place
            if _pending is not None:
                _pending(logging)
                _pending = None
    return logging


class Logger:
    """A ``logging.Logger`` by name, resolved at its first use that needs ``logging``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _bind(self):
        real = _logging().getLogger(self.name)
        for method in _METHODS:  # instance attributes shadow this class's methods
            setattr(self, method, getattr(real, method))
        return real

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's name)
        if "logging" not in sys.modules:
            return level >= _level
        return self._bind().isEnabledFor(level)

    def log(self, level: int, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(level):
            kwargs.setdefault("stacklevel", 2)
            self._bind().log(level, msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(DEBUG):
            kwargs.setdefault("stacklevel", 2)
            self._bind().debug(msg, *args, **kwargs)

    def info(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(INFO):
            kwargs.setdefault("stacklevel", 2)
            self._bind().info(msg, *args, **kwargs)

    def warning(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(WARNING):
            kwargs.setdefault("stacklevel", 2)
            self._bind().warning(msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(ERROR):
            kwargs.setdefault("stacklevel", 2)
            self._bind().error(msg, *args, **kwargs)

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        # called in an ``except`` block: ``logging`` reads sys.exc_info(), still that one
        if self.isEnabledFor(ERROR):
            kwargs.setdefault("stacklevel", 2)
            self._bind().exception(msg, *args, exc_info=exc_info, **kwargs)

    def critical(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(CRITICAL):
            kwargs.setdefault("stacklevel", 2)
            self._bind().critical(msg, *args, **kwargs)


def get(name: str) -> Logger:
    """The logger ``name`` (one object per call; loggers are module globals)."""
    return Logger(name)
