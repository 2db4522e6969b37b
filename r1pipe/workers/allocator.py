"""Host memory for CPU training processes: keep freed blocks instead of handing them back to the OS.

A training step frees and allocates the same activation sizes every micro-batch. glibc's malloc serves a block
above its mmap threshold (128 KB at start, rising with the blocks freed) from a fresh mapping and gives the top
of its heap back to the OS above the trim threshold, so a step page-faults much of its working set in again:
~4000 minor faults and 5-7 ms of system time per step of the tiny model's policy worker (getrusage), 3-5% of
the step. Raising both thresholds keeps those blocks in the heap for reuse, as a caching allocator does for
GPU memory; blocks above 32 MB (checkpoint loading) are still mapped and unmapped, and at most 256 MB of free
heap top is kept.
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Set this process's malloc thresholds (bytes); False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
