"""Freed memory kept for reuse: glibc malloc settings that the entry points (stage processes, the command line, the
test suite) apply before any heavy work; a library never changes its host's allocator, so nothing else calls this.

Why: the numeric loops (per-template statistics, rendering bands, fusion chunks) allocate and free tensors of a
few to a few hundred MB, many times per image. glibc serves every allocation above its mmap threshold (dynamic, at
most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free, and returns the heap's free top to
the system above its trim threshold; the next tensor then faults all its pages in again, each one zero-filled by
the kernel. Measured on the 2-core build machine: 13 million minor page faults and 22 s of system time in a 28 s
evaluate stage of the paper rehearsal (14 s with the settings below; ``/usr/bin/time``), the rehearsal's rank stage
of MaskCLIP 48 s -> 32 s, a rank job on a demo cache 1.9× faster (``benchmarks/bench_malloc.py``). Which addresses
the allocator hands out changes no computed value (every buffer is written before it is read): same bits.

The settings: no ``mmap`` below 1 GiB, no trimming, 1 GiB of top padding (address space; pages count only once
touched), and one arena shared by all threads (the statistics' worker threads then reuse the main heap instead
of mmapping per-thread heaps). Peak memory: within 7 % of the defaults in the benchmark's jobs (once +19 %,
once -49 % in single runs of other stages).
``FLOSS_MALLOC_TUNING=0`` keeps glibc's defaults (to compare); other C libraries (macOS, musl) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["keep_freed_memory", "TUNING_ENV"]

log = logging.getLogger(__name__)

#: set to 0 to keep the C library's allocator defaults
TUNING_ENV = "FLOSS_MALLOC_TUNING"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 1 << 30),
             (_M_ARENA_MAX, 1))


def keep_freed_memory() -> bool:
    """Apply the settings of the module docstring to this process (and the processes it forks later). Returns
    whether they were applied: False with ``FLOSS_MALLOC_TUNING=0``, or where the C library is not glibc."""
    if os.environ.get(TUNING_ENV, "1").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version.restype = ctypes.c_char_p      # glibc only
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):          # not glibc: its allocator has other knobs
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
    if refused:
        log.debug("glibc %s refused the mallopt parameters %s", version, refused)
    return not refused
