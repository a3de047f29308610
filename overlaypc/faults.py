"""Test-only fault injection at named points (copy-up steps, layer calls).

Owns: a registry of hooks, empty in normal operation, so ``hit()`` costs one dict
lookup (a hot path checks ``armed`` first: not even that). Tests arm it through the
``OVERLAYPC_FAULTS`` environment variable, read once at mount:
``point=action[,point=action]`` where action is ``pause`` (stop the daemon with SIGSTOP
so a test can kill -9 it exactly there), ``eio`` (raise EIO), ``enospc``, ``eperm``, or
``crash`` (raise RuntimeError, to test that unexpected errors become EIO), or ``delay``
(sleep ``DELAY`` seconds and go on: a request held in the daemon while a test acts).
Points may carry a byte threshold (``copyup.data@1048576=pause``) and a path filter
(``file.read~broken=eio``: only when the path involved contains "broken").
Points: ``copyup.data`` (with progress in bytes), ``copyup.fsync``, ``copyup.rename``,
``copyup.parent_fsync`` (a copy in place, before its parent's fsync),
``layer.<call>`` (open, mkdir, create, rename, unlink, ...), ``file.read``, ``file.write``
(with the write's offset as its progress),
``namespace.changing`` (a namespace change about to take the namespace lock, its paths
made), ``files.nameless`` (a change of an open file with no name left, on the fd of one of
its handles), ``whiteout.mknod`` (making a 0/0 whiteout device: ``eperm`` there stands for a
kernel or filesystem that refuses them), ``namespace.rename_whiteout`` (``eperm``: an upper
that refuses RENAME_WHITEOUT), ``namespace.place_whiteout`` (putting the whiteout at a
renamed object's old name, in that case), ``index.adjust`` (the index's link count after
link/unlink/rename), ``indexclean.decode`` (the mount's check decoding an index entry's
origin, with the entry's name), ``ops.lookup`` (a LOOKUP, with
its merged path made, before the layers are read), ``ops.path`` (a request by nodeid:
GETATTR, SETATTR, OPEN, OPENDIR, a listing without a handle, READLINK, ACCESS, the xattr
requests, with the node's merged path made, before the layers are read or changed),
``ops.made`` (a MKDIR, MKNOD, SYMLINK, LINK or CREATE with its object made and named, in
its namespace lock hold, before its reply's entry is read: a failure there undoes the
creation), ``ops.created`` (such a creation with its lock hold over and its entry taken,
before its reply), ``ops.removed``
(an UNLINK or RMDIR with its namespace lock hold over, before its reply), ``ops.keep_key``
(the node-table update of an UNLINK or a rename over a non-directory, in its lock hold
after the change on disk, before it reads whether the object has other links),
``files.opening`` (an open for writing or with ``O_TRUNC``, its copy-up done, under the
namespace lock before the upper copy is opened), ``readdir.scanned`` (a listing with its layers' directories read, before its entries are
numbered), ``attrs.found`` (a lookup for attributes with the object found, before its
attributes are made), ``notify.queued`` (a queued notification, on the notifier's thread,
before it is written: ``eio`` drops it, a notifier that never gets to it).
"""
from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

_hooks: dict[str, Callable[..., None]] = {}
#: whether any hook is set: a hot path checks this before calling ``hit``
armed = False
_thresholds: dict[str, int] = {}
_filters: dict[str, str] = {}
#: seconds the ``delay`` action holds its request
DELAY = 0.5


def hit(point: str, *args: object, progress: int | None = None) -> None:
    hook = _hooks.get(point)
    if hook is None:
        return
    limit = _thresholds.get(point)
    if limit is not None and (progress is None or progress < limit):
        return
    wanted = _filters.get(point)
    if wanted is not None and not any(isinstance(a, str) and wanted in a for a in args):
        return
    hook(point, *args)


def _action(name: str) -> Callable[..., None]:
    def pause(point: str, *args: object) -> None:
        # Directed at this thread, so this thread itself takes the group stop on return from
        # the syscall: a process-directed SIGSTOP may be taken by another (idle) thread,
        # and this one would run on past the point until the stop reaches it.
        import signal  # only here: it imports enum, ~1.3 ms of every mount's start
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    def raise_errno(code: int) -> Callable[..., None]:
        def fail(point: str, *args: object) -> None:
            raise OSError(code, f"injected fault at {point}")
        return fail

    def crash(point: str, *args: object) -> None:
        raise RuntimeError(f"injected crash at {point}")

    def delay(point: str, *args: object) -> None:
        time.sleep(DELAY)

    table = {"delay": delay, "pause": pause, "eio": raise_errno(errno.EIO), "enospc": raise_errno(errno.ENOSPC),
             "eperm": raise_errno(errno.EPERM), "crash": crash}
    if name not in table:
        raise ValueError(f"unknown fault action {name!r}")
    return table[name]


def install(point: str, hook: Callable[..., None]) -> None:
    """Set ``hook(point, *args)`` at ``point`` (in-process tests: a hook that waits lets a
    test run another thread at exactly that step); ``configure(None)`` removes it."""
    global armed
    _hooks[point] = hook
    armed = True


def configure(spec: str | None) -> None:
    global armed
    armed = False
    _hooks.clear()
    _thresholds.clear()
    _filters.clear()
    for item in filter(None, (spec or "").split(",")):
        point, _, action = item.partition("=")
        point, _, wanted = point.partition("~")
        point, _, threshold = point.partition("@")
        if wanted:
            _filters[point] = wanted
        _hooks[point] = _action(action)
        armed = True
        if threshold:
            _thresholds[point] = int(threshold)
