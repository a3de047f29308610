"""overlaypc: an overlayfs-style union filesystem in Python on FUSE.

The core (``overlaypc.core.OverlayFS``) can be driven without a mount; the node-based
operations (``overlaypc.overlay_ops``) put it on the FUSE engine (``overlaypc.engine``,
the kernel's protocol without libfuse), and the command line (``overlaypc.cli``) mounts it.
"""
__version__ = "0.1.0"
