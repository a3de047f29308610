"""Keeping the daemon off the mount it serves, where it is mounted over its own files.

Owns: what Python reads of the filesystem by itself once a request runs (an import's
search of ``sys.path``, the source lines of a logged traceback) when that lies under the
mountpoint. A request that reads through its own mount waits for a worker of the same
daemon: slow at best, a hang when every worker waits or the request holds a lock the
lookup needs. Before ``mount(2)``, ``shield`` re-points each ``sys.path`` entry under the
mountpoint at the directory it names now (an ``O_PATH`` fd, ``/proc/self/fd/N``: the
covered directory, never the mount) and caches, for good, the source of each loaded
module that lies there (``linecache`` does not look again at an entry whose mtime is
None). Nothing is done, and no fd held, for the usual mount over a directory that holds
none of the daemon's code.

Caveats: a module imported through a re-pointed entry is named by its fd path in a
traceback; a ``sys.path`` entry added after the mount is not shielded.
"""
from __future__ import annotations

import os
import sys


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def shield(mountpoint: str) -> list[int]:
    """Prepare this process to mount at ``mountpoint`` (before ``mount(2)``); returns the
    fds it holds for that (to stay open while the mount is served)."""
    top = os.path.realpath(mountpoint)
    held: list[int] = []
    moved: list[str] = []  # the entries re-pointed, as modules' file names spell them
    for i, entry in enumerate(sys.path):
        real = os.path.realpath(entry or os.curdir)
        if not _under(real, top) or not os.path.isdir(real):
            continue
        fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        held.append(fd)
        sys.path[i] = f"/proc/self/fd/{fd}"
        sys.path_importer_cache.pop(entry, None)
        moved.append(os.path.abspath(entry or os.curdir))
    if moved:  # (a module's file lies under the sys.path entry it was found through)
        for module in list(sys.modules.values()):
            name = getattr(module, "__file__", None)
            if isinstance(name, str) and any(_under(name, m) for m in moved):
                _keep_source(name)
    return held


def _keep_source(filename: str) -> None:
    """Cache the source lines of ``filename`` (a module's file) so that a traceback
    through it never reads the file again."""
    import linecache  # (only here: it imports tokenize, re and enum, not at a usual start)

    source = filename[:-1] if filename.endswith((".pyc", ".pyo")) else filename
    try:
        with open(source, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # (size, mtime, lines, fullname): an mtime of None is never checked again
    linecache.cache[source] = (sum(map(len, lines)), None, lines, source)
