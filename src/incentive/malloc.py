"""glibc malloc settings for training: freed memory stays in the process for reuse.

A training step frees and re-allocates one to two GB of activations. By default glibc serves big blocks with
``mmap`` and hands them back on ``free`` (and trims the heap's free top), so each step page-faults all of it
again. On a 2-core VM (Intel Xeon, where a page fault costs ~7 µs) that took the embedded model's update from
~4.0 s to 5.7-6.0 s once the optimizer state had been allocated; with these settings it stays at ~4.0 s and
peak RSS does not move (see docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems: only blocks above it are still mmapped."""
TRIM_THRESHOLD = 2**31 - 1
"""Trim the heap only when over 2 GB at its top is free."""


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings once per process; False where the C library is not glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
