"""Keep the memory one request frees for the next (glibc malloc), instead of returning it to
the kernel and page-faulting it back in.

A network request allocates every value and gradient fresh (~47 MB for the benchmark's
784-1024-1024-1024-10 MLP in float64) and frees them together when the answer is sent. With
glibc's defaults the biggest arrays are mmapped and unmapped per request and the heap is
trimmed above a few MB, so the next request takes ~10,000 minor page faults to get the same
memory back: ~20 ms, a fifth of the request (docs/performance.md). With both thresholds
raised a request reuses its predecessor's pages. The peak RSS does not change; a worker's RSS
just stays near its peak between requests (at most `retain` bytes more), and gunicorn's
max_requests recycles workers anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit: bigger arrays are still mmapped
RETAIN_BYTES = 256 * 2**20


def retain_freed_memory(retain: int = RETAIN_BYTES) -> bool:
    """Raise glibc's mmap threshold to its ceiling and its trim threshold to `retain`.
    False (and nothing changed) where there is no glibc mallopt: macOS, musl."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success; musl's stub answers 0 and changes nothing
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        and mallopt(M_TRIM_THRESHOLD, retain) == 1
    )
