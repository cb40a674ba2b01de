"""Keep freed upload buffers in the process instead of returning them to the kernel.

Every request reads a body of megabytes into one buffer. With glibc's
defaults such buffers are mmap'd and unmapped each time, and touching fresh
pages cost ~2.5 ms per 4 MB upload: measured, it was a third of imageinfo's CPU
per request. Raising the mmap and trim thresholds lets malloc reuse the same
heap memory; RSS then stays near its peak, which the pool and body limits bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("berth.services")

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above 32 MB on 64-bit; larger bodies are mmap'd as before.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc malloc; a no-op (False) on other C libraries."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.debug("mallopt refused the thresholds; keeping the allocator defaults")
    return ok
