"""The FUSE engine: the kernel's FUSE protocol spoken directly, without libfuse.

Modules: ``protocol`` (message layouts and constants, encode/decode), ``channel``
(/dev/fuse, mount and unmount, cloned fds), ``session`` (request loop, worker threads,
replies, queued notifications) and ``ops`` (the operation interface a filesystem
implements, and the typed results it returns). Nothing here knows about overlays.
"""
