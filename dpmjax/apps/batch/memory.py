"""How much memory the batch job may plan on, and sizes in words: sizes are checked against these
before anything of that size is allocated, so a mistyped ``--batch-rows`` or ``row_shape`` is one
line naming the setting, not an out-of-memory kill.

* host memory: the machine's physical memory (``sysconf``), or what the process' cgroup allows
  when that is less;
* a device's memory: what JAX reports as the device's limit (``memory_stats()["bytes_limit"]``);
  a CPU device has the host's memory.
"""

from __future__ import annotations

import math
import os
from typing import Optional

CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory() -> Optional[int]:
    """This machine's memory in bytes (the cgroup's limit when lower), or ``None`` if unknown."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # not POSIX
        pass
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def device_memory(device) -> Optional[int]:
    """A JAX device's memory in bytes: its reported limit, else (a CPU device) the host's memory."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        stats = {}
    limit = stats.get("bytes_limit")
    if isinstance(limit, int) and limit > 0:
        return limit
    return host_memory()


def array_bytes(shape, itemsize: int = 4) -> int:
    """Bytes of an array of ``shape`` (Python integers: no overflow for absurd shapes)."""
    return math.prod(int(n) for n in shape) * int(itemsize)


def in_words(size: float) -> str:
    """``size`` bytes as ``'1.5 GiB'``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
