"""glibc's allocator tuned for an engine's step buffers.

A prefill step allocates and frees buffers of tens of MB every layer (a 2048-token
chunk's matmul outputs). glibc maps blocks that large afresh and gives them back on free,
or trims them off the heap's top, so each call faults its pages in again: one 8 x
512-token prefill of `small` took ~162,000 minor page faults and 0.45-0.58 s of system
time (of 1.3-1.6 s). Raising the mmap threshold to glibc's maximum (32 MiB on 64-bit) and
the trim threshold keeps freed buffers in the heap for the next step (no faults).
tcmalloc, which vLLM recommends preloading, keeps them by itself: with it preloaded, or on
another C library, nothing is changed.

Process-wide and idempotent; what stays mapped is bounded by the trim threshold.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept before it is given back


def keep_step_buffers() -> bool:
    """Tune glibc's malloc as above; True if it was tuned (False: another allocator or C
    library, or glibc refused)."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preloaded or "jemalloc" in preloaded:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("glibc refused the malloc thresholds: step buffers are mapped anew")
    return ok
