"""overlaypc: an overlayfs-style union filesystem in Python on FUSE.

The core (``overlaypc.core.OverlayFS``) can be driven without a mount; the FUSE adapter
(``overlaypc.fuse_adapter``) and the command line (``overlaypc.cli``) sit on top.
"""
__version__ = "0.1.0"
