import gc
import sys

# Start-up (imports, the classes they make, the core's objects) allocates enough for ~16
# garbage collections, ~1.5 ms of a mount's start, over objects that live as long as the
# mount: collection waits until ``cli.mount_main`` has built the mount (``cli.resume_gc``).
gc.disable()

from . import cli  # noqa: E402 (after the collector is paused)

cli.gc_paused = True
sys.exit(cli.main())
