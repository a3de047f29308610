"""Keeping the daemon off the mount it serves, where it is mounted over its own files.

Owns: what Python reads of the filesystem by itself once a request runs (an import's
search of ``sys.path``, the source lines of a logged traceback) when that lies under the
mountpoint. A request that reads through its own mount waits for a worker of the same
daemon: slow at best, a hang when every worker waits or the request holds a lock the
lookup needs. Before ``mount(2)``, ``shield`` re-points each ``sys.path`` entry under the
mountpoint at the directory it names now (an ``O_PATH`` fd, ``/proc/self/fd/N``: the
covered directory, never the mount), and ``linecache`` reads the source of a module
loaded from there before the mount through that fd, once, when a traceback first needs
it. Nothing is done, and no fd held, for the usual mount over a directory that holds
none of the daemon's code.

Caveats: ``linecache.updatecache`` is wrapped for that (only in a mount over its own
code); a module imported through a re-pointed entry is named by its fd path in a
traceback; a ``sys.path`` entry added after the mount, or a zip archive on ``sys.path``
under the mountpoint, is not shielded.
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
    moved: dict[str, str] = {}  # an entry re-pointed, as file names spell it -> its fd path
    for i, entry in enumerate(sys.path):
        real = os.path.realpath(entry or os.curdir)
        if not _under(real, top) or not os.path.isdir(real):
            continue
        fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        held.append(fd)
        sys.path[i] = f"/proc/self/fd/{fd}"
        sys.path_importer_cache.pop(entry, None)
        moved[os.path.abspath(entry or os.curdir)] = sys.path[i]
    if moved:
        _read_source_through(moved)
    return held


def _read_source_through(moved: dict[str, str]) -> None:
    """Make ``linecache`` read a source file named under a re-pointed entry (a module
    loaded before the mount: its code names the file by the old path) through that
    entry's fd, and keep it for good (an mtime of None is never checked again): a
    traceback through it shows its lines and never looks at the mount."""
    import linecache  # (only here: it imports tokenize, re and enum, not at a usual start)
    import tokenize

    update = linecache.updatecache

    def updatecache(filename: str, module_globals: object = None) -> list[str]:
        for old, new in moved.items():
            if _under(filename, old):
                try:
                    with tokenize.open(new + filename[len(old):]) as f:
                        lines = f.readlines()
                except (OSError, SyntaxError, UnicodeDecodeError):
                    return []
                if lines and not lines[-1].endswith("\n"):
                    lines[-1] += "\n"
                linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
                return lines
        return update(filename, module_globals)

    linecache.updatecache = updatecache
