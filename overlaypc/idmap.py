"""ID mappings between the layers and what the mount shows (fuse-overlayfs's ``uidmapping=``).

Owns: ``IdMap``, parsed from ``C:H:N[:C:H:N...]`` (a leading ``:`` allowed, as
containers/storage writes it). The layers hold *container-side* IDs: an ID stored on disk in
``[C, C+N)`` is shown as ``H + (id - C)``; the other way, a shown (host) ID in ``[H, H+N)``
is stored as ``C + (id - H)``. A stored ID outside every range is shown as the overflow ID
(``/proc/sys/kernel/overflowuid``, 65534), as the kernel shows IDs its user namespace
cannot map; a shown ID outside every range has no stored form (``to_disk`` answers None and
the caller decides: see ``ownership``).

Ranges may not overlap on either side (the kernel refuses such ``uid_map``s too): each ID
then has at most one image, so showing and storing are inverse to each other.

Also owns ``on_idmapped_mount``: whether a layer directory is on a kernel *idmapped mount*
(``mount_setattr(MOUNT_ATTR_IDMAP)``), whose stats already show mapped (host) IDs, so the
mapping above must not be applied to them again (``ownership``). Found by the mount ID of
the open directory (``mnt_id`` in ``/proc/self/fdinfo``), looked up in
``/proc/self/mountinfo``, whose per-mount options then carry ``idmapped``: a path prefix
could name the wrong mount (bind mounts, symlinks, mounts stacked on one path).
"""
from __future__ import annotations

import functools

from .records import record

ID_MAX = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to chown(2)


@functools.lru_cache(maxsize=2)
def overflow_id(kind: str = "uid") -> int:
    """The kernel's overflow uid or gid (shown for IDs that cannot be mapped)."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


@record(frozen=True)
class IdRange:
    disk: int   # first ID as stored in the layers (container side)
    shown: int  # first ID as shown through the mount (host side)
    count: int

    def overlaps(self, other: "IdRange") -> bool:
        return (self.disk < other.disk + other.count and other.disk < self.disk + self.count) \
            or (self.shown < other.shown + other.count and other.shown < self.shown + self.count)


@record(frozen=True)
class IdMap:
    ranges: tuple[IdRange, ...]
    overflow: int = 65534

    @classmethod
    def parse(cls, text: str, overflow: int = 65534) -> "IdMap":
        """``C:H:N[:C:H:N...]``; ValueError with the reason on anything else."""
        body = text[1:] if text.startswith(":") else text
        fields = body.split(":")
        if not body or len(fields) % 3:
            raise ValueError("expected CONTAINER:HOST:COUNT triples separated by ':'")
        numbers = []
        for part in fields:
            if not part.isdigit():
                raise ValueError(f"{part!r} is not a non-negative integer")
            numbers.append(int(part))
        ranges: list[IdRange] = []
        for i in range(0, len(numbers), 3):
            r = IdRange(*numbers[i:i + 3])
            if r.count == 0:
                raise ValueError(f"empty range {r.disk}:{r.shown}:0")
            if max(r.disk, r.shown) + r.count - 1 > ID_MAX:
                raise ValueError(f"range {r.disk}:{r.shown}:{r.count} goes past the largest ID")
            clash = next((o for o in ranges if o.overlaps(r)), None)
            if clash is not None:
                raise ValueError(f"range {r.disk}:{r.shown}:{r.count} overlaps "
                                 f"{clash.disk}:{clash.shown}:{clash.count}")
            ranges.append(r)
        return cls(tuple(ranges), overflow)

    def to_shown(self, stored: int) -> int:
        for r in self.ranges:
            if r.disk <= stored < r.disk + r.count:
                return r.shown + (stored - r.disk)
        return self.overflow

    def to_disk(self, shown: int) -> int | None:
        for r in self.ranges:
            if r.shown <= shown < r.shown + r.count:
                return r.disk + (shown - r.shown)
        return None

    def __str__(self) -> str:
        return ":".join(f"{r.disk}:{r.shown}:{r.count}" for r in self.ranges)


def mount_id(fd: int) -> int | None:
    """The ID of the mount the open ``fd`` is on (``mnt_id`` of its fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "mnt_id":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def mount_options(mnt_id: int, mountinfo: str = "/proc/self/mountinfo") -> list[str] | None:
    """The per-mount options (field 6 of mountinfo) of mount ``mnt_id``; None when this
    process's mount namespace does not list it."""
    try:
        # (paths there are bytes: one mount at a name that is not UTF-8 must not hide the rest)
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split(" ", 6)
                if len(fields) > 5 and fields[0] == str(mnt_id):
                    return fields[5].split(",")
    except OSError:
        pass
    return None


def idmapped_mount_ids(mountinfo: str = "/proc/self/mountinfo") -> frozenset[int]:
    """The IDs of the idmapped mounts this process's mount namespace lists: one read of the
    mount table for all of a stack's layers (``ownership``), not one per layer (each read
    costs ~0.3 ms on a host with a few hundred mounts). Empty when it cannot be read."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return frozenset()
    if "idmapped" not in text:  # (the usual answer, without splitting a line)
        return frozenset()
    found = set()
    for line in text.splitlines():
        fields = line.split(" ", 6)
        if len(fields) > 5 and "idmapped" in fields[5].split(","):
            found.add(int(fields[0]))
    return frozenset(found)


def on_idmapped_mount(fd: int, idmapped: frozenset[int] | None = None) -> bool:
    """Whether the open ``fd`` is on an idmapped mount (its stats show mapped IDs);
    ``idmapped``: the table's idmapped mount IDs (``idmapped_mount_ids``) if already read."""
    if idmapped is not None and not idmapped:
        return False
    mid = mount_id(fd)
    if mid is None:
        return False
    if idmapped is not None:
        return mid in idmapped
    options = mount_options(mid)
    return options is not None and "idmapped" in options
