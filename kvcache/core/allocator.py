"""Keep glibc from handing large message buffers back to the kernel between messages.

libzmq allocates one buffer per received message part. With glibc's defaults, a freed 2 MiB part
goes back to the kernel (heap trimming, or munmap above the mmap threshold), and the next part
faults its pages in again: measured here, that halves GET throughput (1.4 vs 3.0 GB/s at 2 MiB).
Raising the mmap threshold above the largest part, and the trim threshold and top padding to
`retain_bytes`, makes freed parts serve the next ones. The cost is that up to `retain_bytes` of
freed memory stays mapped in this process. A no-op on C libraries other than glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def retain_freed_buffers(largest_part_bytes: int, retain_bytes: int) -> bool:
    """Serve message parts up to `largest_part_bytes` from the heap and keep up to `retain_bytes`
    of freed heap for reuse. Returns whether the allocator took the settings."""
    libc = _libc()
    if libc is None:
        return False
    mmap_threshold = min(_MAX_MMAP_THRESHOLD, max(largest_part_bytes * 2, 1 << 20))
    took_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    retain = ctypes.c_int(min(retain_bytes, 2**31 - 1))
    took_trim = libc.mallopt(_M_TRIM_THRESHOLD, retain) == 1
    # Per-thread arenas (libzmq's I/O thread allocates in its own) give whole free heaps back to
    # the kernel unless this much top padding is kept: without it a client still faulted in
    # ~25 pages per MiB received.
    took_pad = libc.mallopt(_M_TOP_PAD, retain) == 1
    return took_mmap and took_trim and took_pad


def release_free_pages(keep_bytes: int) -> bool:
    """Hand the free pages between live buffers back to the kernel, keeping `keep_bytes` at the
    top of the main heap (glibc's malloc_trim). A part freed between values still held is out of
    reach of the top-of-heap trim that M_TRIM_THRESHOLD governs; without this call a burst of
    traffic stays resident. Returns whether memory was released; a no-op off glibc."""
    libc = _libc()
    return libc is not None and libc.malloc_trim(ctypes.c_size_t(keep_bytes)) == 1
