"""Process-wide settings for the processes that train or score.

glibc's malloc serves every allocation above its mmap threshold (128 KiB at start, rising
only as far as the largest block freed so far) with a fresh ``mmap`` and hands the top of
its heap back to the OS whenever more than a trim threshold is free. A training step
allocates and frees tens of MiB of activations and gradients, so every step page-faults
them in again (the kernel zeroes each 4 KiB page; bench/RESULTS.md has the step times
with and without). :func:`tune_allocator` keeps
allocations up to 32 MiB (glibc's maximum threshold) in the heap and freed memory in the
process, the way a caching allocator (jemalloc, tcmalloc) would. The price: resident
memory stays at its peak instead of shrinking after it, which a training or scoring
worker reaches again on its next batch anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
OPT_OUT = "RECSYS_MOE_MALLOPT"  # "0": leave glibc's defaults


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent). False where
    it does not apply (not Linux/glibc, or ``RECSYS_MOE_MALLOPT=0``) or glibc refused."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_memory() -> bool:
    """Hand the free memory at the top of glibc's heap back to the OS now (``malloc_trim``):
    after a large structure is dropped for good (offloaded experts), so the process's
    resident memory shrinks. False where it does not apply."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
