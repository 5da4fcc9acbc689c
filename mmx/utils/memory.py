"""Process-level memory settings for long-running mmx processes (servers, generation, benchmarks).

glibc hands every large allocation (over ~128 KB to 32 MB) its own mmap and unmaps it on free, so each new
activation tensor page-faults its memory back in; on CPU inference that costs 10-20% of a prefill. Raising the
mmap and trim thresholds keeps freed blocks in the heap for reuse. The price is that the process keeps its peak
memory instead of returning it to the OS, which is what a server wants and why this is opt-in for library users.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_applied = False


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep allocations up to ``threshold_bytes`` in the malloc heap; returns False where not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes) and libc.mallopt(_M_TRIM_THRESHOLD, 4 * threshold_bytes)
        libc.mallopt(_M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        return False
    _applied = bool(ok)
    return _applied
