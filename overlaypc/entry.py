"""The process entry point of ``overlaypc`` (the console script) and ``python -m overlaypc``.

Owns one thing: garbage collection is paused before the start-up imports. Start-up (imports,
the classes they make, the core's objects) allocates enough for ~16 collections, ~1.5 ms
of a mount's start, over objects that live as long as the mount: collection waits until
``cli.mount_main`` has built the mount (``cli.resume_gc``). A command that is not a mount
ends with the collector still paused, which costs nothing in a short-lived process.
"""
import gc


def main() -> int:
    gc.disable()
    from . import cli  # (after the collector is paused)

    cli.gc_paused = True
    return cli.main()
