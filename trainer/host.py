"""Process-wide settings that make CPU training cheaper, applied once per process.

glibc's malloc hands every tensor over its mmap threshold (128 KiB, raised on the fly up to the
largest block freed) straight from the kernel and gives it back on free, and trims freed memory at
the top of the heap beyond twice that. A training step allocates and frees the same activations
every step, so each step faulted them in again, page by page: on the built-in model ~2,200 page
faults and ~10 ms of system time in a step of ~90 ms. Here freed memory stays in the process for
the next step (up to TRIM_THRESHOLD at the top of the heap; blocks over MMAP_THRESHOLD still go
back to the kernel). The cost is that the process keeps its peak step's memory while it lives,
which a training worker needs again at the next step anyway.

It is a setting of the process, not of the loop: everything else in the process allocates the same
way afterwards (`bench speed` applies it before any trainer runs, so ours and the peers share it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it to the kernel. True where it took
    (Linux with glibc); elsewhere nothing changes and it returns False."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):  # another C library (musl has no mallopt)
                _applied = False
    return _applied
