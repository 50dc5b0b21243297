"""Give the memory a large load freed back to the operating system.

A backfill parses and writes chunk after chunk on two threads; each chunk's Python objects and
numpy buffers are freed when the next arrives, but glibc's allocator keeps freed pages inside its
heaps (one heap a thread) for reuse, and the process's resident size creeps up with the heaps'
fragmentation. `malloc_trim(0)` hands the free pages back (glibc >= 2.8 also releases pages in the
middle of a heap). Measured on the 1 M-row backfill's ingest (issue 16): peak RSS 686-712 MiB
against 737-739 without, and ~70 MiB less left allocated when ingest ends (what the evaluation
starts from), at no measurable cost in time. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):     # musl and others: no malloc_trim
        return None


_MALLOC_TRIM = _trim()


def release() -> bool:
    """Return freed heap pages to the operating system; True when the allocator could."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
