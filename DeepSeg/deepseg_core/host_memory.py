"""How much memory this computer has available, and refusing up front what cannot fit in it.

The one output whose size grows with both the image and the number of classes is ``--probabilities``:
every class's probability on the input grid. For a 118-class model on a 512 x 512 x 300 CT that is 102 GB
while it is written, so the operating system's out-of-memory killer would end the run after its minutes
of work, with no message. :func:`check_probabilities_fit` refuses it before any work instead.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from pathlib import Path

from .errors import ImageError

log = logging.getLogger(__name__)

#: bytes per voxel and class that ``--probabilities`` holds at its peak: the float16 probabilities the
#: export keeps (2), and while the file is written each class as a float32 image (4) and all of them
#: joined into the 4D image (4), with the writer's own buffers: ``test_the_probability_file_is_written_within
#: _the_memory_the_check_counts`` measures the writing's peak above the float16 array.
PROBABILITY_BYTES_PER_VOXEL_AND_CLASS = 11


def available_bytes() -> int | None:
    """Memory that new allocations can have without swapping, in bytes: Linux's ``MemAvailable``, or less where
    this process's cgroup (a container's, a batch job's) allows less; Windows' available physical memory; None
    where it cannot be read (macOS, a locked-down ``/proc``)."""
    if sys.platform.startswith("linux"):
        system = _meminfo_available_bytes()
        room = cgroup_room_bytes()
        known = [value for value in (system, room) if value is not None]
        return min(known) if known else None
    if os.name == "nt":
        return _windows_available_bytes()
    return None


def _meminfo_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


#: a cgroup v1 limit at or above this is "no limit" (the kernel writes 2^63 rounded down to a page)
_NO_LIMIT = 1 << 60


def cgroup_room_bytes(cgroups: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's memory cgroup and its ancestors still allow, in bytes: the smallest limit minus
    the usage that cannot be reclaimed (page cache not recently used, ``inactive_file``, can), over every
    level with a limit; None without a limit or where it cannot be read. cgroup v2 (``memory.max``,
    ``memory.current``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``); inside a container the
    process's own cgroup is the mount's root. ``cgroups`` and ``mount``: where the kernel shows them."""
    try:
        lines = cgroups.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "" and (mount / "cgroup.controllers").is_file():
            root, files = mount, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            root, files = mount / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = root / relative.lstrip("/")
        if not folder.is_dir():  # a cgroup namespace: the process's cgroup is the mount's root
            folder = root
        return _smallest_room(folder, root, *files)
    return None


def _smallest_room(folder: Path, root: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    rooms = []
    while True:
        limit = _read_number(folder / limit_file)
        usage = _read_number(folder / usage_file)
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            rooms.append(limit - max(0, usage - _stat_value(folder / "memory.stat", inactive_key)))
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return max(0, min(rooms)) if rooms else None


def _read_number(path: Path) -> int | None:
    """The integer in a cgroup file; None when missing, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        with open(path, encoding="ascii") as stat:
            for line in stat:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return 0


def _windows_available_bytes() -> int | None:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [
            ("dwLength", ctypes.c_ulong),
            ("dwMemoryLoad", ctypes.c_ulong),
            ("ullTotalPhys", ctypes.c_ulonglong),
            ("ullAvailPhys", ctypes.c_ulonglong),
            ("ullTotalPageFile", ctypes.c_ulonglong),
            ("ullAvailPageFile", ctypes.c_ulonglong),
            ("ullTotalVirtual", ctypes.c_ulonglong),
            ("ullAvailVirtual", ctypes.c_ulonglong),
            ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return None
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys)


def probabilities_bytes(classes: int, voxels: int) -> int:
    """What ``--probabilities`` holds at its peak for ``classes`` channels on ``voxels`` input voxels, in bytes."""
    return classes * voxels * PROBABILITY_BYTES_PER_VOXEL_AND_CLASS


def check_probabilities_fit(classes: int, shape_zyx: tuple[int, ...], subject: str) -> None:
    """Raise :class:`ImageError` when writing ``classes`` probability channels on an input grid of
    ``shape_zyx`` voxels needs more memory than this computer has available now (nothing is checked where
    that cannot be read)."""
    needed = probabilities_bytes(classes, math.prod(int(size) for size in shape_zyx))
    available = available_bytes()
    if available is None:
        log.debug("available memory unknown: --probabilities (%s) not checked", _size(needed))
        return
    if needed > available:
        grid = " x ".join(str(int(s)) for s in reversed(shape_zyx))
        raise ImageError(
            "not enough memory to write the class probabilities",
            subject=subject,
            expected=f"at most {_size(available)} (this computer's available memory)",
            found=f"{_size(needed)} for {classes} classes on {grid} voxels",
            hint="Leave out --probabilities: the labels, --uncertainty and --stats need a small part of that. "
            "Or close other programs, or run it on a computer with more memory.",
        )


def _size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
