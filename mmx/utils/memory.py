"""Process-level memory settings for long-running mmx processes (servers, generation, benchmarks).

glibc hands every large allocation (over ~128 KB to 32 MB) its own mmap and unmaps it on free, so each new
activation tensor page-faults its memory back in; on CPU inference that costs 10-20% of a prefill. Raising the
mmap and trim thresholds keeps freed blocks in the heap for reuse. The price is that the process keeps its peak
memory instead of returning it to the OS, which is what a server wants and why this is opt-in for library users.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the CLI tunes the allocator before torch loads
    import torch

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


def release_free_memory(collect: bool = True) -> bool:
    """Collect garbage (``collect``) and hand the malloc heap's free memory back to the OS once (glibc; False
    elsewhere). For after a burst of allocations, such as compiling the decode graphs or a server's batch of
    prefills, which leaves tens of MB free in the heap that the raised trim threshold (:func:`tune_allocator`)
    would otherwise keep for good."""
    import gc

    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Zeros that cost memory only where written. On the CPU the tensor lives in an anonymous mapping, whose pages
    the OS commits one by one as they are first written, so a cache sized for the worst case is resident only as far
    as it is used (``torch.zeros`` would write, and so commit, all of it at once). Elsewhere: ``torch.zeros``."""
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the mapping alive
