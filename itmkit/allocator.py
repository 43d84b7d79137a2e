"""CPU memory reuse for the block loops: keep freed tensor memory in the process instead of the OS.

glibc's malloc hands large allocations (above a threshold that it raises up to 32 MiB as they
come and go) to mmap and returns them to the kernel when freed, and trims the heap back to the
kernel too. A block loop frees and reallocates the same tens of MiB for every block, so each
block then pays page faults on freshly zeroed pages: measured, the broadcast of a bias into a
fresh 20 MB matmul output ran at under 1 GB/s, and SGRAF scoring spent about a tenth of its
time there. PyTorch's CPU performance guide suggests jemalloc or tcmalloc for this; the same
effect is two mallopt calls away without preloading a library.
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MAX_MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit systems
NEVER_TRIM = 2**31 - 1


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and never trim it (glibc only). True if applied.

    Process-wide and once: the resident size then stays at its peak instead of shrinking after
    a block, which the block loops reach again on the next block anyway.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
        return bool(applied)
    except (OSError, AttributeError):  # not glibc (musl, or a preloaded allocator without mallopt)
        return False
